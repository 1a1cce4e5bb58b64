"""Several processes, as accelerate / torchrun start them: each stage's share of the work and who writes.

`accelerate launch --multi_gpu --num_processes N` (or `torchrun --nproc_per_node N`) starts N copies of a script with
RANK / WORLD_SIZE set; on GPUs they talk over NCCL, on CPUs over gloo."""

from __future__ import annotations

import os
import signal
import sys

from .errors import PipelineError


def world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def on_cpus() -> bool:
    """Several processes and no GPU: accelerate (and TrainingArguments) must be told `cpu=True` to start gloo."""
    import torch

    return world_size() > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's PartialState, with the share of each process under any launcher: torchrun on CPUs sets
    RANK/WORLD_SIZE, but accelerate starts its CPU process group only when told `cpu=True`; alone it would see one
    process, and every process would take all prompts as rank 0."""
    from accelerate import PartialState

    if world_size() > 1:
        die_with_parent()  # a launcher killed with SIGKILL leaves no process of it running on
    state = PartialState(cpu=on_cpus())  # gloo, from the launcher's env
    if world_size() > 1 and state.num_processes != world_size():
        raise PipelineError(f"WORLD_SIZE is {world_size()}, but accelerate sees {state.num_processes} processes; "
                            "launch with accelerate launch or torchrun")
    return state


def shard(items: list, rank: int, world_size: int) -> list:
    """This process's share of the work under `accelerate launch`: every world_size-th item."""
    return items[rank::world_size]


def prompt_batches(prompts, batch_prompts: int) -> list[tuple[int, list]]:
    """(number, prompts) of each batch of `batch_prompts` consecutive prompts: the unit a process samples whole,
    from seed + number, so that a prompt's batch, and with it its replies, does not depend on how many processes
    share the work."""
    return [(number, prompts[start:start + batch_prompts])
            for number, start in enumerate(range(0, len(prompts), batch_prompts))]


def is_main_process() -> bool:
    """Rank 0 of the launcher's processes (the only process without a launcher); readable before accelerate starts."""
    return int(os.environ.get("RANK", "0")) == 0


def say(text: str) -> None:
    """print, once for all processes: a count every process computes alike is said by the main one."""
    if is_main_process():
        print(text)


def die_with_parent() -> None:
    """Die when the parent dies (Linux: PR_SET_PDEATHSIG): a stage killed with `kill -9` must not leave processes
    writing into the folder its rerun resumes. In a launcher's worker the parent is the launcher."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was gone before the request
        os.kill(os.getpid(), signal.SIGKILL)


def launch_command(script_args: list[str], num_processes: int) -> list[str]:
    """`python script ...`, or the same under `accelerate launch` with num_processes processes: DDP (--multi_gpu:
    accelerate's torchrun launcher; gloo on CPUs) on this machine, the rendezvous on a free port (0: torchrun picks)."""
    if num_processes == 1:
        return [sys.executable, *script_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            *script_args]
