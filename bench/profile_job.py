"""Where the whole job's time goes on the demo world: generate_preferences, fine_tune_dpo, evaluate, as demo.sh
runs them (the demo configs, one process per stage), each stage timed from the inside too.

    python bench/profile_job.py                       # one job, demo world, CPU; a table and one JSON line
    python bench/profile_job.py --repeats 2           # the whole job twice, one after the other (shared CPU)

Each stage runs in its own process, like the scripts, through the scripts' own functions; the process clocks
its start (imports, model loading) and its work:
- generate: every `CandidateSampler.sample` call (one round for up to batch_prompts prompts), split into
  `generate_candidates` and `Scorer.score`; "per round" = the sampling time over the mean rounds per prompt
  of the run's statistics.json, i.e. one round of every prompt;
- DPO: each epoch's training (on_epoch_begin to on_epoch_end) and the held-out evaluation after it;
- evaluate: each model's sampling and scoring.
The demo world is built first (not timed: it is made once). Shares are of the sum of the three processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "dpo", "evaluate")


def clocked(owner, name: str, log: list):
    """Replace owner.name by a wrapper appending its seconds (and a size, if any) to `log`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = original(*args, **kwargs)
        log.append(time.perf_counter() - started)
        return result

    setattr(owner, name, wrapper)


def stage_generate(run: Path) -> dict:
    from emotion_dpo import generate, generation
    from emotion_dpo.config import GenerateConfig, load_config

    rounds, candidates, score = [], [], []
    clocked(generation.CandidateSampler, "sample", rounds)
    clocked(generation, "generate_candidates", candidates)  # CandidateSampler.sample looks it up in the module
    clocked(generation.Scorer, "score", score)
    cfg = load_config(GenerateConfig, str(ROOT / "args/demo/generate_preferences_arg.json"),
                      [f"output_dir={run / 'preferences'}"])
    started = time.perf_counter()
    generate.generate(cfg)
    work = time.perf_counter() - started
    stats = json.loads((run / "preferences/statistics.json").read_text())
    mean_rounds = stats["rounds_per_prompt"]["mean"]
    return {"work_s": work, "sample_calls": len(rounds), "sampling_s": sum(rounds),
            "generate_candidates_s": sum(candidates), "scoring_s": sum(score),
            "prompts": cfg.num_prompts, "mean_rounds_per_prompt": mean_rounds,
            "rounds_histogram": stats["rounds_per_prompt"]["histogram"],
            "seconds_per_round_of_all_prompts": sum(rounds) / mean_rounds}


def stage_dpo(run: Path) -> dict:
    from transformers import TrainerCallback

    from emotion_dpo import dpo_train
    from emotion_dpo.config import TrainConfig, load_config

    marks = []

    class Marks(TrainerCallback):
        def on_epoch_begin(self, *a, **k):
            marks.append(("epoch_begin", time.perf_counter()))

        def on_epoch_end(self, *a, **k):
            marks.append(("epoch_end", time.perf_counter()))

        def on_evaluate(self, *a, **k):
            marks.append(("evaluated", time.perf_counter()))

        def on_train_end(self, *a, **k):
            marks.append(("train_end", time.perf_counter()))

    make_trainer = dpo_train.make_trainer

    def with_marks(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.add_callback(Marks())
        return trainer

    dpo_train.make_trainer = with_marks
    cfg = load_config(TrainConfig, str(ROOT / "args/demo/dpo_arg.json"),
                      [f"dataset={run / 'preferences/dataset'}", f"output_dir={run / 'dpo'}"])
    started = time.perf_counter()
    metrics = dpo_train.train(cfg)
    work = time.perf_counter() - started
    epochs, evals = [], []
    for (kind, t), (next_kind, t_next) in zip(marks, marks[1:]):
        if kind == "epoch_begin" and next_kind == "epoch_end":
            epochs.append(t_next - t)
        if kind == "epoch_end" and next_kind == "evaluated":
            evals.append(t_next - t)
    losses = [e["loss"] for e in metrics["train"] if "loss" in e]
    return {"work_s": work, "epoch_s": epochs, "eval_after_epoch_s": evals,
            "train_samples_per_second": next((e["train_samples_per_second"] for e in metrics["train"]
                                              if "train_samples_per_second" in e), None),
            "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
            "loss_type": cfg.dpo.get("loss_type", "sigmoid"),
            "eval_rewards_accuracies": metrics.get("eval", {}).get("eval_rewards/accuracies")}


def stage_evaluate(run: Path) -> dict:
    from emotion_dpo import evaluation
    from emotion_dpo.config import EvaluateConfig, load_config

    sampling = []
    clocked(evaluation, "sample_replies", sampling)
    cfg = load_config(EvaluateConfig, str(ROOT / "args/demo/evaluate_arg.json"),
                      [f"dpo_adapter={run / 'dpo/final_adapter'}", f"output_dir={run / 'evaluation'}"])
    started = time.perf_counter()
    results = evaluation.evaluate(cfg)
    work = time.perf_counter() - started
    return {"work_s": work, "sampling_per_model_s": sampling, "prompts": results["setup"]["prompts"],
            "emotion_accuracy": {m: v["emotion_accuracy"] for m, v in results["models"].items()
                                 if "emotion_accuracy" in v}}


def child(stage: str, run: Path, process_start: float) -> None:
    sys.path.insert(0, str(ROOT))
    entered = time.time()
    figures = {"generate": stage_generate, "dpo": stage_dpo, "evaluate": stage_evaluate}[stage](run)
    figures["start_s"] = entered - process_start  # interpreter start to here (before the stage's imports)
    print("PROFILE " + json.dumps({"stage": stage, **figures}), flush=True)


def run_stage(stage: str, run: Path) -> dict:
    started = time.time()
    process = subprocess.run([sys.executable, __file__, "--stage", stage, "--run", str(run),
                              "--process-start", repr(started)], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - started
    lines = [line for line in process.stdout.splitlines() if line.startswith("PROFILE ")]
    if process.returncode != 0 or not lines:
        sys.exit(f"{stage} failed ({process.returncode}):\n{process.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("PROFILE "):]), "wall_s": wall}


def table(jobs: list[dict]) -> str:
    rows = ["| stage | " + " | ".join(f"job {i + 1}: s (share)" for i in range(len(jobs))) + " |",
            "| --- |" + " --- |" * len(jobs)]

    def row(label, values):
        rows.append(f"| {label} | " + " | ".join(values) + " |")

    totals = [sum(job[s]["wall_s"] for s in STAGES) for job in jobs]
    for stage in STAGES:
        row(f"**{stage}** (process wall)", [f"{job[stage]['wall_s']:.1f} ({job[stage]['wall_s'] / total:.0%})"
                                            for job, total in zip(jobs, totals)])
        row("— process start and imports, before the stage's function", [f"{job[stage]['wall_s'] - work(job, stage):.1f}"
                                                                           for job in jobs])
        if stage == "generate":
            row("— sampling rounds (generate + score)", [f"{job[stage]['sampling_s']:.1f}" for job in jobs])
            row("— per round of all prompts", [f"{job[stage]['seconds_per_round_of_all_prompts']:.2f} "
                                               f"({job[stage]['mean_rounds_per_prompt']:.2f} rounds/prompt)"
                                               for job in jobs])
        if stage == "dpo":
            row("— per epoch (training)", [" / ".join(f"{t:.1f}" for t in job[stage]["epoch_s"]) for job in jobs])
            row("— held-out evaluation after each epoch", [" / ".join(f"{t:.1f}" for t in job[stage]["eval_after_epoch_s"])
                                                           for job in jobs])
        if stage == "evaluate":
            row("— sampling per model", [" / ".join(f"{t:.1f}" for t in job[stage]["sampling_per_model_s"])
                                         for job in jobs])
    row("**job** (sum)", [f"{t:.1f}" for t in totals])
    return "\n".join(rows)


def work(job: dict, stage: str) -> float:
    return job[stage]["work_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="whole jobs, one after the other")
    parser.add_argument("--run", help="folder for the runs (default: a new one under outputs/profile/)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--process-start", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        child(args.stage, Path(args.run), args.process_start)
        return
    folder = Path(args.run or ROOT / "outputs/profile" / time.strftime("%Y%m%d-%H%M%S"))
    subprocess.run([sys.executable, "-m", "emotion_dpo.demo_world"], cwd=ROOT, check=True, capture_output=True)
    jobs, loads = [], []
    for i in range(args.repeats):
        run = folder / f"job-{i + 1}"
        loads.append(os.getloadavg()[0])
        jobs.append({stage: run_stage(stage, run) for stage in STAGES})
        loads[-1] = [loads[-1], os.getloadavg()[0]]
    print(table(jobs))
    shares = {s: [job[s]["wall_s"] / sum(job[t]["wall_s"] for t in STAGES) for job in jobs] for s in STAGES}
    print(json.dumps({"jobs": jobs, "shares": shares,
                      "share_spread": {s: [min(v), max(v)] for s, v in shares.items()},
                      "load_average_1m_before_after": loads, "cpu_threads": os.cpu_count(),
                      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      "mean_share": {s: statistics.fmean(v) for s, v in shares.items()}}))


if __name__ == "__main__":
    main()
