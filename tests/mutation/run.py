"""Mutation score of the rule files and the newer modules (diversity, judges, distributed, dpo_prefix,
dpo_reference, sentencepiece_check): each hand-listed mutant (tests/mutation/mutants.py) is applied to a copy of the
repository and the fast, model-free tests of its file are run against it; a mutant is killed when they fail.

    python tests/mutation/run.py                 # every file
    python tests/mutation/run.py selection stats # some files
    python tests/mutation/run.py --list          # the mutants and the equivalent ones, without running

Prints killed/survived per mutant and per file; exits 1 when a file scores under --min (default 90 %).
Not part of the test suite (pytest collects only test_*.py) and not run in CI: it runs pytest ~250 times.
Equivalent mutants (no test can tell them from the original) are listed with the reason and left out of the score.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutants import TARGETS  # noqa: E402

COPIED = ("emotion_dpo", "tests", "args", "generate_preferences.py", "fine_tune_dpo.py", "evaluate.py",
          "run_pipeline.py", "chat.py", "pytest.ini")


def sandbox() -> Path:
    """A copy of what the tests read; the demo world is linked, never copied."""
    where = Path(tempfile.mkdtemp(prefix="mutation-"))
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, where / name, ignore=shutil.ignore_patterns("__pycache__", "mutation"))
        else:
            shutil.copy2(source, where / name)
    if (ROOT / "demo_world").exists():
        (where / "demo_world").symlink_to((ROOT / "demo_world").resolve())
    return where


def start_tests(where: Path, tests: list[str], timeout: int) -> int:
    """Fork a child that runs the target's tests in the sandbox `where` (pytest, quiet, stopping at the first
    failure); returns its pid. The parent imported the heavy libraries once (torch, datasets, transformers) but never
    emotion_dpo, so each child reads the sandbox's files as they are now."""
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.chdir(where)
            sys.path.insert(0, str(where))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            signal.alarm(timeout)
            import pytest

            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(int(code))
    return pid


def outcome(status: int) -> tuple[bool, str]:
    """(passed, why) from a child's wait status."""
    if os.WIFSIGNALED(status):
        return False, f"killed by signal {os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status)
    return code == 0, f"pytest exit status {code}"


def run_tests(where: Path, tests: list[str], timeout: int) -> tuple[bool, str]:
    _, status = os.waitpid(start_tests(where, tests, timeout), 0)
    return outcome(status)


def preload() -> None:
    """Import once what every test run needs, so that each forked run starts in a second or two."""
    os.environ.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    sys.dont_write_bytecode = True
    import datasets  # noqa: F401
    import jinja2  # noqa: F401
    import matplotlib  # noqa: F401
    import pydantic  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401


def apply(source: str, mutant, path: str) -> str:
    count = source.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{path}: mutant {mutant.what!r}: its text occurs {count} times (expected once); "
                         "update tests/mutation/mutants.py")
    return source.replace(mutant.old, mutant.new)


def run_mutants(target, original: str, sandboxes: list[Path], timeout: int) -> list[tuple[bool, str]]:
    """Each mutant in a sandbox of its own while it runs, up to len(sandboxes) at once; results in mutant order."""
    results: list = [None] * len(target.mutants)
    free, running = list(sandboxes), {}  # pid -> (mutant position, sandbox)
    queue = list(enumerate(target.mutants))
    while queue or running:
        while queue and free:
            at, mutant = queue.pop(0)
            where = free.pop()
            (where / target.path).write_text(apply(original, mutant, target.path))
            running[start_tests(where, target.tests, timeout)] = (at, where)
        pid, status = os.wait()
        at, where = running.pop(pid)
        (where / target.path).write_text(original)
        results[at] = outcome(status)
        free.append(where)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help=f"rule files to mutate (default all: {', '.join(TARGETS)})")
    parser.add_argument("--list", action="store_true", help="list the mutants without running them")
    parser.add_argument("--min", type=float, default=90.0, help="the per-file score to reach, in percent")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant run")
    parser.add_argument("--only", metavar="TEXT", help="run only the mutants whose description contains TEXT")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once, each in its own copy of the repo")
    args = parser.parse_args()
    names = args.files or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown file {unknown[0]!r} (one of {', '.join(TARGETS)})")
    if args.only:
        for name in names:
            TARGETS[name].mutants = [m for m in TARGETS[name].mutants if args.only in m.what]

    for name in names:  # every mutant's text must still be in its file, also for --list
        target = TARGETS[name]
        original = (ROOT / target.path).read_text()
        for mutant in [*target.mutants, *target.equivalent]:
            apply(original, mutant, target.path)
    if args.list:
        for name in names:
            target = TARGETS[name]
            print(f"== {target.path}: {len(target.mutants)} mutants, {len(target.equivalent)} equivalent; tests: "
                  + " ".join(target.tests))
            for m in target.mutants:
                print(f"  - {m.what}")
            for m in target.equivalent:
                print(f"  = {m.what}  (equivalent: {m.why})")
        return 0

    preload()
    sandboxes = [sandbox() for _ in range(args.jobs)]
    scores = {}
    try:
        for name in names:
            target = TARGETS[name]
            started = time.perf_counter()
            passed, tail = run_tests(sandboxes[0], target.tests, args.timeout)
            if not passed:
                print(f"== {target.path}: its tests fail WITHOUT a mutant ({tail}); fix that first")
                return 2
            print(f"== {target.path}: tests pass unmutated in {time.perf_counter() - started:.0f} s; "
                  f"{len(target.mutants)} mutants", flush=True)
            original = (ROOT / target.path).read_text()
            results = run_mutants(target, original, sandboxes, args.timeout)
            for mutant, (passed, _) in zip(target.mutants, results):
                print(f"  {'killed  ' if not passed else 'SURVIVED'}  {mutant.what}", flush=True)
            for mutant in target.equivalent:
                print(f"  equivalent  {mutant.what}: {mutant.why}")
            killed = sum(not passed for passed, _ in results)
            scores[target.path] = (killed, len(target.mutants), len(target.equivalent))
            print(f"   {killed} / {len(target.mutants)} killed in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        for where in sandboxes:
            shutil.rmtree(where, ignore_errors=True)

    print("\nfile                        killed / mutants   score   (equivalent, not counted)")
    low = False
    for path, (killed, total, equivalent) in scores.items():
        score = 100 * killed / total if total else 100.0
        low |= score < args.min
        print(f"{path:<27} {killed:>6} / {total:<7} {score:6.1f} %   ({equivalent})")
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
