"""How close does run_pipeline --preflight's projection come to the real run? The preflight, then the real pipeline,
on the same config and machine, one after the other; each stage's projected time (all iterations) against the
pipeline's own per-stage timings ('== iteration k SCRIPT: finished in N s', summed over the iterations).

    OMP_NUM_THREADS=1 python bench/preflight_accuracy.py [--config args/demo/pipeline_arg.json] [--set KEY=VALUE ...]

The real run is demo.sh's command (run_pipeline.py on the config, a fresh run folder under outputs/bench/); the
demo world must be built (python -m emotion_dpo.demo_world). Prints a markdown table (ratio = projected / real)
and one JSON line; the load average is taken before and after each command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"generate_preferences.py": "generate_preferences", "fine_tune_dpo.py": "fine_tune_dpo",
           "evaluate.py": "evaluate"}
FINISHED = re.compile(r"== (?:preflight: )?iteration (\d+) (\S+\.py):? finished in (\d+) s")
# the table's last cell: "88 s", or "4 min 50 s (290 s)"
PROJECTED = re.compile(r"^\| (generate_preferences|fine_tune_dpo|evaluate|job) \|.*?(\d+) s\)? \|$")


def run(args: list[str], log: Path) -> tuple[float, str]:
    """Run a command, its output to `log` and kept; (wall seconds, output)."""
    started = time.monotonic()
    with open(log, "w") as f:
        result = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(result.stdout)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args[:4])} ... failed (exit {result.returncode}); its output: {log}")
    return time.monotonic() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="args/demo/pipeline_arg.json")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_folder = ROOT / "outputs" / "bench" / f"preflight-accuracy-{stamp}"
    logs = ROOT / "outputs" / "bench" / f"preflight-accuracy-{stamp}.logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "run_pipeline.py", "--config", args.config]
    for override in [*args.set, f"output_dir={run_folder}"]:
        base += ["--set", override]

    loads = {"before preflight": os.getloadavg()[0]}
    preflight_s, preflight_out = run(base + ["--preflight"], logs / "preflight.log")
    loads["after preflight"] = os.getloadavg()[0]
    assert not run_folder.exists(), "the preflight wrote into output_dir"
    projected = {m.group(1): float(m.group(2)) for line in preflight_out.splitlines() if (m := PROJECTED.match(line))}

    real_s, real_out = run(base, logs / "pipeline.log")
    loads["after pipeline"] = os.getloadavg()[0]
    real = {name: 0.0 for name in SCRIPTS.values()}
    for iteration, script, seconds in FINISHED.findall(real_out):
        if "preflight" not in script:
            real[SCRIPTS[script]] += float(seconds)
    real["job"] = sum(real.values())

    rows = [(name, projected[name], real[name], projected[name] / real[name]) for name in real]
    print(f"preflight: {preflight_s:.0f} s wall; pipeline: {real_s:.0f} s wall; machine {platform.node()}, "
          f"{os.cpu_count()} cores, load average {', '.join(f'{k} {v:.1f}' for k, v in loads.items())}")
    print("\n| stage (all iterations) | projected s | real s (the pipeline's stage timings) | projected / real |")
    print("| --- | --- | --- | --- |")
    for name, p, r, ratio in rows:
        print(f"| {name} | {p:.0f} | {r:.0f} | {ratio:.2f} |")
    print(json.dumps({"preflight_wall_s": preflight_s, "pipeline_wall_s": real_s, "projected": projected, "real": real,
                      "ratios": {name: ratio for name, _, _, ratio in rows}, "loads": loads,
                      "machine": platform.node(), "cores": os.cpu_count(), "run_folder": str(run_folder)}))


if __name__ == "__main__":
    main()
