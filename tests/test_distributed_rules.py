"""emotion_dpo/distributed.py's rules, in-process and model-free: who takes which share of the work, who writes and
speaks, how the launcher is called and how a process is tied to its parent. (tests/test_distributed.py runs the whole
job on 2 processes.)"""

import signal
import sys

import pytest

from emotion_dpo import distributed
from emotion_dpo.errors import PipelineError


@pytest.fixture
def launcher_env(monkeypatch):
    """No launcher's variables unless the test sets them."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_each_process_takes_every_world_size_th_item_from_its_rank():
    items = list(range(7))
    assert [distributed.shard(items, rank, 3) for rank in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert distributed.shard(items, 0, 1) == items


def test_prompts_are_cut_into_numbered_batches_of_consecutive_prompts():
    batches = distributed.prompt_batches(list("abcdefg"), 3)
    assert batches == [(0, list("abc")), (1, list("def")), (2, list("g"))]
    assert distributed.prompt_batches([], 3) == []


def test_without_a_launcher_there_is_one_process_the_main_one(launcher_env):
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert not distributed.on_cpus()


def test_the_main_process_is_global_rank_0_not_each_machines_local_rank_0(launcher_env):
    launcher_env.setenv("WORLD_SIZE", "4")
    launcher_env.setenv("RANK", "2")
    launcher_env.setenv("LOCAL_RANK", "0")  # the first process of the second machine
    assert distributed.world_size() == 4 and not distributed.is_main_process()
    launcher_env.setenv("RANK", "0")
    assert distributed.is_main_process()


def test_say_prints_on_the_main_process_only(launcher_env, capsys):
    launcher_env.setenv("RANK", "1")
    distributed.say("hello")
    assert capsys.readouterr().out == ""
    launcher_env.setenv("RANK", "0")
    distributed.say("hello")
    assert capsys.readouterr().out == "hello\n"


def test_several_processes_without_a_gpu_are_on_cpus(launcher_env):
    import torch

    launcher_env.setattr(torch.cuda, "is_available", lambda: False)
    launcher_env.setenv("WORLD_SIZE", "2")
    assert distributed.on_cpus()
    launcher_env.setattr(torch.cuda, "is_available", lambda: True)
    assert not distributed.on_cpus()


class FakeState:
    """accelerate's PartialState as process_state calls it: records its cpu argument, sees `seen` processes."""
    made = []
    seen = 1

    def __init__(self, cpu=False):
        FakeState.made.append(cpu)
        self.num_processes = FakeState.seen


@pytest.fixture
def fake_accelerate(launcher_env):
    import accelerate
    import torch

    FakeState.made, FakeState.seen = [], 1
    tied = []
    launcher_env.setattr(accelerate, "PartialState", FakeState)
    launcher_env.setattr(torch.cuda, "is_available", lambda: False)
    launcher_env.setattr(distributed, "die_with_parent", lambda: tied.append(True))
    return tied


def test_process_state_alone_starts_no_gloo_and_is_not_tied_to_a_parent(fake_accelerate):
    assert distributed.process_state().num_processes == 1
    assert FakeState.made == [False] and fake_accelerate == []


def test_process_state_under_a_launcher_on_cpus_starts_gloo_and_dies_with_the_launcher(fake_accelerate, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    FakeState.seen = 2
    assert distributed.process_state().num_processes == 2
    assert FakeState.made == [True] and fake_accelerate == [True]


def test_process_state_refuses_a_launcher_accelerate_does_not_see(fake_accelerate, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    FakeState.seen = 1  # each process would take every prompt as rank 0
    with pytest.raises(PipelineError, match="WORLD_SIZE is 2, but accelerate sees 1 processes"):
        distributed.process_state()


def test_one_process_is_started_as_a_plain_python_command():
    assert distributed.launch_command(["generate_preferences.py", "--config", "c.json"], 1) == [
        sys.executable, "generate_preferences.py", "--config", "c.json"]


def test_several_processes_are_started_by_accelerate_launch_on_a_free_port():
    assert distributed.launch_command(["evaluate.py", "--config", "c.json"], 3) == [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "evaluate.py", "--config", "c.json"]


class FakeLibc:
    calls = []

    def prctl(self, *args):
        FakeLibc.calls.append(args)


@pytest.fixture
def fake_libc(monkeypatch):
    import ctypes

    FakeLibc.calls = []
    killed = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kwargs: FakeLibc())
    monkeypatch.setattr(distributed.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    return killed


def test_a_process_asks_for_sigkill_when_its_parent_dies(fake_libc, monkeypatch):
    monkeypatch.setattr(distributed.os, "getppid", lambda: 4242)
    distributed.die_with_parent()
    assert FakeLibc.calls == [(1, signal.SIGKILL)]  # PR_SET_PDEATHSIG = 1 (linux/prctl.h)
    assert fake_libc == []


def test_a_process_whose_parent_was_gone_before_it_asked_kills_itself(fake_libc, monkeypatch):
    monkeypatch.setattr(distributed.os, "getppid", lambda: 1)  # adopted by init: the parent died already
    distributed.die_with_parent()
    assert fake_libc == [(distributed.os.getpid(), signal.SIGKILL)]
