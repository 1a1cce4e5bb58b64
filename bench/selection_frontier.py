"""Selection rules side by side over seeds: two-iteration demo pipelines, the last iteration's figures as mean and
range over the seeds (generate and DPO seeds together; evaluation keeps its own seed, so every run is judged on the
same draws of the same prompts).

    python bench/selection_frontier.py --out bench/selection_frontier                      # every setting, 3 seeds
    python bench/selection_frontier.py --out bench/selection_frontier --settings reference cap10_resample2

Each run is `run_pipeline.py --config args/demo/pipeline_arg.json` in outputs/selection_frontier/SETTING-sSEED
(resumed when it is there: a finished run is read, not run again). Writes OUT/results.json and OUT/results.md:
emotion accuracy, the held-out judge's accuracy, distinct replies (and as a share of SFT's and of the ceiling), the
worst emotion's top share, canned share, KL to SFT, the collapse warning, and the run's wall time on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (42, 1, 7)
REPLIES_PER_PROMPT = 4  # the demo's evaluation draws (docs/configuration.md, replies_per_prompt)

# setting -> run_pipeline overrides, on top of REFERENCE: the demo config with the reference's selection rule and the
# demo's settings before issue 31 (1 DPO epoch, each iteration on its own pairs). The demo's default now is
# cap10_resample2_e2_accumulate.
REFERENCE = ["generate.chosen_text_cap=null", "generate.min_distinct_passing=1", "generate.chosen_rule=\"best\"",
             "generate.rejected_rule=\"worst\"", "generate.length_rule=\"reference\"", "dpo.dpo.num_train_epochs=1",
             "accumulate_pairs=false"]
CAP10_RESAMPLE2 = ["generate.chosen_text_cap=0.1", "generate.min_distinct_passing=2"]
FLAT = ["generate.length_rule=\"flat_above_max\""]
SETTINGS = {
    "reference": [],
    "cap10_resample2": CAP10_RESAMPLE2,
    "cap10_resample2_e2": [*CAP10_RESAMPLE2, "dpo.dpo.num_train_epochs=2"],
    "cap20_resample2_e2": ["generate.chosen_text_cap=0.2", "generate.min_distinct_passing=2",
                           "dpo.dpo.num_train_epochs=2"],
    "rarest_e2": ["generate.chosen_rule=\"rarest\"", "dpo.dpo.num_train_epochs=2"],
    "flat_e2": [*FLAT, "dpo.dpo.num_train_epochs=2"],
    "flat_cap10_resample2_e2": [*FLAT, *CAP10_RESAMPLE2, "dpo.dpo.num_train_epochs=2"],
    "flat_cap20_resample2_e2": [*FLAT, "generate.chosen_text_cap=0.2", "generate.min_distinct_passing=2",
                                "dpo.dpo.num_train_epochs=2"],
    "cap10_resample2_e3": [*CAP10_RESAMPLE2, "dpo.dpo.num_train_epochs=3"],
    "cap10_resample3_e2_accumulate": ["generate.chosen_text_cap=0.1", "generate.min_distinct_passing=3",
                                      "dpo.dpo.num_train_epochs=2", "accumulate_pairs=true"],
    "cap10_resample2_e2_accumulate": [*CAP10_RESAMPLE2, "dpo.dpo.num_train_epochs=2", "accumulate_pairs=true"],
}


def finished(folder: Path) -> bool:
    """The pipeline's last stage is marked finished (iterations.json is rewritten after every iteration)."""
    return (folder / f"iter-{ITERATION}" / "evaluation.done.json").exists()


def run(setting: str, seed: int, folder: Path, overrides: list[str]) -> float | None:
    """Run (or resume) one pipeline; its wall time in seconds, None when it was already finished."""
    if finished(folder):
        return None
    sets = [f"output_dir={folder.relative_to(ROOT)}", f"generate.seed={seed}", f"dpo.seed={seed}",
            f"evaluate.replies_per_prompt={REPLIES_PER_PROMPT}", "evaluate.include_base=false", *REFERENCE, *overrides]
    command = [sys.executable, "run_pipeline.py", "--config", "args/demo/pipeline_arg.json"]
    for override in sets:
        command += ["--set", override]
    started = time.monotonic()
    with open(folder.with_suffix(".log"), "a") as log:
        subprocess.run(command, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.monotonic() - started


ITERATION = 2  # the frontier's iteration (a run extended to 3 for the stretch goal is read at 2 too)


def last_iteration(folder: Path) -> dict:
    results = json.loads((folder / f"iter-{ITERATION}" / "evaluation" / "results.json").read_text())
    intervals = results["intervals"]
    judge = next(key for key in intervals["DPO"] if key.startswith("judge: "))
    diversity = results["diversity"]
    statistics_file = folder / f"iter-{ITERATION}" / "preferences/statistics.json"
    pairs = json.loads(statistics_file.read_text())
    return {
        "emotion_accuracy": intervals["DPO"]["emotion_accuracy"]["value"],
        "emotion_accuracy_ci95": intervals["DPO"]["emotion_accuracy"]["ci95"],
        "judge_accuracy": intervals["DPO"][judge]["value"],
        "judge_accuracy_ci95": intervals["DPO"][judge]["ci95"],
        "sft_judge_accuracy": intervals["SFT"][judge]["value"],
        "distinct_replies": diversity["models"]["DPO"]["distinct_replies"],
        "sft_distinct_replies": diversity["models"]["SFT"]["distinct_replies"],
        "ceiling_distinct_replies": diversity["ceiling"]["expected_distinct_replies"],
        # the degeneration table's (and the collapse rule's) worst emotion: its top share averaged over the draws
        "worst_top_share": max(g["most_frequent_share"] for g in diversity["models"]["DPO"]["by_group"].values()),
        "canned_share": diversity["models"]["DPO"]["canned_share"],
        "kl_to_sft": results["kl_to_sft"]["DPO"]["kl"],
        "collapse_warning": bool(diversity["collapse"]["DPO"]),
        "pairs_last_iteration": pairs["accepted"],
        "rounds_per_prompt_last_iteration": pairs["rounds_per_prompt"]["mean"],
    }


FIGURES = ("emotion_accuracy", "judge_accuracy", "distinct_replies", "distinct_of_ceiling", "distinct_of_sft",
           "worst_top_share", "canned_share", "kl_to_sft", "pairs_last_iteration", "rounds_per_prompt_last_iteration",
           "seconds")


def summary(runs: list[dict]) -> dict:
    table = {}
    for figure in FIGURES:
        values = [r[figure] for r in runs if r.get(figure) is not None]
        if values:
            table[figure] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    table["collapse_warnings"] = sum(r["collapse_warning"] for r in runs)
    table["seeds"] = len(runs)
    return table


def markdown(table: dict, machine: str) -> str:
    def cell(row, figure, fmt):
        if figure not in row:
            return "-"
        f = row[figure]
        return f"{fmt.format(f['mean'])} ({fmt.format(f['min'])}-{fmt.format(f['max'])})"

    lines = [f"Iteration {ITERATION} of `bash demo.sh`'s pipeline per setting, mean (range) over the seeds (generate and "
             f"DPO seeds together); evaluation draws {REPLIES_PER_PROMPT} replies per prompt under its own seed 42. "
             "Made by `python bench/selection_frontier.py --out bench/selection_frontier --seeds 42 1 7 --settings "
             "...` (each setting's overrides: `SETTINGS` in the script). Distinct replies and the worst emotion's top "
             "share are per draw of one reply per prompt, averaged over the draws; the ceiling (a model answering "
             "uniformly among the demo world's well-formed replies of the requested emotion) keeps 127.3. Rounds per "
             "prompt and pairs: iteration 2's preference data. Minutes per run: wall time of the whole pipeline "
             "while other jobs shared the 2 cores (load 2-9), so compare costs by rounds per prompt, not minutes. "
             f"Machine: {machine}.", "",
             "| setting | seeds | emotion accuracy | held-out judge accuracy | distinct replies | of the ceiling | "
             "of SFT's | worst emotion's top share | canned share | KL to SFT | pairs (iteration 2) | rounds per "
             "prompt | warnings | minutes per run |", "| --- |" + " --- |" * 13]
    for setting, row in table.items():
        minutes = ({k: v / 60 for k, v in row["seconds"].items()} if "seconds" in row else None)
        lines.append(
            f"| {setting} | {row['seeds']} | {cell(row, 'emotion_accuracy', '{:.3f}')} | "
            f"{cell(row, 'judge_accuracy', '{:.3f}')} | {cell(row, 'distinct_replies', '{:.0f}')} | "
            f"{cell(row, 'distinct_of_ceiling', '{:.0%}')} | {cell(row, 'distinct_of_sft', '{:.0%}')} | "
            f"{cell(row, 'worst_top_share', '{:.3f}')} | {cell(row, 'canned_share', '{:.3f}')} | "
            f"{cell(row, 'kl_to_sft', '{:.2f}')} | {cell(row, 'pairs_last_iteration', '{:.0f}')} | "
            f"{cell(row, 'rounds_per_prompt_last_iteration', '{:.2f}')} | {row['collapse_warnings']} of {row['seeds']} | "
            + (f"{minutes['mean']:.1f} ({minutes['min']:.1f}-{minutes['max']:.1f}) |" if minutes else "- |"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--runs", default="outputs/selection_frontier", help="where the pipeline runs go")
    parser.add_argument("--out", required=True)
    parser.add_argument("--report-only", action="store_true", help="read the finished runs, run nothing")
    args = parser.parse_args(argv)
    runs_dir, out = Path(args.runs), Path(args.out)  # relative to the checkout: the configs name the same paths
    (ROOT / runs_dir).mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    seconds = {**earlier.get("seconds", {})}
    table, runs = {}, {}
    for setting in args.settings:
        for seed in args.seeds:
            folder = ROOT / runs_dir / f"{setting}-s{seed}"
            name = folder.name
            if not args.report_only:
                print(f"== {name}", flush=True)
                took = run(setting, seed, folder, SETTINGS[setting])
                if took is not None:
                    seconds[name] = took
            if not finished(folder):
                continue
            figures = last_iteration(folder)
            figures["distinct_of_ceiling"] = figures["distinct_replies"] / figures["ceiling_distinct_replies"]
            figures["distinct_of_sft"] = figures["distinct_replies"] / figures["sft_distinct_replies"]
            figures["seconds"] = seconds.get(name)
            runs[name] = figures
            print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in figures.items() if not k.endswith("ci95")), flush=True)
        mine = [runs[f"{setting}-s{seed}"] for seed in args.seeds if f"{setting}-s{seed}" in runs]
        if mine:
            table[setting] = summary(mine)
    machine = f"{platform.node()}, {platform.processor() or platform.machine()}, 2 cores"
    (out / "results.json").write_text(json.dumps({"machine": machine, "seeds": args.seeds, "settings": SETTINGS,
                                                  "runs": runs, "table": table, "seconds": seconds}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(table, machine))
    print(markdown(table, machine))


if __name__ == "__main__":
    main()
