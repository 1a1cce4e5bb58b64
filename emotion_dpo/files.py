"""What a long job's files can count on: whole-or-nothing writes, one writer per run folder, and a switch of
a set of outputs that a reader sees all at once."""

from __future__ import annotations

import fcntl
import os
import time
import shutil
from pathlib import Path

from .errors import PipelineError

RUN_LOCK = ".lock"  # held by the one process that writes into a run folder, for the whole run
# "<lock file>:<pid>": the run lock that a parent (run_pipeline) holds for the stages it starts in sub-folders
LOCK_HOLDER_ENV = "EMOTION_DPO_RUN_LOCK"
FINALIZE_LOCK = ".finalize.lock"  # held while the outputs are rebuilt (a run's end, --finalize, --reselect)
CURRENT_SET = "final"  # link to the folder of the current outputs set, switched in one rename
SET_PREFIX = ".final-"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` whole or not at all: a temporary file in the same folder, fsync'ed, renamed over it.
    A kill or a full disk mid-write leaves the old file (or none), never a truncated one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def move_aside(folder: Path, what: str) -> Path:
    """--fresh: the earlier folder renamed to `<name>.old-<time>` beside it (a number added if that exists), never
    deleted."""
    stamp = f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = folder.with_name(stamp), 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{stamp}-{n}")
    folder.rename(aside)
    print(f"--fresh: moved the earlier {what} to {aside}")
    return aside


def run_folder_exists(folder: Path, key: str = "output_dir") -> bool:
    """Whether `folder` exists (as a folder); an existing plain file there is a clear error, not NotADirectoryError."""
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"{folder}: {key} is a file, expected a folder; choose another {key}")
    return folder.exists()


def folder_entries(folder: Path) -> set[str]:
    """The names in a run folder, less the lock files (an empty folder a start locked is still empty)."""
    return {entry.name for entry in folder.iterdir()} - {RUN_LOCK, FINALIZE_LOCK} if folder.is_dir() else set()


def _lock_holder(text: str, doing: str) -> tuple[str, str]:
    """(PID, what it is doing) from a lock file's text "PID doing" (a bare PID from before the second part)."""
    pid, _, holder_doing = text.strip().partition(" ")
    return pid or "?", holder_doing or doing


def held_lock(path: Path) -> str | None:
    """The text of lock file `path` if a live process holds it now, else None (absent, or free: its holder died)."""
    try:
        with open(path, encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken and dropped at once: it was free
            except BlockingIOError:
                return f.read()
    except OSError:
        return None
    return None


def is_ancestor(pid: int) -> bool:
    """Whether process `pid` started this one, directly or through a launcher (accelerate launch, torchrun)."""
    current = os.getppid()
    while current > 1:
        if current == pid:
            return True
        try:  # /proc/PID/stat: "pid (name) state ppid ...", the name may hold spaces or parentheses
            current = int(Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def runs_under(lock: Path, pid: str) -> bool:
    """Whether this process is a stage its parent runs under `lock`: LOCK_HOLDER_ENV names that lock and PID, the
    lock file says the same PID, and that process is an ancestor of this one (a variable alone proves nothing)."""
    named, _, named_pid = os.environ.get(LOCK_HOLDER_ENV, "").rpartition(":")
    return bool(named) and named_pid == pid and Path(named) == lock and pid.isdigit() and is_ancestor(int(pid))


def refuse_inside_a_held_run(folder: Path, doing: str) -> None:
    """A folder inside another run folder whose lock is held (run_pipeline's iter-k/<stage>) is written only by the
    stages that run holds it for."""
    for parent in folder.resolve().parents:
        lock = parent / RUN_LOCK
        text = held_lock(lock)
        if text is None:
            continue
        pid, holder_doing = _lock_holder(text, "writing")
        if not runs_under(lock, pid):
            raise PipelineError(
                f"{folder}: inside {parent}, where process {pid} is {holder_doing} (it holds {lock}); wait for it to "
                f"end or stop it, then run again. {doing.capitalize()} in its folder would write under it.")


class FolderLock:
    """An exclusive lock (fcntl.flock) on a lock file in a run folder, with the holder's PID (and what it is doing)
    written in it.

    The kernel drops it when the holder dies (kill -9 included), so a stale file never blocks; a second process
    is refused at once, naming the holder, instead of writing the same prompts into the same journal or training
    two models into one checkpoint folder. The run lock (RUN_LOCK) is also refused inside a run folder another
    process holds, unless this process is one of the stages that process runs under it (runs_under)."""

    def __init__(self, folder: str | Path, name: str = RUN_LOCK, doing: str = "generating", wait: bool = False,
                 create: bool = False):
        self.path = Path(folder) / name
        self.doing = doing
        if name == RUN_LOCK:
            refuse_inside_a_held_run(Path(folder), doing)
        if create:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder, holder_doing = _lock_holder(self._file.read(), doing)
            if wait:  # a short job (finalize): take turns
                print(f"{self.path.parent}: waiting for process {holder}, {holder_doing} in this folder")
                fcntl.flock(self._file, fcntl.LOCK_EX)
                return self._claim()
            self._file.close()
            raise PipelineError(
                f"{self.path.parent}: process {holder} is {holder_doing} in this folder (it holds {self.path}); wait "
                "for it to end or stop it, then run again. Two processes on one folder would write the same outputs "
                "twice."
            ) from None
        self._claim()

    def _claim(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()} {self.doing}\n")
        self._file.flush()

    def child_environment(self) -> dict:
        """The environment for a stage this process starts and runs under this lock (runs_under)."""
        return {**os.environ, LOCK_HOLDER_ENV: f"{self.path.resolve()}:{os.getpid()}"}

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------ a set of outputs, switched as one

def _set_number(path: Path) -> int:
    suffix = path.name[len(SET_PREFIX):]
    return int(suffix) if suffix.isdigit() else -1


def publish_set(folder: Path, staging: Path, names: list[str]) -> Path:
    """Make the finished outputs in `staging` the run's outputs, all at once.

    `staging` becomes `.final-<n>`; the link `final` is switched to it by one rename (atomic), and each
    documented path (`dataset`, `preferences.jsonl`, ...) is a fixed link through `final`: whoever opens
    them sees the whole old set or the whole new one, never a mix. The previous set stays until the next
    switch (a reader may still be in it); older ones are removed."""
    folder = Path(folder)
    sets = sorted(folder.glob(f"{SET_PREFIX}*"), key=_set_number)
    current = folder / CURRENT_SET
    previous = Path(os.readlink(current)).name if current.is_symlink() else None
    published = folder / f"{SET_PREFIX}{max([_set_number(s) for s in sets] + [0]) + 1}"
    os.replace(staging, published)
    _replace_with_link(current, published.name)  # the switch
    for name in names:
        path = folder / name
        if not (path.is_symlink() and os.readlink(path) == f"{CURRENT_SET}/{name}"):
            _replace_with_link(path, f"{CURRENT_SET}/{name}")  # once per folder (a run from before sets)
    for old in sets:
        if old.name not in (previous, published.name):
            shutil.rmtree(old, ignore_errors=True)
    return published


def _replace_with_link(path: Path, target: str) -> None:
    """Point `path` at `target` by renaming a new link over it (atomic); a real folder there is moved aside first."""
    link = path.with_name(f".{path.name}.link-{os.getpid()}")
    link.unlink(missing_ok=True)
    os.symlink(target, link)
    aside = None
    if path.is_dir() and not path.is_symlink():  # a rename cannot replace a folder with a link
        aside = path.with_name(f".{path.name}.replaced-{os.getpid()}")
        os.replace(path, aside)
    os.replace(link, path)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
