"""README's demo figures repeat: the reduced demo, run twice in fresh processes with different thread settings, gives
the same bytes at every stage (every RNG seeded, one CPU thread, deterministic algorithms: cli.make_reproducible)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import demo_evaluation_overrides

ROOT = Path(__file__).resolve().parents[1]


def run_reduced_demo(w: Path, out: Path, threads: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    common = [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", "wandb.mode=disabled",
              f"chat_template={ROOT / 'args/chat_template.json'}"]
    scorers = [f"dataset={w / 'dialogues'}", f"emotion_classifier={w / 'emotion_classifier'}",
               f"gibberish_detector={w / 'gibberish_detector'}", "num_prompts=24"]
    stages = [
        ("generate_preferences.py", "generate_preferences_arg.json", scorers + [f"output_dir={out / 'preferences'}"]),
        ("fine_tune_dpo.py", "dpo_arg.json", [f"dataset={out / 'preferences' / 'dataset'}", "eval_fraction=0",
                                              f"output_dir={out / 'dpo'}", "dpo.max_steps=2"]),
        ("evaluate.py", "evaluate_arg.json", scorers + [f"dpo_adapter={out / 'dpo' / 'final_adapter'}",
                                                        f"output_dir={out / 'evaluation'}", "include_base=false",
                                                        "bootstrap_samples=100", *demo_evaluation_overrides(w)]),
    ]
    for script, config, sets in stages:
        args = [sys.executable, str(ROOT / script), "--config", str(ROOT / "args/demo" / config)]
        for s in common + sets:
            args += ["--set", s]
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]


def test_the_reduced_demo_gives_the_same_bytes_twice(demo_world, tmp_path):
    run_reduced_demo(demo_world, tmp_path / "a", threads=None)  # torch's default: one thread per core
    run_reduced_demo(demo_world, tmp_path / "b", threads="1")
    for stage_file in ["preferences/preferences.jsonl", "preferences/failed.jsonl",
                       "dpo/final_adapter/adapter_model.safetensors", "evaluation/replies.jsonl"]:
        assert (tmp_path / "a" / stage_file).read_bytes() == (tmp_path / "b" / stage_file).read_bytes(), stage_file
    a, b = (json.loads((tmp_path / run / "evaluation/results.json").read_text()) for run in "ab")
    assert a["models"] == b["models"] and a["dpo_vs_sft"] == b["dpo_vs_sft"]
