"""What a long job's files can count on: whole-or-nothing writes, one writer per run folder, and a switch of
a set of outputs that a reader sees all at once."""

from __future__ import annotations

import fcntl
import json
import os
import time
import shutil
from pathlib import Path

from .errors import PipelineError

RUN_LOCK = ".lock"  # names the process that holds the run folder's lock (the lock itself is on the folder)
# Which script made a run folder and when: the only proof that a folder is a run's (a config.json may be anyone's)
RUN_MARKER = "emotion_dpo_run.json"
PIPELINE_SCRIPT = "run_pipeline.py"  # its run folder is made to hold its stages' run folders
PROJECT = Path(__file__).resolve().parents[1]
# The project's own folders: a run folder there would mix outputs with the code (and --fresh would move them)
PROJECT_FOLDERS = ("emotion_dpo", "tests", "args", "bench", ".git")
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
    folder = folder.resolve()  # "run/.." has no name of its own to add ".old-" to
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
    """The names in a run folder, less the lock files and the marker (a folder a start only claimed is still empty)."""
    return {entry.name for entry in folder.iterdir()} - {RUN_LOCK, FINALIZE_LOCK, RUN_MARKER} if folder.is_dir() \
        else set()


def _lock_holder(text: str, doing: str) -> tuple[str, str]:
    """(PID, what it is doing) from a lock file's text "PID doing" (a bare PID from before the second part)."""
    pid, _, holder_doing = text.strip().partition(" ")
    return pid or "?", holder_doing or doing


def _holder_text(folder: Path) -> str:
    try:
        return (folder / RUN_LOCK).read_text(encoding="utf-8")
    except OSError:  # deleted by hand, or not yet written: the lock on the folder still holds
        return ""


def held_lock(folder: Path) -> str | None:
    """The holder's text ("PID doing", "" if unknown) if a live process holds `folder`'s run lock now, else None."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken and dropped at once: it was free
    except BlockingIOError:
        return _holder_text(folder)
    finally:
        os.close(fd)
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
        text = held_lock(parent)
        if text is None:
            continue
        pid, holder_doing = _lock_holder(text, "writing")
        if not runs_under(lock, pid):
            raise PipelineError(
                f"{folder}: inside {parent}, where process {pid} is {holder_doing} (it holds {lock}); wait for it to "
                f"end or stop it, then run again. {doing.capitalize()} in its folder would write under it.")


# ------------------------------------------------------------------ a run folder is a run folder

def read_marker(folder: Path) -> dict | None:
    """The run marker in `folder` ({"script", "made"}), None if it has none (or an unreadable one)."""
    try:
        marker = json.loads((folder / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("script"), str) else None


def legacy_run_script(folder: Path) -> str | None:
    """The script whose run folder `folder` is, by the files earlier versions (without a marker) left there: a
    journal (generate_preferences), a Trainer checkpoint (checkpoint-*/trainer_state.json), or config.json with
    checkpoints, a final adapter or start_adapter.json (fine_tune_dpo), config.json with
    `dpo_adapter` (evaluate), pipeline_config.json or a stage's iter-k/<stage>.done.json (run_pipeline). A
    config.json alone could be anyone's: None."""
    try:
        if not folder.is_dir():
            return None
        if any(folder.glob("journal.rank*.jsonl")):
            return "generate_preferences.py"
        if (folder / "pipeline_config.json").is_file() or any(folder.glob("iter-*/*.done.json")):
            return PIPELINE_SCRIPT
        if any(folder.glob("checkpoint-*/trainer_state.json")):  # a Trainer's checkpoints: copied in to resume
            return "fine_tune_dpo.py"
        config = folder / "config.json"
        if not config.is_file():
            return None
        # start_adapter.json: the digests a fine_tune_dpo start writes before its first checkpoint (a start killed
        # then is resumed as one)
        if (folder / "final_adapter").is_dir() or any(p.is_dir() for p in folder.glob("checkpoint-*")) \
                or (folder / "start_adapter.json").is_file():
            return "fine_tune_dpo.py"
        saved = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "evaluate.py" if isinstance(saved, dict) and "dpo_adapter" in saved else None


def run_script_of(folder: Path) -> str | None:
    """Which script's run folder `folder` is: its marker's, or by the files of an earlier version; None if neither."""
    marker = read_marker(folder)
    return marker["script"] if marker else legacy_run_script(folder)


def _same_or_above(folder: Path, other: Path) -> bool:
    return folder == other or folder in other.parents


def refuse_unsafe_run_folder(folder: Path, key: str = "output_dir") -> None:
    """A run folder is a folder of its own: not one that holds the current folder, the home folder or the project
    (".", "..", "/", "~"), nor one of the project's own folders. --fresh moves a run folder aside whole."""
    where = folder.resolve()
    places = [(Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "the home folder"),
              (PROJECT, "the project's folder")]
    for place, name in places:
        if _same_or_above(where, place):
            raise PipelineError(
                f"{folder}: {key} is {name}" + ("" if where == place else f" or a folder above it ({where})")
                + "; a run folder must be a folder of its own, e.g. outputs/<name>")
    for name in PROJECT_FOLDERS:
        if _same_or_above(PROJECT / name, where):
            raise PipelineError(f"{folder}: {key} lies in the project's own folder {PROJECT / name}; a run folder "
                                "must be a folder of its own, e.g. outputs/<name>")


def refuse_inside_a_run(folder: Path, key: str = "output_dir") -> None:
    """A run folder inside another run's folder is refused: that run moves, replaces or deletes what it holds (a
    --finalize replaces dataset/, --fresh moves the whole folder). A pipeline's folder is made to hold run folders."""
    for parent in folder.resolve().parents:
        script = run_script_of(parent)
        if script is not None and script != PIPELINE_SCRIPT:
            raise PipelineError(f"{folder}: {key} lies inside {parent}, a run folder of {script}, which may move or "
                                f"replace what it holds; choose an {key} outside it")


def _listing(folder: Path, names: set[str], most: int = 5) -> str:
    shown = sorted(names)[:most]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def _mark(folder: Path, script: str, adopted: bool) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    marker = {"script": script, "made": now} if not adopted else {
        "script": script, "made": None, "adopted": now, "note": "made by a version before run markers"}
    write_text_atomic(folder / RUN_MARKER, json.dumps(marker, indent=2) + "\n")


def claim_run_folder(folder: str | Path, script: str, doing: str, what: str, fresh: bool = False,
                     fresh_moves=None, check=None, key: str = "output_dir") -> "FolderLock":
    """Lock `folder` as `script`'s run folder and mark it; returns the held lock.

    Refused, before anything is written (no RUN_LOCK, no marker, no folder): an unsafe place
    (refuse_unsafe_run_folder), a folder inside another run's, a non-empty folder that is not `script`'s run (no
    marker of it, no files of an earlier version of it: run_script_of). `fresh`: this script's earlier run there is
    moved aside (when fresh_moves(folder), if given) and a new folder made. check(folder, started), if given, runs
    under the lock on an existing folder of this script's that stays, before anything is written; it may refuse."""
    folder = Path(folder)
    refuse_unsafe_run_folder(folder, key)
    refuse_inside_a_run(folder, key)
    lock = None
    if run_folder_exists(folder, key):
        lock = FolderLock(folder, doing=doing, announce=False)
        try:
            marker = read_marker(folder)
            owner = marker["script"] if marker else legacy_run_script(folder)
            entries = folder_entries(folder)
            if owner is not None and owner != script:
                raise PipelineError(f"{folder}: {key} is a run folder of {owner}, not of {script}; choose another "
                                    f"{key}")
            if owner is None and entries:
                raise PipelineError(
                    f"{folder}: {key} is not empty and holds no {what} (no {RUN_MARKER} of {script}); it holds "
                    f"{_listing(folder, entries)}; choose another {key} (an empty or new folder)")
            if fresh and entries and (fresh_moves is None or fresh_moves(folder)):
                move_aside(folder, what)  # the lock goes with it
                lock.release()
                lock = None
            elif check is not None:
                check(folder, bool(entries))
        except BaseException:
            lock.release()
            raise
    try:
        if lock is None:
            folder.mkdir(parents=True, exist_ok=True)
            lock = FolderLock(folder, doing=doing, announce=False)
            if folder_entries(folder) or read_marker(folder):  # another run made it between our look and our lock
                lock.release()
                raise PipelineError(f"{folder}: another process started a run in this folder meanwhile; run again")
            _mark(folder, script, adopted=False)
        elif read_marker(folder) is None:
            _mark(folder, script, adopted=bool(folder_entries(folder)))
        lock.announce()
    except OSError as e:
        if lock is not None:
            lock.release()
        raise PipelineError(f"{folder}: {key} is not writable ({e.strerror})") from None
    return lock


HOLDER_NAMES_ITSELF_WITHIN = 3  # seconds a refused process waits to read who holds the folder


class FolderLock:
    """An exclusive lock (fcntl.flock) that one process holds on a run folder, with the holder's PID (and what it is
    doing) written in RUN_LOCK for the others' messages.

    The run lock is taken on the folder itself, not on a file in it: deleting RUN_LOCK by hand lets no second writer
    in. Another lock name (FINALIZE_LOCK) is a lock file, checked after locking to be still the one in the folder.
    The kernel drops a lock when its holder dies (kill -9 included), so a stale file never blocks; a second process
    is refused at once, naming the holder, instead of writing the same prompts into the same journal or training
    two models into one checkpoint folder. The run lock is also refused inside a run folder another process holds,
    unless this process is one of the stages that process runs under it (runs_under).

    `announce` False: RUN_LOCK is written only by announce(), once the folder is known to be this run's (a refused
    run writes nothing). release() removes the RUN_LOCK it wrote, while it still holds the lock."""

    def __init__(self, folder: str | Path, name: str = RUN_LOCK, doing: str = "generating", wait: bool = False,
                 create: bool = False, announce: bool = True):
        self.path = Path(folder) / name
        self.doing = doing
        self._fd = None
        self._announced = False
        if name == RUN_LOCK:
            refuse_inside_a_held_run(Path(folder), doing)
        if create:
            Path(folder).mkdir(parents=True, exist_ok=True)
        while True:
            if name == RUN_LOCK:
                self._fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            else:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = self._read_holder()
                # the holder names itself once its own checks pass (a refused run writes nothing): give it a moment
                for _ in range(HOLDER_NAMES_ITSELF_WITHIN * 10):
                    if text.strip() or wait:
                        break
                    time.sleep(0.1)
                    text = self._read_holder()
                holder, holder_doing = _lock_holder(text, doing)
                if not wait:
                    self._close()
                    who = (f"process {holder} is {holder_doing} in this folder (it holds {self.path})" if text.strip()
                           else f"another process holds this folder's lock and has not named itself in {self.path} "
                                "(it is starting, or the file was deleted)")
                    raise PipelineError(
                        f"{self.path.parent}: {who}; wait for it to end or stop it, then run again. Two processes on "
                        "one folder would write the same outputs twice.") from None
                print(f"{self.path.parent}: waiting for process {holder}, {holder_doing} in this folder")  # take turns
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            if name == RUN_LOCK or self._still_in_the_folder():
                break
            self._close()  # the file was deleted or replaced meanwhile: its lock guards nothing; lock the new one
        if announce:
            self.announce()

    def _still_in_the_folder(self) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def _read_holder(self) -> str:
        if self.path.name == RUN_LOCK:
            return _holder_text(self.path.parent)
        os.lseek(self._fd, 0, os.SEEK_SET)
        return os.read(self._fd, 4096).decode("utf-8", "replace")

    def announce(self) -> None:
        """Write this process's PID and what it does in the lock file, for the message a second process gets."""
        text = f"{os.getpid()} {self.doing}\n"
        if self.path.name == RUN_LOCK:
            write_text_atomic(self.path, text)
        else:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode(), 0)
        self._announced = True

    def child_environment(self) -> dict:
        """The environment for a stage this process starts and runs under this lock (runs_under)."""
        return {**os.environ, LOCK_HOLDER_ENV: f"{self.path.resolve()}:{os.getpid()}"}

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None

    def release(self) -> None:
        if self._fd is None:
            return
        if self._announced and self.path.name == RUN_LOCK:
            try:  # removed while still held: no one else can have written it
                if os.stat(self.path.parent).st_ino == os.fstat(self._fd).st_ino:  # not after the folder was moved
                    self.path.unlink(missing_ok=True)
            except OSError:
                pass
        self._close()

    def __del__(self):  # a lock nobody refers to any more is let go (as a file object closes)
        self._close()

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
