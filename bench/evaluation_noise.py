"""Does the evaluation tell settings apart? One adapter evaluated under several evaluation seeds, with R replies per
prompt: the seeds must agree within the 95 % intervals over prompts.

    python bench/evaluation_noise.py --adapter outputs/demo/run-X/iter-2/dpo/final_adapter --replies 1 4 \\
        --seeds 42 43 44 --out bench/evaluation_noise

Each evaluation is `evaluate.py --config args/demo/evaluate_arg.json` in outputs/evaluation_noise/rR-sSEED (read, not
run again, when it is there). Writes OUT/results.json and OUT/results.md: per R and seed, each headline figure of the
DPO model with its interval, and per R whether every pair of seeds agrees (each seed's value inside the other's
interval) and the largest difference between seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def evaluation(adapter: str, replies: int, seed: int, folder: Path) -> dict:
    if not (folder / "results.json").exists():
        command = [sys.executable, "evaluate.py", "--config", "args/demo/evaluate_arg.json"]
        for override in (f"dpo_adapter={adapter}", f"output_dir={folder}", f"seed={seed}",
                         f"replies_per_prompt={replies}", "include_base=false", "wandb.mode=disabled"):
            command += ["--set", override]
        with open(folder.with_suffix(".log"), "w") as log:
            subprocess.run(command, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads((folder / "results.json").read_text())["intervals"]["DPO"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--replies", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--runs", default="outputs/evaluation_noise")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runs, out = ROOT / args.runs, Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    table = {}
    for replies in args.replies:
        by_seed = {seed: evaluation(args.adapter, replies, seed, runs / f"r{replies}-s{seed}") for seed in args.seeds}
        agree, spread = {}, {}
        for figure in by_seed[args.seeds[0]]:
            values = {s: by_seed[s][figure] for s in args.seeds}
            agree[figure] = all(
                a["ci95"][0] <= b["value"] <= a["ci95"][1] and b["ci95"][0] <= a["value"] <= b["ci95"][1]
                for a, b in itertools.combinations(values.values(), 2))
            spread[figure] = max(v["value"] for v in values.values()) - min(v["value"] for v in values.values())
        table[replies] = {"by_seed": by_seed, "seeds_agree": agree, "largest_difference": spread}
        print(f"replies per prompt {replies}: " + ", ".join(f"{k} agree {agree[k]} (difference {spread[k]:.3f})"
                                                          for k in agree), flush=True)
    (out / "results.json").write_text(json.dumps({"adapter": args.adapter, "seeds": args.seeds, "table": table},
                                                 indent=2) + "\n")
    lines = [f"One adapter (`{args.adapter}`), evaluation seeds {', '.join(map(str, args.seeds))}: the DPO model's "
             "figures with their 95 % intervals over prompts.", "",
             "| replies per prompt | figure | " + " | ".join(f"seed {s}" for s in args.seeds)
             + " | largest difference | every two seeds agree |", "| --- | --- |" + " --- |" * (len(args.seeds) + 2)]
    for replies, row in table.items():
        for figure, agreed in row["seeds_agree"].items():
            fmt = "{:.0f}" if figure == "distinct_replies" else "{:.3f}"
            cells = [f"{fmt.format(v['value'])} ({fmt.format(v['ci95'][0])}-{fmt.format(v['ci95'][1])})"
                     for v in (row["by_seed"][s][figure] for s in args.seeds)]
            lines.append(f"| {replies} | {figure.replace('_', ' ')} | " + " | ".join(cells)
                         + f" | {fmt.format(row['largest_difference'][figure])} | {'yes' if agreed else 'no'} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
