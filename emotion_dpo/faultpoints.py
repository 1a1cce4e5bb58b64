"""Named points a process reports as it passes them, where a test (or someone reproducing a failure) makes it die
or stop at exactly that step, never after a guessed sleep:

    EMOTION_DPO_FAULT=kill@dpo-save:2     SIGKILL inside checkpoint-2's save (before its trainer_state.json)
    EMOTION_DPO_FAULT=stop@dpo-saved:2    SIGSTOP once checkpoint-2 is complete (the process keeps its locks)

The variable passes to the stages run_pipeline starts. The process prints the point and its PID first."""

from __future__ import annotations

import os
import signal

ENV = "EMOTION_DPO_FAULT"
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def reached(point: str) -> None:
    action, _, where = os.environ.get(ENV, "").partition("@")
    if where == point and action in ACTIONS:
        print(f"fault point {point}: {action} (process {os.getpid()})", flush=True)
        os.kill(os.getpid(), ACTIONS[action])
