"""The journal, line by line as docs/reliability.md ("What a 12-hour job can count on") promises it: one writer,
every line flushed and fsync'ed before it counts, strict types on read, a torn last line dropped, records merged
by prompt."""

import json
import os

import pytest

from emotion_dpo.errors import PipelineError
from emotion_dpo.journal import Journal, merge_journals, read_journal, record_problem


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_second_journal_on_the_same_file_is_refused_while_the_first_is_open(tmp_path):
    first = Journal(tmp_path / "journal.rank0.jsonl")
    with pytest.raises(PipelineError, match="another process is writing this journal"):
        Journal(tmp_path / "journal.rank0.jsonl")
    first.close()
    Journal(tmp_path / "journal.rank0.jsonl").close()  # free again once the first is closed


def test_an_appended_record_is_on_disk_before_append_returns(tmp_path, settled_record, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    journal = Journal(tmp_path / "journal.rank0.jsonl")
    journal.append(settled_record(0))
    assert read_journal(tmp_path / "journal.rank0.jsonl") == [settled_record(0)]  # readable before close: flushed
    assert len(synced) == 1  # and fsync'ed
    journal.close()


def test_opening_a_journal_cuts_a_torn_last_line(tmp_path, settled_record):
    path = tmp_path / "journal.rank0.jsonl"
    whole = json.dumps(settled_record(0)) + "\n"
    path.write_text(whole + json.dumps(settled_record(1))[:30])
    Journal(path).close()
    assert path.read_text() == whole


@pytest.mark.parametrize("change, problem", [
    ({"index": True}, "key 'index': expected int, got true"),
    ({"status": "done"}, "key 'status': \"done\", expected one of accepted, failed"),
    ({"chosen_at": 2}, "key 'chosen_at': expected the position of a reply of the last round (0-1), got 2"),
    ({"chosen_at": -1}, "key 'chosen_at': expected the position of a reply of the last round (0-1), got -1"),
    ({"rejected_at": True}, "key 'rejected_at': expected the position of a reply of the last round (0-1), got true"),
    # the record's one round: round 0 is the only position a chosen_round may name
    ({"chosen_round": 1}, "key 'chosen_round': expected the position of a round (0-0) or null, got 1"),
    ({"rejected_round": -1}, "key 'rejected_round': expected the position of a round (0-0) or null, got -1"),
    ({"chosen_round": 0, "chosen_at": 2}, "key 'chosen_at': expected the position of a reply of round 0 (0-1), got 2"),
    ({"prompt_ids": "1 2 3"}, "key 'prompt_ids': expected a list of token ids"),
    ({"prompt_ids": [1, 2.0]}, "key 'prompt_ids': expected a list of token ids"),
    ({"rounds": [[]]}, "key 'rounds': expected a non-empty list of non-empty rounds"),
])
def test_a_record_with_a_wrong_value_is_no_settled_prompt(settled_record, change, problem):
    assert record_problem({**settled_record(0), **change}) == problem


def test_prompt_ids_may_be_missing_or_a_list_of_ids(settled_record):
    assert record_problem({**settled_record(0), "prompt_ids": [1, 2, 3]}) is None
    assert record_problem(settled_record(0)) is None  # older journals have none


def test_a_failed_record_needs_the_reason_of_its_last_round(settled_record):
    failed = settled_record(0, accepted=False)
    assert record_problem(failed) is None
    assert record_problem({**failed, "reason": None}) == "key 'reason': a failed prompt needs the reason of its last round"


@pytest.mark.parametrize("change", [
    {"total": True},  # JSON true is no number
    {"length": False},
    {"text": 5},
    {"token_ids": [1, True]},
    {"token_ids": "1 2"},
    {"extra": 1},  # a key the record does not have
])
def test_a_reply_with_a_wrong_value_or_key_is_refused(settled_record, change):
    record = settled_record(0)
    record["rounds"][0][0].update(change)
    assert record_problem(record).startswith("rounds[0][0]: expected a scored reply")


def test_a_reply_may_carry_its_token_ids(settled_record):
    record = settled_record(0)
    record["rounds"][0][0]["token_ids"] = [5, 6]
    assert record_problem(record) is None


def test_records_of_several_journals_are_merged_by_prompt_index(tmp_path, settled_record):
    write(tmp_path / "journal.rank0.jsonl", [settled_record(2), settled_record(0)])
    write(tmp_path / "journal.rank1.jsonl", [settled_record(3), settled_record(1)])
    merged = merge_journals([tmp_path / "journal.rank0.jsonl", tmp_path / "journal.rank1.jsonl"])
    assert [r["index"] for r in merged] == [0, 1, 2, 3]


def test_two_different_records_of_one_prompt_are_an_error(tmp_path, settled_record):
    path = write(tmp_path / "journal.rank0.jsonl", [settled_record(0), settled_record(0, chosen="other .")])
    with pytest.raises(PipelineError, match="prompt 0 is settled twice with different results"):
        merge_journals([path])
