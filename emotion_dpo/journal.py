"""The append-only journal of settled prompts: what makes a 12-hour run survive `kill -9`.

One JSON line per settled prompt (accepted or given up) with every candidate of every round and its
component scores. A line is flushed and fsync'ed before the prompt counts as done; a torn last line
(the process died mid-write) is cut off on the next open, so that prompt is simply generated again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .errors import PipelineError

JOURNAL_GLOB = "journal.rank*.jsonl"


def journal_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"journal.rank{rank}.jsonl"


def shard(items: list, rank: int, world_size: int) -> list:
    """This process's share of the prompts under `accelerate launch`: every world_size-th one."""
    return items[rank::world_size]


def _cut_torn_tail(path: Path) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists():
            _cut_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_journal(path: str | Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):  # a torn last line is not a settled prompt
                records.append(json.loads(line))
    return records


def merge_journals(paths: Iterable[str | Path]) -> list[dict]:
    """All settled prompts of all processes, by prompt index; a prompt settled twice is an error."""
    by_index: dict[int, dict] = {}
    for path in sorted(paths):
        for record in read_journal(path):
            index = record["index"]
            if index in by_index:
                raise PipelineError(f"{path}: prompt {index} is settled twice (also in another journal line)")
            by_index[index] = record
    return [by_index[i] for i in sorted(by_index)]


def journal_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob(JOURNAL_GLOB))
