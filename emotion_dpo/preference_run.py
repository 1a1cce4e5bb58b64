"""generate_preferences.py's stages: check everything, resume from the journal, sample in a pool, finalize."""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path

from .config import differing_keys_except, save_config, to_dict
from .errors import PipelineError
from .journal import Journal, journal_files, journal_path, merge_journals, shard
from .preferences import check_token_ids, reselect, settle, write_dataset
from .prompts import load_prompts
from .stats import format_summary, write_report

# Keys that may change between a run and its resumption: they do not change what a settled prompt is.
RESUMABLE_CHANGES = {"output_dir", "batch_prompts", "classifier_batch_size", "wandb", "num_prompts", "push_to_hub"}
# Keys --reselect applies to the stored candidates; any other change would need new generation.
RESELECTABLE = {"reward_weights", "reward_bias", "length_unit", "length_min", "length_max", "target_score_range",
                "min_chosen_score", "min_chosen_gibberish_confidence", "chosen_endings", "max_retries"}
CONFIG_NAME = "config.json"


# ------------------------------------------------------------------ the output folder

def prepare_output_dir(cfg, fresh: bool) -> Path:
    """Create the run folder, or check that it holds a run of this same config; never overwrite silently."""
    folder = Path(cfg.output_dir)
    saved = folder / CONFIG_NAME
    if folder.exists() and any(folder.iterdir()):
        if not saved.exists():
            raise PipelineError(
                f"{folder}: output_dir is not empty and holds no {CONFIG_NAME} of a generate_preferences run; "
                "choose another output_dir"
            )
        changed = differing_keys_except(json.loads(saved.read_text()), to_dict(cfg), RESUMABLE_CHANGES)
        if changed and not fresh:
            if merge_journals(journal_files(folder)):
                raise PipelineError(
                    f"{folder}: holds a run with another config; these keys differ:\n  " + "\n  ".join(changed)
                    + "\nUse the same config to resume, another output_dir, --reselect to re-score the stored "
                    "candidates, or --fresh to move the old run aside and start again."
                )
            # the earlier start stopped before its first prompt settled (a bad input, a failed load): nothing to lose
            print(f"{folder}: the run there settled no prompt; starting it again with this config")
        if fresh:
            aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            print(f"--fresh: moved the earlier run to {aside}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, folder, CONFIG_NAME)
    except OSError as e:
        raise PipelineError(f"{folder}: output_dir is not writable ({e.strerror})") from None
    return folder


# ------------------------------------------------------------------ inputs, checked before any model loads

def settled_records(folder: Path, prompts) -> dict[int, dict]:
    records = {r["index"]: r for r in merge_journals(journal_files(folder))}
    check_token_ids(list(records.values()), folder)
    for index, record in records.items():
        if index < len(prompts) and (record["prompt"], record["prompt_ids"]) != (prompts[index].text, prompts[index].ids):
            raise PipelineError(
                f"{folder}: prompt {index} in the journal differs from the one built now "
                "(dataset, template, tokenizer or system prompt changed); use another output_dir"
            )
    return records


# ------------------------------------------------------------------ the sampling pool

def sample_pool(cfg, prompts, sampler, journal: Journal, metrics, progress) -> None:
    """Rounds for many prompts at once until each one is accepted or given up; each is journaled as it settles."""
    pending = deque((prompt, []) for prompt in prompts)
    accepted = failed = rounds_settled = 0
    started = time.time()
    while pending:
        batch = [pending.popleft() for _ in range(min(sampler.batch_prompts, len(pending)))]
        new_rounds = sampler.sample([prompt for prompt, _ in batch])
        retry = []
        for (prompt, rounds), new_round in zip(batch, new_rounds):
            rounds.append(new_round)
            record = settle(prompt, rounds, cfg, final=len(rounds) >= 1 + cfg.max_retries,
                            eos_token_id=sampler.tokenizer.eos_token_id)
            if record is None:
                retry.append((prompt, rounds))
                continue
            journal.append(record)  # flushed to disk before it counts
            accepted += record["status"] == "accepted"
            failed += record["status"] == "failed"
            rounds_settled += len(rounds)
            progress.update(1)
        pending.extendleft(reversed(retry))  # retried first: their rounds live in memory until settled
        done = accepted + failed
        figures = {
            "settled": progress.n, "accepted": accepted, "failed": failed,
            "mean_rounds": rounds_settled / done if done else 0.0,
            "prompts_per_minute": 60 * done / (time.time() - started),
            "batch_prompts": sampler.batch_prompts,
        }
        progress.set_postfix(acc=accepted, fail=failed, rounds=f"{figures['mean_rounds']:.2f}",
                             ppm=f"{figures['prompts_per_minute']:.1f}")
        metrics.log(figures)


def generate(cfg, fresh: bool = False) -> None:
    from accelerate import PartialState
    from tqdm.auto import tqdm
    from transformers import set_seed

    from .generation import CandidateSampler, Scorer, checked_generation_config
    from .models import check_adapter_path, load_generator
    from .tracking import MetricsLog, start_wandb

    # ---- every input checked before output_dir is written and before any model weights load
    state = PartialState()
    generation_config = checked_generation_config(cfg.generation, cfg.source)
    check_adapter_path(cfg.adapter, "adapter", cfg.source)
    tokenizer, prompts = load_prompts(cfg)  # dataset, columns, emotions, the classifiers' labels
    if state.is_main_process:
        prepare_output_dir(cfg, fresh)
    state.wait_for_everyone()
    folder = Path(cfg.output_dir)
    settled = settled_records(folder, prompts)
    mine = shard(prompts, state.process_index, state.num_processes)
    todo = [p for p in mine if p.index not in settled]
    print(f"{len(prompts)} prompts; this process: {len(mine)}, already settled {len(mine) - len(todo)}, "
          f"to do {len(todo)}")
    if todo:
        set_seed(cfg.seed + state.process_index)
        run = start_wandb(cfg.wandb, "generate_preferences", to_dict(cfg), folder) if state.is_main_process else None
        metrics = MetricsLog(folder / f"metrics.rank{state.process_index}.jsonl", run)
        model, tokenizer = load_generator(cfg)
        sampler = CandidateSampler(model, tokenizer, Scorer(cfg, tokenizer), cfg.n_candidates, generation_config,
                                   cfg.batch_prompts)
        journal = Journal(journal_path(folder, state.process_index))
        with tqdm(total=len(mine), initial=len(mine) - len(todo), desc="prompts", unit="prompt",
                  disable=not state.is_main_process) as progress:
            try:
                sample_pool(cfg, todo, sampler, journal, metrics, progress)
            finally:
                journal.close()
        if run is not None:
            run.finish()
    state.wait_for_everyone()
    if state.is_main_process:
        finalize(cfg, folder, total_prompts=len(prompts))


# ------------------------------------------------------------------ the dataset and its report

def finalize(cfg, folder: Path, total_prompts: int | None = None, records: list[dict] | None = None) -> dict:
    """Journal(s) -> dataset/, preferences.jsonl, failed.jsonl, statistics and the gap histogram."""
    if records is None:
        files = journal_files(folder)
        if not files:
            raise PipelineError(f"{folder}: no journal to finalize (run generate_preferences.py first)")
        records = merge_journals(files)
    limit = total_prompts if total_prompts is not None else cfg.num_prompts
    if limit is not None and (beyond := sum(r["index"] >= limit for r in records)):
        # num_prompts lowered since those settled: the journal keeps them, the dataset holds the first num_prompts
        print(f"{beyond} settled prompts lie beyond the first {limit} (num_prompts): kept in the journal, "
              "left out of the dataset")
        records = [r for r in records if r["index"] < limit]
    counts = write_dataset(records, folder)
    summary = write_report(records, folder, total_prompts)
    print(format_summary(summary))
    print(f"wrote {counts['accepted']} pairs to {folder / 'dataset'} and {folder / 'preferences.jsonl'}")
    if cfg.push_to_hub:
        import datasets

        datasets.load_from_disk(str(folder / "dataset")).push_to_hub(cfg.push_to_hub)
    return summary


def reselect_run(cfg, out_dir: str) -> dict:
    """Re-score the journal's stored candidates with this config's rewards and selection; no generation."""
    source = Path(cfg.output_dir)
    files = journal_files(source)
    if not files:
        raise PipelineError(f"{source}: no journal to reselect from (output_dir of a generate_preferences run)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise PipelineError(f"{out}: --reselect writes a new dataset and will not overwrite a non-empty folder")
    try:
        run_config = json.loads((source / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{source / CONFIG_NAME}: the run's config cannot be read ({e})") from None
    needs_generation = differing_keys_except(run_config, to_dict(cfg), RESELECTABLE | RESUMABLE_CHANGES)
    if needs_generation:
        raise PipelineError(
            f"{source}: --reselect re-scores the stored candidates; these keys differ from the run's and would need "
            "new generation:\n  " + "\n  ".join(needs_generation))
    length_of = None
    if run_config.get("length_unit") != cfg.length_unit:  # the stored lengths are in the run's unit
        length_of = reply_measure(cfg)
    stored = merge_journals(files)
    check_token_ids(stored, source)
    out.mkdir(parents=True, exist_ok=True)
    records = [reselect(r, cfg, cfg, length_of) for r in stored]
    save_config(cfg, out, CONFIG_NAME)
    with open(out / "journal.rank0.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return finalize(cfg, out, records=records)


def reply_measure(cfg):
    """length_of(text) in cfg.length_unit; tokens are the generator's tokenizer's, as when the run scored them."""
    from .rewards import reply_length

    count_tokens = None
    if cfg.length_unit == "tokens":
        from .chat import load_chat_format
        from .generation import token_counter
        from .models import load_tokenizer

        count_tokens = token_counter(load_tokenizer(cfg.base_model, cfg.adapter, load_chat_format(cfg.chat_template)))

    return lambda text: reply_length(text, cfg.length_unit, count_tokens)
