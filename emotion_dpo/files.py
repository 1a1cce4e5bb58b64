"""What a long job's files can count on: whole-or-nothing writes, one writer per run folder, and a switch of
a set of outputs that a reader sees all at once."""

from __future__ import annotations

import fcntl
import os
import time
import shutil
from pathlib import Path

from .errors import PipelineError

RUN_LOCK = ".lock"  # held by the process that generates into a run folder, for the whole run
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


class FolderLock:
    """An exclusive lock (fcntl.flock) on a lock file in a run folder, with the holder's PID written in it.

    The kernel drops it when the holder dies (kill -9 included), so a stale file never blocks; a second process
    is refused at once, naming the holder, instead of writing the same prompts into the same journal."""

    def __init__(self, folder: str | Path, name: str = RUN_LOCK, doing: str = "generating", wait: bool = False):
        self.path = Path(folder) / name
        self._file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            if wait:  # a short job (finalize): take turns
                print(f"{self.path.parent}: waiting for process {holder}, {doing} in this folder")
                fcntl.flock(self._file, fcntl.LOCK_EX)
                return self._claim()
            self._file.close()
            raise PipelineError(
                f"{self.path.parent}: process {holder} is {doing} in this folder (it holds {self.path}); wait for it "
                "to end or stop it, then run again. Two processes on one folder would settle the same prompts twice."
            ) from None
        self._claim()

    def _claim(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

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
