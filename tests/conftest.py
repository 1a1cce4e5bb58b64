"""The demo world is built once per test run (or reused from its cache) and shared by every test."""

import fcntl
import os
import shutil
from pathlib import Path

import pytest

# README's test command runs two pytest-xdist workers on the two cores: each worker, and every process it starts, gets
# one OpenMP thread (with torch's default of one per core, the two workers' threads would wait on each other's).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


# The files that run whole pipelines in subprocesses, longest first (from CI's --durations). With README's
# --no-loadscope-reorder the two workers take the files in this order: the longest first (its worker builds the demo
# world), then the files that need no world (the other worker runs them meanwhile instead of waiting for it), then the
# other long ones, then the rest, so that neither worker ends with a long file alone.
LONGEST_FIRST = ("test_pipeline.py", "test_distributed.py", "test_dpo.py", "test_generate_preferences.py",
                 "test_reliability_pipeline.py", "test_faults.py", "test_reliability.py", "test_rules_by_hand.py")


def pytest_collection_modifyitems(items):
    need_world = {item.path.name for item in items if "demo_world" in item.fixturenames}

    def group(item):
        name = item.path.name
        if name in LONGEST_FIRST:
            return (0, 0) if name == LONGEST_FIRST[0] else (2, LONGEST_FIRST.index(name))
        return (3, 0) if name in need_world else (1, 0)

    items.sort(key=group)  # stable: the files within a group, and each file's tests, keep pytest's order


# The reference's selection rule, for tests that work its rules out by hand on the demo config (whose own default is
# diversity-aware selection: docs/selection.md)
REFERENCE_SELECTION = ["chosen_text_cap=null", "min_distinct_passing=1", 'chosen_rule="best"', 'rejected_rule="worst"',
                       'length_rule="reference"']


def process_environment(fault: str | None = None, one_thread: bool = True) -> dict:
    """The environment of a run a test starts: one OpenMP and MKL thread (or torch's default, one per core), and
    EMOTION_DPO_FAULT only where the test names a fault point (emotion_dpo/faultpoints.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("EMOTION_DPO_FAULT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if one_thread:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return {**env, "EMOTION_DPO_FAULT": fault} if fault else env


@pytest.fixture(scope="session")
def demo_world() -> Path:
    from emotion_dpo.demo_world import DEFAULT_DIR, ensure_demo_world

    return ensure_demo_world(os.environ.get("DEMO_WORLD_DIR", DEFAULT_DIR))


@pytest.fixture(scope="session")
def demo_tokenizer(demo_world):
    """The demo generator's tokenizer with the project's chat template installed (loaded once: it is slow to load)."""
    from emotion_dpo.models import load_tokenizer
    from emotion_dpo.template import load_chat_format

    root = Path(__file__).resolve().parents[1]
    return load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"),
                          load_chat_format(root / "args/chat_template.json"))


def made_once_for_the_workers(tmp_path_factory, name: str, make) -> Path:
    """The folder `name`, made by make(folder) once per test run and shared by the xdist workers (a session fixture
    is made once per worker): the first worker to ask makes it under a lock, the other waits and reuses it. Without
    xdist, the session's own."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, above the workers' own (popen-gw0, popen-gw1)
    folder, made = base / name, base / f"{name}.made"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not made.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed to make it left part of it
            folder.mkdir()
            make(folder)
            made.touch()
    return folder


@pytest.fixture(scope="session")
def demo_preferences(demo_world, tmp_path_factory) -> Path:
    """A preference dataset generated from the demo world by generate_preferences.py itself."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    w = demo_world

    def generate(folder: Path) -> None:
        sets = [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dataset={w / 'dialogues'}",
                f"emotion_classifier={w / 'emotion_classifier'}", f"gibberish_detector={w / 'gibberish_detector'}",
                f"chat_template={root / 'args/chat_template.json'}", f"output_dir={folder / 'run'}",
                "num_prompts=192", "wandb.mode=disabled"]
        args = [sys.executable, str(root / "generate_preferences.py"), "--config",
                str(root / "args/demo/generate_preferences_arg.json")]
        for s in sets:
            args += ["--set", s]
        result = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    return made_once_for_the_workers(tmp_path_factory, "demo_preferences", generate) / "run" / "dataset"


def _reply(text: str, total: float) -> dict:
    return {"text": text, "emotion_label": "neutral", "emotion_confidence": 0.9, "gibberish_label": "clean",
            "gibberish_confidence": 0.95, "length": float(len(text)), "emotion_reward": 9.0, "length_reward": 0.0,
            "gibberish_reward": 9.5, "total": total}


def _settled_record(index: int, accepted: bool = True, chosen: str = "that is fine .") -> dict:
    """A journal line of a settled prompt, with the keys and types generate_preferences writes."""
    return {"index": index, "dialogue": index, "target_emotion": "neutral",
            "prompt": f"<s>[INST] [EMOTION] neutral [/EMOTION] hello {index} . [/INST] [EMOTION] neutral [/EMOTION]",
            "status": "accepted" if accepted else "failed", "reason": None if accepted else "score gap below target",
            "chosen_at": 0 if accepted else None, "rejected_at": 1 if accepted else None,
            "rounds": [[_reply(chosen, 10.0 + index), _reply("qx", 1.0)]]}


@pytest.fixture
def settled_record():
    return _settled_record


def demo_evaluation_overrides(w: Path) -> list[str]:
    """evaluate's keys that name demo-world files beyond the models: the held-out judge and the well-formed replies."""
    import json

    judge = {"name": "demo judge", "model": str(w / "judge"), "label_map": {"joy": "happiness"}}
    return [f"judges={json.dumps([judge])}", f"well_formed_replies={w / 'well_formed_replies.json'}"]
