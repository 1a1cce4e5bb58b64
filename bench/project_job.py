"""The reference workload's wall time projected from measured figures, against the reference's 12 h 4 min for
generation alone (2048 prompts on one RTX 3090).

    python bench/project_job.py --results $OUT/results.jsonl --statistics outputs/profile/job-1/preferences/statistics.json

Inputs, each read from a measured line (the projection says which it is missing):
- generation: `generation_speed.py`'s batched_seconds_for_2048_prompts (one round of 2048 prompts x 6 candidates),
  times the mean rounds per prompt of a demo run's statistics.json (its retries: rounds are batched like first
  rounds, so the work is rounds x prompts);
- DPO: `dpo_throughput.py`'s pairs/s for the default settings (batch2-accum8) and for the fastest candidate whose
  first loss is ln 2 and peak at most 20 GB, times 2048 pairs x 3 epochs (the held-out 5 % counted as if
  trained: an upper bound); without those lines, `dpo_memory.py`'s adapter design with the copies trained
  (batch 2 of pairs filling max_length: slower than real pairs, so an upper bound too);
- evaluation: at most one 6-candidate round's time for 2048 prompts, scaled to 1000 prompts x 2 models with one
  reply each (args/evaluate_arg.json): an upper bound, since a prompt with one candidate costs less than with six.
Model loading and start-up are left out (seconds to a minute per script).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REFERENCE_GENERATION_S = 12 * 3600 + 4 * 60
PAIRS, EPOCHS, EVAL_PROMPTS, EVAL_MODELS = 2048, 3, 1000, 2


def lines(path: Path) -> list[dict]:
    found = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def lever_ratio_of(path: Path) -> dict | None:
    """all-levers / trl-path pairs/s of a dpo_throughput.py run (its side-by-side lines), or None; with --repeats,
    the median of the rounds' ratios (each round's two candidates ran back to back)."""
    import statistics

    rounds: dict[int, dict] = {}
    for r in lines(path):
        if r.get("pairs_per_s") and not r.get("failed"):
            rounds.setdefault(r.get("repeat", 1), {})[r["candidate"]] = r
    ratios = [row["all-levers"]["pairs_per_s"] / row["trl-path"]["pairs_per_s"]
              for row in rounds.values() if "all-levers" in row and "trl-path" in row]
    if not ratios:
        return None
    device = next(row["all-levers"].get("device") for row in rounds.values() if "all-levers" in row)
    return {"ratio": statistics.median(ratios), "rounds": [round(r, 3) for r in ratios], "measured_in": str(path),
            "device": device}


def project(results: list[dict], mean_rounds: float | None, lever_ratio: dict | None = None) -> dict:
    generation = next((r for r in reversed(results) if r.get("batched_seconds_for_2048_prompts")
                       and r.get("use_unsloth", "False") in ("False", "false", False)), None)
    candidates = [r for r in results if r.get("candidate") and not r.get("failed") and r.get("pairs_per_s")]
    # args/dpo_arg.json's settings: batch2-accum8 before issue 23; its levers' "all-levers" since (TRL's path is
    # "trl-path"); the lever lines are measured at realistic lengths
    default = next((r for r in candidates if r["candidate"] == "all-levers"), None) or next(
        (r for r in candidates if r["candidate"] in ("batch2-accum8", "trl-path")), None)
    if default is None:  # dpo_memory.py's line for the default design: batch 2, pairs filling max_length (slower)
        memory = next((r for r in results if r.get("design") == "adapter" and r.get("train_modules_to_save")
                       and not r.get("unsloth") and r.get("mean_step_seconds")), None)
        if memory:
            default = {"candidate": f"dpo_memory.py adapter, batch {memory['batch']}, pairs filling max_length "
                                    f"{memory['max_length']}", "pairs_per_s": memory["batch"] / memory["mean_step_seconds"],
                       "device": memory.get("device")}
    same_start = [r for r in candidates if r.get("first_loss") is not None
                  and abs(r["first_loss"] - math.log(2)) < 0.01 and r.get("peak_memory_gib", 99) <= 20 / 1.073741824]
    fastest = max(same_start, key=lambda r: r["pairs_per_s"], default=None)
    out = {"mean_rounds_per_prompt": mean_rounds, "missing": []}
    if generation and mean_rounds:
        round_s = generation["batched_seconds_for_2048_prompts"]
        out["generation_s"] = round_s * mean_rounds
        out["evaluation_at_most_s"] = round_s * EVAL_PROMPTS * EVAL_MODELS / 2048
        out["generation_device"] = generation.get("device")
    else:
        out["missing"].append("generation line or mean rounds")
    for name, row in (("dpo_default", default), ("dpo_fastest", fastest)):
        if row:
            out[f"{name}_s"] = PAIRS * EPOCHS / row["pairs_per_s"]
            out[f"{name}_candidate"] = row["candidate"]
            out[f"{name}_device"] = row.get("device")
        else:
            out["missing"].append(name)
    if lever_ratio and "dpo_default_s" in out and not str(out.get("dpo_default_candidate")).startswith("all-levers"):
        # the GPU's TRL-path figure scaled by a side-by-side ratio measured elsewhere: a projection, labelled so
        out["dpo_levers_s"] = out["dpo_default_s"] / lever_ratio["ratio"]
        out["dpo_levers_from"] = lever_ratio
    for name in ("dpo_default", "dpo_fastest", "dpo_levers"):
        if "generation_s" in out and f"{name}_s" in out:
            total = out["generation_s"] + out[f"{name}_s"] + out["evaluation_at_most_s"]
            out[f"job_with_{name}_s"] = total
            out[f"job_with_{name}_vs_reference_generation"] = REFERENCE_GENERATION_S / total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="JSON lines of the measuring scripts")
    parser.add_argument("--statistics", help="a demo run's statistics.json (its rounds_per_prompt.mean)")
    parser.add_argument("--mean-rounds", type=float, help="the mean rounds per prompt, if no statistics.json")
    parser.add_argument("--lever-ratio-from", help="a dpo_throughput.py run with trl-path and all-levers (e.g. on the "
                        "CPU): DPO with issue 23's levers projected as the default's time / that ratio")
    args = parser.parse_args()
    mean_rounds = args.mean_rounds
    if args.statistics and Path(args.statistics).exists():
        mean_rounds = json.loads(Path(args.statistics).read_text())["rounds_per_prompt"]["mean"]
    ratio = lever_ratio_of(Path(args.lever_ratio_from)) if args.lever_ratio_from else None
    print(json.dumps({"projection": project(lines(Path(args.results)), mean_rounds, ratio)}))


if __name__ == "__main__":
    main()
