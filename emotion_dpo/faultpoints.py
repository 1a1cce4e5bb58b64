"""Named points a process reports as it passes them, where a test (or someone reproducing a failure) makes it die
or stop at exactly that step, never after a guessed sleep:

    EMOTION_DPO_FAULT=ACTION@POINT[@PATH_PART]

ACTION: `kill` (SIGKILL, as `kill -9` does), `stop` (SIGSTOP: the process keeps its locks) or `kill-parent` (SIGKILL
to its parent: run_pipeline, whose stage then dies with it, PR_SET_PDEATHSIG). POINT, with the number the process
counts:

    settled:N       the N-th prompt this process journaled is on disk
    dpo-save:STEP   inside checkpoint-STEP's save (before its trainer_state.json)
    dpo-saved:STEP  checkpoint-STEP is complete

PATH_PART: only where the point's path (the journal, the run folder) contains it; run_pipeline's stages inherit the
variable, so `kill-parent@dpo-saved:2@iter-2/dpo` picks iteration 2's DPO. The process prints the point and its PID
first. Unset, nothing happens."""

from __future__ import annotations

import os
import signal

ENV = "EMOTION_DPO_FAULT"
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "kill-parent": signal.SIGKILL}


def reached(point: str, path: str | os.PathLike = "") -> None:
    action, _, where = os.environ.get(ENV, "").partition("@")
    wanted, _, path_part = where.partition("@")
    if wanted != point or action not in ACTIONS or path_part not in str(path):
        return
    print(f"fault point {point}: {action} (process {os.getpid()})", flush=True)
    if action == "kill-parent":
        os.kill(os.getppid(), signal.SIGKILL)
        signal.pause()  # the parent's death kills this process too (PR_SET_PDEATHSIG); go no further
    os.kill(os.getpid(), ACTIONS[action])
