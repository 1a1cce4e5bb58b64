"""evaluate.py's stages: the same held-out prompts, one sampled reply per model (SFT, DPO, optionally the bare
base), scored with generate_preferences' classifiers and rewards, compared side by side."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from . import EMOTIONS
from .config import save_config, to_dict
from .distributed import prompt_batches, shard
from .diversity import ceiling, collapse_warnings, per_draw_report
from .judges import agreement, check_judges, judge_figures, judge_replies, predicted
from .errors import PipelineError
from .files import FolderLock, claim_run_folder, run_script_of
from .plotting import pyplot
from .prompts import load_prompts
from .selection import is_cut_off

RESULTS_JSON, RESULTS_MD, REPLIES, RESULTS_PNG = "results.json", "results.md", "replies.jsonl", "results.png"
RESULT_FILES = (RESULTS_JSON, RESULTS_MD, REPLIES, RESULTS_PNG)  # what a finished evaluation wrote
SCRIPT = "evaluate.py"  # in the run marker: the folder is this script's run

DIVERSITY_ROWS = [
    ("distinct_replies", "distinct replies", "{:.0f}"), ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"), ("canned_share", "canned share (reply to >= 3 prompts)", "{:.3f}"),
    ("most_frequent_share", "most frequent reply's share", "{:.3f}"),
    ("length_words_mean", "length in words, mean", "{:.2f}"), ("length_words_sd", "length in words, SD", "{:.2f}"),
]

METRIC_ROWS = [
    ("emotion_accuracy", "emotion accuracy"), ("emotion_weighted_f1", "emotion weighted F1"),
    ("emotion_macro_f1", "emotion macro-F1"), ("clean_rate", "clean rate"),
    ("cutoff_rate", "cut-off rate"), ("mean_length", "mean length"), ("mean_total_reward", "mean total reward"),
    ("mean_emotion_reward", "  emotion reward"), ("mean_length_reward", "  length reward"),
    ("mean_gibberish_reward", "  gibberish reward"),
]


# ------------------------------------------------------------------ metrics: pure functions of plain values

def model_metrics(targets, replies, clean_confidence: float, endings, labels=EMOTIONS) -> dict:
    """Per-model figures from scored replies (ScoredReply-like: emotion_label, gibberish_label, ...).

    Macro-F1 averages over the emotions that were requested (weighted F1 weighs them by their prompts, as the
    reference's evaluate_dpo.py reports it) (a class never requested has no recall to earn);
    per-emotion accuracy is the recall of each requested emotion: how often a reply asked for it showed it.
    A reply is cut off unless it ends in one of `endings`, as generate_preferences' chosen filter reads it.
    """
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    targets = [t.lower() for t in targets]
    predicted = [r.emotion_label.lower() for r in replies]
    labels = [label.lower() for label in labels]
    per_emotion = recall_score(targets, predicted, labels=labels, average=None, zero_division=0)
    present = set(targets)
    return {
        "prompts": len(replies),
        "emotion_accuracy": float(accuracy_score(targets, predicted)),
        "emotion_macro_f1": float(f1_score(targets, predicted, labels=sorted(present), average="macro",
                                           zero_division=0)),
        "emotion_weighted_f1": float(f1_score(targets, predicted, labels=sorted(present), average="weighted",
                                              zero_division=0)),
        "per_emotion_accuracy": {label: float(acc) for label, acc in zip(labels, per_emotion) if label in present},
        "clean_rate": statistics.fmean(
            r.gibberish_label.lower() == "clean" and r.gibberish_confidence >= clean_confidence for r in replies),
        "cutoff_rate": statistics.fmean(is_cut_off(r.text, endings) for r in replies),
        "mean_length": statistics.fmean(r.length for r in replies),
        "mean_total_reward": statistics.fmean(r.total for r in replies),
        "mean_emotion_reward": statistics.fmean(r.emotion_reward for r in replies),
        "mean_length_reward": statistics.fmean(r.length_reward for r in replies),
        "mean_gibberish_reward": statistics.fmean(r.gibberish_reward for r in replies),
    }


def diversity_figures(prompts, scored: dict, well_formed: dict | None = None, draws: int = 1) -> dict:
    """Each model's degeneration figures (diversity.diversity_report, overall and per requested emotion; with several
    draws per prompt, per draw and averaged over the draws: diversity.per_draw_report), the collapse warnings of each
    model against SFT, and the ceiling of a finite language (one reply per prompt) when it is given."""
    targets = [p.target_emotion for p in prompts]
    indices = [p.index for p in prompts]
    reports = {name: per_draw_report([r.text for r in replies], targets, indices, draws)
               for name, replies in scored.items()}
    figures = {"models": reports,
               "collapse": {name: collapse_warnings(report, reports["SFT"])
                            for name, report in reports.items() if name != "SFT"}}
    if well_formed is not None:
        counts = {e: targets[::draws].count(e) for e in sorted(set(targets))}
        figures["ceiling"] = ceiling(counts, {e: well_formed[e] for e in counts}, seed=0)
    return figures


def held_out_judges(cfg, mappings, targets, scored: dict, judged: dict | None = None) -> dict:
    """Per judge: each model's accuracy, weighted and macro F1 under it; its Cohen's kappa with the training
    classifier on SFT's replies; DPO's win rate over SFT by the judge's confidence in the requested emotion."""
    table = {}
    for judge, mapping in zip(cfg.judges, mappings):
        print(f"judging the replies with {judge.name} ...")
        probabilities = {name: judge_replies(judge.model, mapping, [r.text for r in replies], cfg.classifier_batch_size)
                         for name, replies in scored.items()}
        figures = {name: judge_figures(targets, rows) for name, rows in probabilities.items()}
        if judged is not None:  # each model's labels under the judge, for the intervals
            judged[judge.name] = {name: predicted(rows) for name, rows in probabilities.items()}
        table[judge.name] = {
            "model": judge.model,
            "models": {name: {k: v for k, v in f.items() if k != "target_confidence"} for name, f in figures.items()},
            "kappa_with_training_classifier_on_sft": agreement([r.emotion_label for r in scored["SFT"]],
                                                               predicted(probabilities["SFT"])),
            "dpo_vs_sft": win_rate(figures["DPO"]["target_confidence"], figures["SFT"]["target_confidence"],
                                   cfg.bootstrap_samples, cfg.seed),
        }
    return table


def win_rate(a_totals, b_totals, samples: int = 2000, seed: int = 0) -> dict:
    """How often model A's reply out-scores model B's on the same prompt (ties count half), with a 95 %
    percentile-bootstrap interval over prompts."""
    import numpy as np

    a, b = np.asarray(a_totals, dtype=float), np.asarray(b_totals, dtype=float)
    outcomes = (a > b) + 0.5 * (a == b)
    rng = np.random.default_rng(seed)
    resampled = outcomes[rng.integers(0, len(outcomes), size=(samples, len(outcomes)))].mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {"win_rate": float(outcomes.mean()), "ci95": [float(low), float(high)],
            "wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum())}


# ------------------------------------------------------------------ checks before any model loads

def is_evaluation_folder(folder: Path) -> bool:
    """Marked as evaluate.py's run folder, or an older one: its config.json has `dpo_adapter`, a key only evaluate
    has (files.legacy_run_script). Other keys may come and go between versions; an older evaluation folder is still
    one."""
    return run_script_of(folder) == SCRIPT


def read_well_formed(cfg, emotions: set) -> dict | None:
    if cfg.well_formed_replies is None:
        return None
    try:
        table = json.loads(Path(cfg.well_formed_replies).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PipelineError(f"{cfg.source}: key well_formed_replies: cannot read {cfg.well_formed_replies} ({e})") from None
    missing = sorted(e for e in emotions if not (isinstance(table, dict) and table.get(e)))
    if missing:
        raise PipelineError(f"{cfg.source}: key well_formed_replies: {cfg.well_formed_replies} lists no replies for "
                            f"{', '.join(missing)}; expected {{emotion: [replies]}} for every requested emotion")
    return table


def holds_results(folder: Path) -> bool:
    return any((folder / name).exists() for name in RESULT_FILES)


def prepare_output_dir(cfg, fresh: bool = False) -> FolderLock:
    """An empty folder, or one an unfinished evaluation left (its config.json, no results): never overwrite
    results silently; `fresh` moves earlier results aside. Returns the folder's lock, held until released."""
    folder = Path(cfg.output_dir)

    def check(folder: Path, started: bool) -> None:
        if holds_results(folder):
            raise PipelineError(f"{folder}: output_dir already holds results; choose another output_dir, "
                                "or pass --fresh to move them aside")

    lock = claim_run_folder(folder, SCRIPT, "evaluating", "evaluation", fresh=fresh, fresh_moves=holds_results,
                            check=check)
    try:
        save_config(cfg, folder, "config.json")
    except OSError as e:
        lock.release()
        raise PipelineError(f"{folder}: output_dir is not writable ({e.strerror})") from None
    return lock


# ------------------------------------------------------------------ generating and scoring

def sample_replies(model, tokenizer, batches, generation_config, seed: int, per_prompt: int = 1) -> list[list[tuple]]:
    """`per_prompt` replies per prompt (a prompt's draws next to each other), per batch, as (text, token ids);
    conditioned on each prompt's context ids, as generate_preferences samples and DPO trains. Batch `number` is
    sampled from seed + number, for every model (sampling noise is shared) and in whichever process samples it (the
    same replies with 1 process or N)."""
    from transformers import set_seed

    from .generation import generate_candidates

    replies = []
    for number, batch in batches:
        set_seed(seed + number)
        replies.append([reply for group in generate_candidates(model, tokenizer, [p.ids for p in batch], per_prompt,
                                                               generation_config) for reply in group])
    return replies


def drawn(prompts, per_prompt: int) -> list:
    """Each prompt once per reply drawn for it, in the order sample_replies lays the replies out."""
    return [p for p in prompts for _ in range(per_prompt)]


# ------------------------------------------------------------------ intervals over prompts

def bootstrap_interval(values_by_prompt, statistic, samples: int, seed: int) -> dict:
    """A figure and its 95 % bootstrap interval over prompts: `values_by_prompt[i]` holds what prompt i contributes
    (its replies' values), `statistic` maps the concatenated values of a resample of prompts to the figure. The
    interval is the normal one around the figure, +- 1.96 x the resamples' SD: resampling prompts with replacement
    repeats some, which biases a count of distinct replies downward, and a percentile interval would inherit that."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(values_by_prompt)
    estimate = float(statistic([v for values in values_by_prompt for v in values]))
    spread = float(np.std([statistic([v for i in rng.integers(0, n, size=n) for v in values_by_prompt[i]])
                           for _ in range(samples)]))
    return {"value": estimate, "ci95": [max(0.0, estimate - 1.96 * spread), estimate + 1.96 * spread]}  # none < 0


def worst_mean_top_share(pairs, draws: int) -> float:
    """The degeneration table's worst emotion: per requested emotion, its top share in each draw (the j-th reply of
    every prompt) averaged over the draws, then the largest over the emotions; `pairs` are (emotion, text), prompt
    by prompt with each prompt's draws next to each other."""
    from collections import Counter

    shares = {}
    for j in range(draws):
        by_emotion = {}
        for emotion, text in pairs[j::draws]:
            by_emotion.setdefault(emotion, Counter())[text.strip()] += 1
        for emotion, counts in by_emotion.items():
            shares.setdefault(emotion, []).append(max(counts.values()) / sum(counts.values()))
    return max((sum(s) / len(s) for s in shares.values()), default=0.0)


def per_draw(statistic, draws: int):
    """`statistic` of one reply per prompt, averaged over the draws: the values come prompt by prompt, each prompt's
    `draws` values next to each other, so draw j is every draws-th value from j (diversity.per_draw_report's scale)."""
    return lambda values: sum(statistic(values[j::draws]) for j in range(draws)) / draws


def per_prompt(values: list, per: int) -> list[list]:
    return [values[i:i + per] for i in range(0, len(values), per)]


def interval_figures(targets: list[str], scored: dict, judged: dict, per: int, samples: int, seed: int) -> dict:
    """Per model, the headline figures with their bootstrap intervals over prompts: emotion accuracy, each judge's
    accuracy (`judged`: judge -> model -> its predicted labels) over every reply; distinct replies and the worst
    emotion's top share per draw of one reply per prompt, averaged over the draws (the degeneration table's scale)."""
    table = {}
    for name, replies in scored.items():
        correct = per_prompt([r.emotion_label.lower() == t.lower() for r, t in zip(replies, targets)], per)
        texts = per_prompt([r.text.strip() for r in replies], per)
        pairs = per_prompt(list(zip(targets, [r.text for r in replies])), per)
        row = {"emotion_accuracy": bootstrap_interval(correct, lambda v: sum(v) / len(v), samples, seed),
               "distinct_replies": bootstrap_interval(texts, per_draw(lambda v: len(set(v)), per), samples, seed),
               "worst_top_share": bootstrap_interval(pairs, lambda v: worst_mean_top_share(v, per), samples, seed)}
        for judge, labels in judged.items():
            hits = per_prompt([label.lower() == t.lower() for label, t in zip(labels[name], targets)], per)
            row[f"judge: {judge}"] = bootstrap_interval(hits, lambda v: sum(v) / len(v), samples, seed)
        table[name] = row
    return table


def gather_scored(mine: dict[str, dict[int, list]], batches: int) -> dict[str, list] | None:
    """Every process's scored replies, by model, in prompt order, on the main process (None on the others)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    everything = gather_object([(name, number, replies) for name, by_batch in mine.items()
                                for number, replies in by_batch.items()])
    if not PartialState().is_main_process:
        return None
    merged = {name: {} for name in mine}
    for name, number, replies in everything:
        merged[name][number] = replies
    missing = [(name, n) for name in merged for n in range(batches) if n not in merged[name]]
    if missing:
        raise PipelineError(f"batch {missing[0][1]} of {missing[0][0]} was sampled by no process")
    return {name: [r for n in range(batches) for r in by_batch[n]] for name, by_batch in merged.items()}


def sampled_ids(replies, eos_token_id: int, max_new_tokens: int) -> list[list[int]]:
    """What was sampled for each reply: its ids, and the EOS that ended it unless max_new_tokens cut it first."""
    return [list(r.token_ids) + ([eos_token_id] if len(r.token_ids) < max_new_tokens else []) for r in replies]


def reply_log_probs(model, contexts: list[list[int]], replies: list[list[int]], batch_size: int) -> list[float]:
    """log p(reply | context) under the model's active adapter: the sum of the reply tokens' log-probs, conditioned
    on the context ids the reply was sampled from. Right-padded batches (positions count from each row's start)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(contexts), batch_size):
            rows = [list(c) + list(r) for c, r in zip(contexts[start:start + batch_size], replies[start:start + batch_size])]
            width = max(len(row) for row in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            for i, (context, reply) in enumerate(zip(contexts[start:start + batch_size],
                                                     replies[start:start + batch_size])):
                first = len(context) - 1  # the logit at position t predicts token t + 1
                out.append(float(logps[i, first:first + len(reply)].sum()))
    return out


def kl_to_sft(model, adapter: str | None, prompts, replies, eos_token_id: int, max_new_tokens: int,
              batch_size: int) -> dict:
    """The Monte-Carlo KL estimate of a model from SFT on its own sampled replies: the mean over prompts of
    log p_model(y|x) - log p_SFT(y|x), both through the one base (`adapter`, or adapters disabled for None, against
    "default", the SFT adapter). Exact in expectation when the replies were sampled from the model's own
    distribution (temperature 1, no top-k/top-p/repetition penalty: the demo's settings)."""
    contexts = [p.ids for p in prompts]
    ids = sampled_ids(replies, eos_token_id, max_new_tokens)
    if adapter is None:
        with model.disable_adapter():
            own = reply_log_probs(model, contexts, ids, batch_size)
    else:
        model.set_adapter(adapter)
        own = reply_log_probs(model, contexts, ids, batch_size)
    model.set_adapter("default")
    sft = reply_log_probs(model, contexts, ids, batch_size)
    differences = [a - b for a, b in zip(own, sft)]
    return {"kl": statistics.fmean(differences), "sd": statistics.stdev(differences) if len(differences) > 1 else 0.0,
            "mean_log_prob": statistics.fmean(own), "mean_sft_log_prob": statistics.fmean(sft)}


def evaluate(cfg, fresh: bool = False) -> dict | None:
    """Under `accelerate launch` / torchrun each process samples and scores every N-th batch of prompts
    (distributed.shard); the main process holds the run folder's lock, gathers them and writes the results. Returns them
    there, None elsewhere."""
    from .distributed import process_state
    from .generation import checked_generation_config
    from .models import check_adapter_path

    # ---- everything checked before any model weights load
    state = process_state()
    check_adapter_path(cfg.adapter, "adapter", cfg.source)
    check_adapter_path(cfg.dpo_adapter, "dpo_adapter", cfg.source)
    generation_config = checked_generation_config(cfg.generation, cfg.source)
    tokenizer, prompts = load_prompts(cfg)
    well_formed = read_well_formed(cfg, {p.target_emotion for p in prompts})
    judge_mappings = check_judges(cfg)
    lock, folder = None, Path(cfg.output_dir)
    try:
        if state.is_main_process:
            lock = prepare_output_dir(cfg, fresh)  # one writer, to the end
        state.wait_for_everyone()  # (a refused output_dir ends the main process; the launcher then stops the rest)
        return _evaluate(cfg, state, folder, tokenizer, prompts, generation_config, well_formed,
                         judge_mappings)
    finally:
        if lock is not None:
            lock.release()


def _evaluate(cfg, state, folder: Path, tokenizer, prompts, generation_config, well_formed,
              judge_mappings) -> dict | None:
    from .generation import Scorer
    from .models import add_adapter, load_generator
    from .tracking import start_wandb

    run = None
    if state.is_main_process:
        print(f"{len(prompts)} prompts from {cfg.dataset} split {cfg.dataset_split!r}")
        run = start_wandb(cfg.wandb, "evaluate", to_dict(cfg), folder)
    batches = prompt_batches(prompts, cfg.batch_prompts)
    mine = shard(batches, state.process_index, state.num_processes)
    if state.num_processes > 1:
        print(f"process {state.process_index}: {sum(len(b) for _, b in mine)} of {len(prompts)} prompts")

    # ---- one base in memory carrying both adapters; the bare base is the same model with adapters disabled
    model, tokenizer = load_generator(cfg)
    add_adapter(model, cfg.dpo_adapter, "dpo", cfg.source)
    scorer = Scorer(cfg, tokenizer)
    targets = [p.target_emotion for p in prompts]
    scored_here, adapters = {}, {}
    for name, adapter in [("SFT", "default"), ("DPO", "dpo")] + ([("base", None)] if cfg.include_base else []):
        adapters[name] = adapter
        if state.is_main_process:
            print(f"sampling {len(prompts)} replies from {name} ...")
        k = cfg.replies_per_prompt
        if adapter is None:
            with model.disable_adapter():
                replies = sample_replies(model, tokenizer, mine, generation_config, cfg.seed, k)
        else:
            model.set_adapter(adapter)
            replies = sample_replies(model, tokenizer, mine, generation_config, cfg.seed, k)
        # scored batch by batch, as every process count scores them: the classifiers' batches are the same too
        scored_here[name] = {number: scorer.score(batch_replies, [p.target_emotion for p in drawn(batch, k)])
                             for (number, batch), batch_replies in zip(mine, replies)}
    scored = gather_scored(scored_here, len(batches))
    if scored is None:
        return None
    sampled_prompts, prompts = prompts, drawn(prompts, cfg.replies_per_prompt)  # from here on: one per reply
    targets = [p.target_emotion for p in prompts]

    max_new_tokens = generation_config.max_new_tokens
    kl = {name: kl_to_sft(model, adapter, prompts, scored[name], tokenizer.eos_token_id, max_new_tokens,
                          cfg.batch_prompts) for name, adapter in adapters.items() if name != "SFT"}

    # ---- compare, report
    results = {
        "setup": {"prompts": len(sampled_prompts), "replies_per_prompt": cfg.replies_per_prompt,
                  "dataset": cfg.dataset, "dataset_split": cfg.dataset_split,
                  "seed": cfg.seed, "base_model": cfg.base_model,
                  "sources": {"SFT": cfg.adapter, "DPO": cfg.dpo_adapter,
                              **({"base": cfg.base_model} if cfg.include_base else {})}},
        "models": {name: model_metrics(targets, replies, cfg.clean_confidence, cfg.complete_endings,
                                       cfg.emotion_labels)
                   for name, replies in scored.items()},
        "dpo_vs_sft": win_rate([r.total for r in scored["DPO"]], [r.total for r in scored["SFT"]],
                               cfg.bootstrap_samples, cfg.seed),
        "diversity": diversity_figures(prompts, scored, well_formed, cfg.replies_per_prompt),
        "kl_to_sft": kl,
        "judges": held_out_judges(cfg, judge_mappings, targets, scored, judged := {}),
    }
    results["intervals"] = interval_figures(targets, scored, judged, cfg.replies_per_prompt, cfg.bootstrap_samples,
                                            cfg.seed)
    write_results(folder, results, prompts, scored)
    print(format_table(results))
    print(f"wrote {', '.join(RESULT_FILES)} to {folder}")
    if run is not None:
        import wandb

        models = list(results["models"])
        rows = [[label.strip()] + [results["models"][m][key] for m in models] for key, label in METRIC_ROWS]
        run.log({"results": wandb.Table(columns=["metric", *models], data=rows)})
        run.summary.update({f"{m}/{key}": results["models"][m][key] for m in models for key, _ in METRIC_ROWS})
        run.summary.update({"dpo_vs_sft/win_rate": results["dpo_vs_sft"]["win_rate"],
                            "dpo_vs_sft/ci95_low": results["dpo_vs_sft"]["ci95"][0],
                            "dpo_vs_sft/ci95_high": results["dpo_vs_sft"]["ci95"][1]})
        run.finish()
    return results


# ------------------------------------------------------------------ reporting

def format_table(results: dict) -> str:
    models = list(results["models"])
    lines = ["| metric | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for key, label in METRIC_ROWS:
        cells = [f"{results['models'][m][key]:.3f}" for m in models]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    emotions = sorted({e for m in models for e in results["models"][m]["per_emotion_accuracy"]})
    lines += ["", "| accuracy by requested emotion | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for emotion in emotions:
        cells = [f"{results['models'][m]['per_emotion_accuracy'].get(emotion, float('nan')):.3f}" for m in models]
        lines.append(f"| {emotion} | " + " | ".join(cells) + " |")
    if results.get("intervals"):
        lines += ["", format_intervals(results["intervals"])]
    lines += ["", format_diversity(results["diversity"]), ""]
    lines += [f"KL to SFT of {name} (mean log p_{name}(y|x) - log p_SFT(y|x) over its own replies): {k['kl']:.3f} "
              f"nats (SD {k['sd']:.3f})" for name, k in results.get("kl_to_sft", {}).items()]
    if results.get("judges"):
        lines += ["", format_judges(results["judges"])]
    w = results["dpo_vs_sft"]
    lines += ["", f"DPO vs SFT win rate by total reward: {w['win_rate']:.3f} "
                  f"(95 % bootstrap interval {w['ci95'][0]:.3f}-{w['ci95'][1]:.3f}; "
                  f"{w['wins']} wins, {w['ties']} ties, {w['losses']} losses)"]
    return "\n".join(lines)


def format_intervals(intervals: dict) -> str:
    """The headline figures with their 95 % bootstrap intervals over prompts."""
    models = list(intervals)
    lines = ["| with its 95 % interval over prompts | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for key in intervals[models[0]]:
        fmt = "{:.0f}" if key == "distinct_replies" else "{:.3f}"
        cells = [f"{fmt.format(f['value'])} ({fmt.format(f['ci95'][0])}-{fmt.format(f['ci95'][1])})"
                 for f in (intervals[m][key] for m in models)]
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_judges(judges: dict) -> str:
    """Each held-out judge's figures per model, its agreement with the training classifier, its win rate."""
    lines = []
    for name, j in judges.items():
        models = list(j["models"])
        w = j["dpo_vs_sft"]
        lines += [f"Held-out judge **{name}** (`{j['model']}`; Cohen's kappa with the training classifier on SFT's "
                  f"replies: {j['kappa_with_training_classifier_on_sft']:.3f}):", "",
                  "| under the judge | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
        for key, label in (("emotion_accuracy", "emotion accuracy"), ("emotion_weighted_f1", "emotion weighted F1"),
                           ("emotion_macro_f1", "emotion macro-F1"),
                           ("mean_target_confidence", "confidence in the requested emotion")):
            lines.append(f"| {label} | " + " | ".join(f"{j['models'][m][key]:.3f}" for m in models) + " |")
        lines += ["", f"DPO vs SFT win rate by {name}'s confidence in the requested emotion: {w['win_rate']:.3f} "
                      f"(95 % bootstrap interval {w['ci95'][0]:.3f}-{w['ci95'][1]:.3f})", ""]
    return "\n".join(lines).rstrip()


def format_diversity(figures: dict) -> str:
    """Degeneration figures per model, per requested emotion, the ceiling and the collapse warnings (markdown)."""
    reports = figures["models"]
    models = list(reports)
    ceiling_column = "ceiling" in figures
    head = models + (["ceiling (uniform over well-formed replies)"] if ceiling_column else [])
    lines = ["| degeneration | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]
    for key, label, fmt in DIVERSITY_ROWS:
        cells = [fmt.format(reports[m][key]) for m in models]
        if ceiling_column:
            cells.append(f"{figures['ceiling']['expected_distinct_replies']:.1f}" if key == "distinct_replies" else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| requested emotion (prompts) | " + " | ".join(f"{m}: distinct / most frequent share" for m in models)
              + (" | ceiling: distinct / most frequent share |" if ceiling_column else " |"),
              "| --- |" + " --- |" * (len(models) + ceiling_column)]
    for emotion, row in reports[models[0]]["by_group"].items():
        cells = [f"{reports[m]['by_group'][emotion]['distinct_replies']} / "
                 f"{reports[m]['by_group'][emotion]['most_frequent_share']:.3f}" for m in models]
        if ceiling_column:
            c = figures["ceiling"]["by_group"][emotion]
            w, n = c["well_formed"], c["prompts"]
            cells.append(f"{w * (1 - (1 - 1 / w) ** n):.1f} / {c['expected_most_frequent_share']:.3f}")
        lines.append(f"| {emotion} ({row['replies']}) | " + " | ".join(cells) + " |")
    lines.append("")
    for name, reasons in figures["collapse"].items():
        lines.append(f"**COLLAPSE WARNING, {name}**: " + "; ".join(reasons) if reasons else
                     f"{name}: no collapse warning (thresholds in docs/evaluation.md, 'Collapse warning').")
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> None:
    plt = pyplot()

    keys = ["emotion_accuracy", "emotion_macro_f1", "clean_rate", "cutoff_rate"]
    models = list(results["models"])
    fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        ax.bar([k + i * width for k in range(len(keys))], [results["models"][m][k] for k in keys], width, label=m)
    ax.set_xticks([k + width * (len(models) - 1) / 2 for k in range(len(keys))])
    ax.set_xticklabels([k.replace("_", " ") for k in keys])
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{results['models'][models[0]]['prompts']} held-out prompts")
    reports = results["diversity"]["models"]
    shares = ["distinct_share", "distinct_1", "distinct_2", "canned_share", "most_frequent_share"]
    for i, m in enumerate(models):
        right.bar([k + i * width for k in range(len(shares))], [reports[m][k] for k in shares], width, label=m)
    right.set_xticks([k + width * (len(models) - 1) / 2 for k in range(len(shares))])
    right.set_xticklabels(["distinct\nreplies", "distinct-1", "distinct-2", "canned\nshare", "most frequent\nshare"])
    right.set_ylim(0, 1)
    right.legend()
    right.set_title("degeneration (shares of replies)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(folder: Path, results: dict, prompts, scored: dict) -> None:
    (folder / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    setup = results["setup"]
    sources = "\n".join(f"- {name}: `{where}`" for name, where in setup["sources"].items())
    per = setup.get("replies_per_prompt", 1)
    header = (f"# SFT vs DPO\n\n{setup['prompts']} prompts from `{setup['dataset']}` split `{setup['dataset_split']}`, "
              f"{'one reply' if per == 1 else f'{per} replies'} each per model, sampled with seed {setup['seed']}."
              f"\n\n{sources}\n\n")
    (folder / RESULTS_MD).write_text(header + format_table(results) + "\n")
    with open(folder / REPLIES, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):  # a line per reply drawn (several per prompt: same index)
            row = {"index": prompt.index, "target_emotion": prompt.target_emotion, "prompt": prompt.text,
                   "prompt_ids": prompt.ids}
            for name, replies in scored.items():
                row[name] = replies[i].to_dict()
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    plot_results(results, folder / RESULTS_PNG)
