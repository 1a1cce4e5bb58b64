"""generate_preferences.py's stages: check everything, resume from the journal, sample in a pool, finalize."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections import deque
from contextlib import ExitStack
from pathlib import Path

from .card import push_card, write_card
from .config import GenerateConfig, differing_keys_except, save_config, to_dict
from .errors import PipelineError
from .files import FINALIZE_LOCK, FolderLock, claim_run_folder, publish_set, run_folder_exists
from .journal import Journal, journal_files, journal_path, merge_journals
from .dataset import DATASET_DIR, DATASET_FILES, PREFERENCES_JSONL, choose_pairs, reselect, settle, write_dataset
from .distributed import process_state, prompt_batches, shard
from .prompts import load_prompts
from .selection import gives_up
from .stats import REPORT_FILES, format_summary, write_report

# Keys --reselect applies to the stored candidates; any other change would need new generation.
RESELECTABLE = {"reward_weights", "reward_bias", "length_unit", "length_min", "length_max", "target_score_range",
                "min_chosen_score", "min_chosen_gibberish_confidence", "chosen_endings", "max_retries", "length_rule",
                "chosen_text_cap", "chosen_text_cap_min", "min_distinct_passing", "chosen_rule", "rejected_rule"}
CONFIG_NAME = "config.json"
SCRIPT = "generate_preferences.py"  # in the run marker: the folder is this script's run
# What finalize writes: one set, switched in at once (files.publish_set)
OUTPUTS = [*DATASET_FILES, *REPORT_FILES]


# ------------------------------------------------------------------ the output folder

def prepare_output_dir(cfg, fresh: bool) -> FolderLock:
    """Create the run folder, or check that it holds a run of this same config; never overwrite silently.

    Returns the run's lock, held until released: a second process on the folder is refused, naming this one. A folder
    that is not a generate_preferences run is refused; --fresh moves aside only one that is (files.claim_run_folder)."""
    folder = Path(cfg.output_dir)

    def check(folder: Path, started: bool) -> None:
        if started and not fresh:  # --fresh on an empty run folder: nothing to move, nothing to check
            check_run_config(cfg, folder)

    lock = claim_run_folder(folder, SCRIPT, "generating", "generate_preferences run", fresh=fresh, check=check)
    try:
        save_config(cfg, folder, CONFIG_NAME)
    except OSError as e:
        lock.release()
        raise PipelineError(f"{folder}: output_dir is not writable ({e.strerror})") from None
    return lock


def read_run_config(folder: Path) -> dict | None:
    """The run's saved config; None when it is missing; an unreadable one is a clear error with the way out."""
    saved = folder / CONFIG_NAME
    if not saved.exists():
        return None
    try:
        run_config = json.loads(saved.read_text(encoding="utf-8"))
        if not isinstance(run_config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise PipelineError(
            f"{saved}: unreadable ({e}); it was cut short by a kill or a full disk. The journal is intact: delete "
            f"{saved} and run the same command again to resume with this config, or pass --fresh to move the run "
            "aside and start again"
        ) from None
    return run_config


def check_run_config(cfg, folder: Path) -> None:
    run_config = read_run_config(folder)
    if run_config is None:  # deleted after it was torn (see read_run_config): the journal's prompts are checked
        print(f"{folder}: no {CONFIG_NAME}; resuming the journal there with this config")
        return
    changed = differing_keys_except(run_config, to_dict(cfg), GenerateConfig.resumable_changes)
    if changed:
        if merge_journals(journal_files(folder)):
            raise PipelineError(
                f"{folder}: holds a run with another config; these keys differ:\n  " + "\n  ".join(changed)
                + "\nUse the same config to resume, another output_dir, --reselect to re-score the stored "
                "candidates, or --fresh to move the old run aside and start again."
            )
        # the earlier start stopped before its first prompt settled (a bad input, a failed load): nothing to lose
        print(f"{folder}: the run there settled no prompt; starting it again with this config")


# ------------------------------------------------------------------ inputs, checked before any model loads

def settled_records(folder: Path, prompts) -> dict[int, dict]:
    records = {r["index"]: r for r in merge_journals(journal_files(folder))}
    for index, record in records.items():
        if index < len(prompts) and (record["prompt"], record.get("prompt_ids", prompts[index].ids)) != (
                prompts[index].text, prompts[index].ids):
            raise PipelineError(
                f"{folder}: prompt {index} in the journal differs from the one built now "
                "(dataset, template, tokenizer or system prompt changed); use another output_dir"
            )
    return records


# ------------------------------------------------------------------ the sampling pool

def sample_pool(cfg, batches, sampler, journal: Journal, metrics, progress, journaled: dict[int, dict]) -> None:
    """Rounds for a batch of prompts at once until each one is accepted or given up, batch after batch; each prompt
    is journaled as it settles. Batch `number` is sampled from seed + number, its retries with it, so its prompts'
    rounds depend on the batch alone, not on which process samples it, what it sampled before, or a kill: a batch
    a kill cut short is sampled whole again from its first round. Its prompts already in the journal (`journaled`)
    take part up to the round they settled in, so that the others draw what they drew uninterrupted, and are not
    journaled again."""
    from transformers import set_seed

    accepted = failed = rounds_settled = 0
    changed_on_resample = []  # journaled prompts whose record, sampled again, differs from the journal's
    started = time.time()
    for number, prompts in batches:
        set_seed(cfg.seed + number)
        pending = deque((prompt, []) for prompt in prompts)
        while pending:  # a round for all of them (fewer only when out-of-memory halved batch_prompts)
            batch = [pending.popleft() for _ in range(min(sampler.batch_prompts, len(pending)))]
            new_rounds = sampler.sample([prompt for prompt, _ in batch])
            retry = []
            for (prompt, rounds), new_round in zip(batch, new_rounds):
                rounds.append(new_round)
                earlier = journaled.get(prompt.index)
                if earlier is not None and len(rounds) < len(earlier["rounds"]):
                    retry.append((prompt, rounds))
                    continue
                record = settle(prompt, rounds, cfg, final=gives_up(len(rounds), cfg.max_retries),
                                eos_token_id=sampler.tokenizer.eos_token_id)
                if earlier is not None:  # leaves the batch at the round it left it before the kill
                    if record is None or json.loads(json.dumps(record)) != earlier:
                        changed_on_resample.append(prompt.index)
                    continue
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
    if changed_on_resample:
        # e.g. on a GPU, whose sampling kernels need not give the same numbers twice
        print(f"{len(changed_on_resample)} prompts settled before the resume (first: {changed_on_resample[0]}) got "
              "other replies when their batch was sampled again; the journal's records are kept, and the batch's "
              "other prompts may differ from an uninterrupted run's")


def warn_long_prompts(cfg, tokenizer, prompts, max_new_tokens: int | None) -> None:
    """Prompts longer than the model takes with room for the reply (max_position_embeddings - max_new_tokens)."""
    from transformers import AutoConfig

    try:
        limit = AutoConfig.from_pretrained(cfg.base_model).max_position_embeddings
    except (OSError, ValueError, AttributeError):
        return  # no such figure to compare with; the load itself reports a missing model
    room = limit - (max_new_tokens or 0)
    lengths = [len(p.ids) for p in prompts]  # the ids the model is given
    over = [(p.index, n) for p, n in zip(prompts, lengths) if n > room]
    if over:
        longest = max(over, key=lambda pair: pair[1])
        warnings.warn(
            f"{cfg.dataset}: {len(over)} of {len(prompts)} prompts are longer than the {room} tokens the model takes "
            f"(max_position_embeddings {limit} - max_new_tokens {max_new_tokens}); the longest, prompt "
            f"{longest[0]}, has {longest[1]} tokens", stacklevel=2)


def generate(cfg, fresh: bool = False) -> None:
    from tqdm.auto import tqdm

    from .generation import CandidateSampler, Scorer, checked_generation_config
    from .models import check_adapter_path, load_generator
    from .tracking import MetricsLog, start_wandb

    # ---- every input checked before output_dir is written and before any model weights load
    state = process_state()
    generation_config = checked_generation_config(cfg.generation, cfg.source)
    check_adapter_path(cfg.adapter, "adapter", cfg.source)
    tokenizer, prompts = load_prompts(cfg)  # dataset, columns, emotions, the classifiers' labels
    if state.is_main_process:
        warn_long_prompts(cfg, tokenizer, prompts, generation_config.max_new_tokens)
    with ExitStack() as held:
        if state.is_main_process:  # the run's lock, held to the end of finalize
            held.callback(prepare_output_dir(cfg, fresh).release)
        state.wait_for_everyone()
        folder = Path(cfg.output_dir)
        settled = settled_records(folder, prompts)
        # whole batches of consecutive prompts, batch b sampled from seed + b by whichever process takes it: the
        # same pairs with 1 process or N
        mine = shard(prompt_batches(prompts, cfg.batch_prompts), state.process_index, state.num_processes)
        total = sum(len(batch) for _, batch in mine)
        # a batch a kill cut short is sampled whole again (sample_pool): its settled prompts' draws come before
        # the others' in the batch's random stream
        mine = [(number, batch) for number, batch in mine if any(p.index not in settled for p in batch)]
        todo = sum(p.index not in settled for _, batch in mine for p in batch)
        print(f"{len(prompts)} prompts; this process: {total}, already settled {total - todo}, to do {todo}")
        if todo:
            run = start_wandb(cfg.wandb, "generate_preferences", to_dict(cfg), folder) if state.is_main_process else None
            metrics = MetricsLog(folder / f"metrics.rank{state.process_index}.jsonl", run)
            model, tokenizer = load_generator(cfg)
            sampler = CandidateSampler(model, tokenizer, Scorer(cfg, tokenizer), cfg.n_candidates, generation_config,
                                       cfg.batch_prompts)
            journal = Journal(journal_path(folder, state.process_index))
            with tqdm(total=total, initial=total - todo, desc="prompts", unit="prompt",
                      disable=not state.is_main_process) as progress:
                try:
                    sample_pool(cfg, mine, sampler, journal, metrics, progress, settled)
                finally:
                    journal.close()
            if run is not None:
                run.finish()
        state.wait_for_everyone()
        if state.is_main_process:
            finalize(cfg, folder, total_prompts=len(prompts))


# ------------------------------------------------------------------ the dataset and its report

def finalize(cfg, folder: Path, total_prompts: int | None = None, records: list[dict] | None = None) -> dict:
    """Journal(s) -> dataset/, preferences.jsonl, failed.jsonl, statistics and the gap histogram, as one set:
    built in .staging, then switched in at once (files.publish_set), so a crash leaves the old set or the new one."""
    with FolderLock(folder, FINALIZE_LOCK, "finalizing", wait=True):
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
        staging = folder / ".staging"
        shutil.rmtree(staging, ignore_errors=True)  # what a crashed finalize left
        staging.mkdir()
        records, chosen_text = choose_pairs(records, cfg)  # the diversity keys, counted in prompt order
        counts = write_dataset(records, staging)
        summary = write_report(records, staging, total_prompts, cfg.reward_weights, chosen_text, cfg.length_max)
        write_card(cfg, staging, summary)  # in dataset/, published with it
        publish_set(folder, staging, OUTPUTS)
    print(format_summary(summary))
    if summary["collapse_ahead"]:
        warnings.warn(f"{folder}: the pairs teach a collapse before DPO starts ("
                      + "; ".join(summary["collapse_ahead"]) + "); chosen_text_cap limits one text's share "
                      "(docs/selection.md, 'Diversity-aware selection')", stacklevel=2)
    print(f"wrote {counts['accepted']} pairs to {folder / DATASET_DIR} (with its card, README.md) and "
          f"{folder / PREFERENCES_JSONL}")
    if cfg.push_to_hub:
        import datasets

        datasets.load_from_disk(str(folder / DATASET_DIR)).push_to_hub(cfg.push_to_hub)
        push_card(folder, cfg.push_to_hub)
    return summary


def finalize_run(cfg) -> dict:
    """--finalize: the dataset from the journal so far, as the run selected it; config changes that would change
    nothing here are named, not silently ignored."""
    folder = Path(cfg.output_dir)
    if not run_folder_exists(folder) or not journal_files(folder):
        raise PipelineError(f"{folder}: no journal to finalize (run generate_preferences.py first)")
    run_config = read_run_config(folder)
    ignored = differing_keys_except(run_config, to_dict(cfg), GenerateConfig.resumable_changes) if run_config else []
    if ignored:
        warnings.warn(f"{folder}: --finalize writes the pairs the run selected; these keys differ from the run's "
                      "config and change nothing here:\n  " + "\n  ".join(ignored)
                      + "\n(--reselect OUT_DIR re-scores the stored candidates with reward and selection keys)",
                      stacklevel=2)
    _, prompts = load_prompts(cfg)  # the run's total (while it runs, the journal holds only those settled so far)
    return finalize(cfg, folder, total_prompts=len(prompts))


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
    needs_generation = differing_keys_except(run_config, to_dict(cfg), RESELECTABLE | GenerateConfig.resumable_changes)
    if needs_generation:
        raise PipelineError(
            f"{source}: --reselect re-scores the stored candidates; these keys differ from the run's and would need "
            "new generation:\n  " + "\n  ".join(needs_generation))
    if isinstance(run_config.get("max_retries"), int) and cfg.max_retries > run_config["max_retries"]:
        raise PipelineError(
            f"{source}: --reselect with max_retries {cfg.max_retries}, above the run's {run_config['max_retries']}: "
            f"a prompt the run gave up after {1 + run_config['max_retries']} rounds would need more rounds, i.e. new "
            f"generation; --reselect takes max_retries up to {run_config['max_retries']}")
    length_of = None
    if run_config.get("length_unit") != cfg.length_unit:  # the stored lengths are in the run's unit
        length_of = reply_measure(cfg)
    stored = merge_journals(files)
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
        from .template import load_chat_format
        from .generation import token_counter
        from .models import load_tokenizer

        count_tokens = token_counter(load_tokenizer(cfg.base_model, cfg.adapter, load_chat_format(cfg.chat_template)))

    return lambda text: reply_length(text, cfg.length_unit, count_tokens)
