"""EMOTION_DPO_FAULT=ACTION@POINT[@PATH_PART] acts at that point alone: the point's name and number as the process
reports them, under a path that contains PATH_PART (emotion_dpo/faultpoints.py). The pipeline tests use it to kill
and stop stages; here, a bare process passes points that do not match and then one that does."""

import signal
import subprocess
import sys
from pathlib import Path

from conftest import process_environment

ROOT = Path(__file__).resolve().parents[1]
PASSES = """
from emotion_dpo.faultpoints import reached
for point, path in [("settled:2", "run/iter-2/preferences/journal.rank0.jsonl"),  # another number
                    ("dpo-saved:1", "run/iter-2/preferences/journal.rank0.jsonl"),  # another point
                    ("settled:1", "run/iter-1/preferences/journal.rank0.jsonl"),  # another path
                    ("settled:1", "run/iter-2/preferences/journal.rank0.jsonl"),
                    ("settled:3", "run/iter-2/preferences/journal.rank0.jsonl")]:
    print("passing", point, path, flush=True)
    reached(point, path)
print("the end", flush=True)
"""


def passes(fault: str | None) -> subprocess.CompletedProcess:
    env = process_environment()  # without EMOTION_DPO_FAULT; set here even when empty
    if fault is not None:
        env["EMOTION_DPO_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", PASSES], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_the_process_dies_at_the_named_point_under_the_named_path_and_says_so_first():
    killed = passes("kill@settled:1@iter-2")
    assert killed.returncode == -signal.SIGKILL
    lines = killed.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("passing")] == [
        "settled:2", "dpo-saved:1", "settled:1", "settled:1"]  # went past the first three
    assert lines[-1].startswith("fault point settled:1: kill (process ")
    assert lines[-2] == "passing settled:1 run/iter-2/preferences/journal.rank0.jsonl"


def test_without_a_path_part_any_path_matches():
    killed = passes("kill@settled:1")
    assert killed.returncode == -signal.SIGKILL
    assert killed.stdout.splitlines()[-2] == "passing settled:1 run/iter-1/preferences/journal.rank0.jsonl"


def test_unset_or_an_unknown_action_does_nothing():
    for fault in (None, "", "explode@settled:1"):
        result = passes(fault)
        assert result.returncode == 0 and result.stdout.endswith("the end\n"), fault
