"""The append-only journal of settled prompts: what makes a 12-hour run survive `kill -9`.

One JSON line per settled prompt (accepted or given up) with every candidate of every round and its
component scores. A line is flushed and fsync'ed before the prompt counts as done; a torn last line
(the process died mid-write) is cut off on the next open, so that prompt is simply generated again.
Any other line that is not a valid record is an error naming the file and the line: it is not ours to drop.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path
from typing import Iterable

from .errors import PipelineError
from .faultpoints import reached
from .selection import ScoredReply

JOURNAL_GLOB = "journal.rank*.jsonl"
STATUSES = ("accepted", "failed")
# token_ids (the generated ids) may be missing: journals of older versions have no ids; their pairs train as text
OPTIONAL_REPLY_KEYS = ("token_ids", "ended_on_eos")  # absent from older journals
REPLY_KEYS = {f.name: f.type for f in dataclasses.fields(ScoredReply) if f.name not in OPTIONAL_REPLY_KEYS}


def journal_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"journal.rank{rank}.jsonl"


def _cut_torn_tail(path: Path) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")
        try:  # one writer per journal, even if two processes took the same rank
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise PipelineError(f"{self.path}: another process is writing this journal (the same rank twice?); "
                                "stop it or wait for it to end, then run again") from None
        _cut_torn_tail(self.path)
        self.appended = 0  # by this process: the number its fault point `settled` reports

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.appended += 1
        reached(f"settled:{self.appended}", self.path)

    def close(self) -> None:
        self._file.close()


def _is(value, kind) -> bool:
    if kind in (float, "float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in (int, "int"):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def _are_ids(value) -> bool:
    """None (not recorded) or a list of token ids."""
    return value is None or isinstance(value, list) and all(_is(i, int) for i in value)


def record_problem(record) -> str | None:
    """What makes a journal line no settled prompt (None: it is one): the keys finalize and --reselect read."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    expected = {"index": int, "dialogue": int, "prompt": str, "target_emotion": str, "rounds": list}
    for key, kind in expected.items():
        if key not in record:
            return f"key {key!r} is missing"
        if not (isinstance(record[key], list) if kind is list else _is(record[key], kind)):
            return f"key {key!r}: expected {kind.__name__}, got {json.dumps(record[key])[:40]}"
    if record.get("status") not in STATUSES:
        return f"key 'status': {json.dumps(record.get('status'))}, expected one of {', '.join(STATUSES)}"
    rounds = record["rounds"]
    if not rounds or not all(isinstance(r, list) and r for r in rounds):
        return "key 'rounds': expected a non-empty list of non-empty rounds"
    for round_at, round_ in enumerate(rounds):
        for reply_at, reply in enumerate(round_):
            if not isinstance(reply, dict) or set(reply) - set(OPTIONAL_REPLY_KEYS) != set(REPLY_KEYS) or not all(
                    _is(reply[k], kind) for k, kind in REPLY_KEYS.items()) or not _are_ids(reply.get("token_ids")) \
                    or reply.get("ended_on_eos") not in (None, True, False):
                return (f"rounds[{round_at}][{reply_at}]: expected a scored reply with keys "
                        f"{', '.join(REPLY_KEYS)} of their types (and token_ids, a list of ids; ended_on_eos, "
                        "true or false)")
    if not _are_ids(record.get("prompt_ids")):
        return "key 'prompt_ids': expected a list of token ids"
    if record["status"] == "accepted":
        for side in ("chosen", "rejected"):
            round_key, key = f"{side}_round", f"{side}_at"
            at_round = record.get(round_key)  # absent or null: the last round (the reference's rule)
            if at_round is not None and (not _is(at_round, int) or not 0 <= at_round < len(rounds)):
                return f"key {round_key!r}: expected the position of a round (0-{len(rounds) - 1}) or null, " \
                       f"got {json.dumps(at_round)}"
            size = len(rounds[-1 if at_round is None else at_round])
            if not _is(record.get(key), int) or not 0 <= record[key] < size:
                where = "the last round" if at_round is None else f"round {at_round}"
                return f"key {key!r}: expected the position of a reply of {where} (0-{size - 1}), " \
                       f"got {json.dumps(record.get(key))}"
    elif not isinstance(record.get("reason"), str):
        return "key 'reason': a failed prompt needs the reason of its last round"
    return None


def read_journal_lines(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) of each settled prompt; a torn last line (no newline) is no settled prompt."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # the process died mid-write: that prompt is generated again
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}:{number}: not a JSON line ({e.msg}); {_WAY_OUT}") from None
            problem = record_problem(record)
            if problem:
                raise PipelineError(f"{path}:{number}: not a settled prompt: {problem}; {_WAY_OUT}")
            records.append((number, record))
    return records


_WAY_OUT = ("delete that line (the prompt is generated again on resume) or restore it from a copy; "
            "--fresh starts a new run")


def read_journal(path: str | Path) -> list[dict]:
    return [record for _, record in read_journal_lines(path)]


def merge_journals(paths: Iterable[str | Path]) -> list[dict]:
    """All settled prompts of all processes, by prompt index.

    A prompt settled twice (two processes once wrote into one journal) is kept once when both records are
    identical, with a notice; two different records are an error naming both lines, with the way out."""
    by_index: dict[int, tuple[str, dict]] = {}
    repeated = []
    for path in sorted(paths):
        for number, record in read_journal_lines(path):
            index = record["index"]
            where = f"{path}:{number}"
            if index in by_index:
                first, kept = by_index[index]
                if kept != record:
                    raise PipelineError(
                        f"prompt {index} is settled twice with different results: {first} and {where} "
                        f"(two processes wrote this run). Delete one of the two lines to keep the other "
                        f"(e.g. sed -i '{number}d' {path}), then run again")
                repeated.append(where)
                continue
            by_index[index] = (where, record)
    if repeated:
        print(f"{len(repeated)} journal lines repeat a settled prompt with the identical record (two processes "
              f"wrote this run once); each prompt is kept once. First: {repeated[0]}")
    return [by_index[i][1] for i in sorted(by_index)]


def journal_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob(JOURNAL_GLOB))
