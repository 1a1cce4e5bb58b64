"""Wall time of generate_preferences, fine_tune_dpo and evaluate with 1 and with 2 processes on this CPU, side by side.

    python bench/distributed.py [--repeats 1] [--prompts 64] [--dpo-steps 16]

Each stage runs as a user runs it: `python SCRIPT` (1 process) and `accelerate launch --multi_gpu --num_processes 2
SCRIPT` (2 processes, gloo), OMP_NUM_THREADS=1 in every process, on the demo world. The 1- and 2-process runs of a
stage alternate, `--repeats` times each; the time is the whole command's (process start and model loading
included). DPO trains the same pairs with the same global batch (1 x 4 against 2 x 2). Prints one JSON line per run
and one per stage with the ratio of the fastest runs (1 process / 2 processes: above 1, 2 processes were faster),
with the machine's name and its load average before and after.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emotion_dpo.distributed import launch_command  # noqa: E402


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{platform.node()}: {model}, {os.cpu_count()} cores, no GPU used"


def timed(args: list[str], log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed; see {log}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=64, help="prompts to generate from and to evaluate")
    parser.add_argument("--dpo-steps", type=int, default=16)
    parser.add_argument("--world", default=str(ROOT / "demo_world"))
    args = parser.parse_args()
    w = Path(args.world)
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    shared = [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", "wandb.mode=disabled",
              f"chat_template={ROOT / 'args/chat_template.json'}"]
    scored = [f"dataset={w / 'dialogues'}", f"emotion_classifier={w / 'emotion_classifier'}",
              f"gibberish_detector={w / 'gibberish_detector'}", f"num_prompts={args.prompts}", "batch_prompts=8"]
    pairs = work / "pairs"  # one generate run's pairs, trained on by every DPO run

    def stage(script: str, config: str, sets: list[str]) -> list[str]:
        command = [str(ROOT / script), "--config", str(ROOT / "args/demo" / config)]
        for s in shared + sets:
            command += ["--set", s]
        return command

    stages = {
        "generate": lambda out, n: stage("generate_preferences.py", "generate_preferences_arg.json",
                                         scored + [f"output_dir={out}"]),
        "dpo": lambda out, n: stage("fine_tune_dpo.py", "dpo_arg.json",
                                    [f"dataset={pairs / 'dataset'}", "eval_fraction=0", "dpo.eval_strategy=no",
                                     f"dpo.max_steps={args.dpo_steps}", f"dpo.per_device_train_batch_size={4 // n}",
                                     "dpo.save_steps=1000", f"output_dir={out}"]),
        "evaluate": lambda out, n: stage("evaluate.py", "evaluate_arg.json",
                                         scored + ["include_base=false", "bootstrap_samples=200",
                                                   f"dpo_adapter={w / 'sft_adapter'}", f"output_dir={out}"]),
    }
    print(json.dumps({"machine": machine(), "load_before": os.getloadavg(), "prompts": args.prompts,
                      "dpo_steps": args.dpo_steps, "dpo_global_batch": 4}), flush=True)
    timed(launch_command(stages["generate"](pairs, 1), 1), work / "pairs.log")
    best = {}
    for name, command in stages.items():
        for repeat in range(args.repeats):
            for processes in (1, 2):
                out = work / f"{name}-{processes}-{repeat}"
                seconds = timed(launch_command(command(out, processes), processes), work / f"{out.name}.log")
                best[name, processes] = min(seconds, best.get((name, processes), seconds))
                print(json.dumps({"stage": name, "processes": processes, "repeat": repeat, "wall_s": round(seconds, 1),
                                  "load": os.getloadavg()}), flush=True)
        print(json.dumps({"stage": name, "fastest_1_process_s": round(best[name, 1], 1),
                          "fastest_2_processes_s": round(best[name, 2], 1),
                          "ratio_1_over_2": round(best[name, 1] / best[name, 2], 2)}), flush=True)
    print(json.dumps({"load_after": os.getloadavg(), "logs": str(work)}), flush=True)


if __name__ == "__main__":
    main()
