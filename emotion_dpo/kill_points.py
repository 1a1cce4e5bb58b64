"""Named points at which a process can be told to die as `kill -9` would, so that tests of resumption kill at a
point the process reports instead of racing a clock.

EMOTION_DPO_KILL_AT=POINT[:COUNT[:PATH_PART]] kills this process with SIGKILL the COUNT-th time (default 1) it passes
POINT with a path containing PATH_PART (default: any). With EMOTION_DPO_KILL_PARENT=1 it kills its parent instead
(run_pipeline: its stage then dies with it, PR_SET_PDEATHSIG). Points: `settled` (a journal line is on disk),
`checkpoint` (a DPO checkpoint is saved). Unset, nothing happens.
"""

from __future__ import annotations

import os
import signal

_passed: dict[str, int] = {}


def kill_point(point: str, path: str = "") -> None:
    wanted = os.environ.get("EMOTION_DPO_KILL_AT")
    if not wanted:
        return
    name, _, rest = wanted.partition(":")
    count, _, path_part = rest.partition(":")
    if name != point or path_part not in str(path):
        return
    _passed[point] = _passed.get(point, 0) + 1
    if _passed[point] < int(count or 1):
        return
    parent = os.environ.get("EMOTION_DPO_KILL_PARENT") == "1"
    print(f"kill point {point} reached ({path}, pass {_passed[point]}): SIGKILL to the "
          f"{'parent' if parent else 'process'}", flush=True)
    os.kill(os.getppid() if parent else os.getpid(), signal.SIGKILL)
    if parent:
        signal.pause()  # the parent's death kills this process too (PR_SET_PDEATHSIG); go no further
