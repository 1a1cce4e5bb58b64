"""Settled prompts -> the TRL-style preference dataset (and back again under other reward settings)."""

from __future__ import annotations

import json
from pathlib import Path

from .selection import ScoredReply, pick_pair, rescore, round_failure

COLUMNS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")
# The token ids generation used, which fine_tune_dpo trains on as they are: the context the generator was
# conditioned on, and each reply's generated ids followed by the EOS the SFT model learned to end with.
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
PARTS = ("emotion_reward", "length_reward", "gibberish_reward")


def settle(prompt, rounds: list[list[ScoredReply]], selection, final: bool, eos_token_id: int) -> dict | None:
    """The journal record for a prompt whose latest round passed, or that is given up (`final`); else None."""
    last = rounds[-1]
    reason = round_failure(last, prompt.target_emotion, selection)
    if reason is not None and not final:
        return None
    chosen_at, rejected_at = pick_pair(last)
    return {
        "index": prompt.index,
        "dialogue": prompt.dialogue,
        "prompt": prompt.text,
        "prompt_ids": list(prompt.ids),
        "eos_token_id": eos_token_id,
        "target_emotion": prompt.target_emotion,
        "status": "accepted" if reason is None else "failed",
        "reason": reason,
        "chosen_at": chosen_at if reason is None else None,
        "rejected_at": rejected_at if reason is None else None,
        "rounds": [[reply.to_dict() for reply in round_] for round_ in rounds],
    }


def reselect(record: dict, rewards, selection, length_of=None) -> dict:
    """The record as if the run had used these reward and selection settings on the same candidates.

    Only the first 1 + `selection.max_retries` stored rounds count, and the first of them that passes decides;
    a prompt whose counted rounds all fail is failed (more rounds would have needed generation).
    `length_of(text)`, given when the length unit changed, measures each reply again.
    """
    target = record["target_emotion"]
    stored = record["rounds"][:1 + selection.max_retries]
    rounds = [[rescore(ScoredReply(**(r if length_of is None else {**r, "length": length_of(r["text"])})), target,
                       rewards) for r in round_] for round_ in stored]
    for count in range(1, len(rounds) + 1):
        if round_failure(rounds[count - 1], target, selection) is None:
            break
    rounds = rounds[:count]
    reason = round_failure(rounds[-1], target, selection)
    chosen_at, rejected_at = pick_pair(rounds[-1])
    return {
        **record,
        "status": "accepted" if reason is None else "failed",
        "reason": reason,
        "chosen_at": chosen_at if reason is None else None,
        "rejected_at": rejected_at if reason is None else None,
        "rounds": [[reply.to_dict() for reply in round_] for round_ in rounds],
    }


def preference_row(record: dict) -> dict:
    last = record["rounds"][-1]
    chosen, rejected = last[record["chosen_at"]], last[record["rejected_at"]]
    row = {
        "prompt": record["prompt"],
        "chosen": chosen["text"],
        "rejected": rejected["text"],
        "chosen_score": chosen["total"],
        "rejected_score": rejected["total"],
        **({"prompt_ids": record["prompt_ids"], "chosen_ids": sampled_ids(chosen, record["eos_token_id"]),
            "rejected_ids": sampled_ids(rejected, record["eos_token_id"])} if has_ids(record, chosen, rejected) else {}),
        "target_emotion": record["target_emotion"],
        "rounds": len(record["rounds"]),
        "index": record["index"],
    }
    for part in PARTS:
        row[f"chosen_{part}"] = chosen[part]
        row[f"rejected_{part}"] = rejected[part]
    return row


def sampled_ids(reply: dict, eos_token_id: int) -> list[int]:
    """What DPO trains on: the ids as sampled, the EOS included when generation stopped on it. A reply cut off at
    max_new_tokens gets none (the model never chose to end there); a journal from before `ended_on_eos` was
    recorded gets one, as then."""
    return reply["token_ids"] + ([] if reply.get("ended_on_eos") is False else [eos_token_id])


def has_ids(record: dict, *replies: dict) -> bool:
    return (record.get("prompt_ids") is not None and record.get("eos_token_id") is not None
            and all(reply.get("token_ids") is not None for reply in replies))


def failure_row(record: dict) -> dict:
    return {"index": record["index"], "dialogue": record["dialogue"], "reason": record["reason"],
            "rounds": len(record["rounds"])}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


DATASET_DIR, PREFERENCES_JSONL, FAILED_JSONL = "dataset", "preferences.jsonl", "failed.jsonl"
DATASET_FILES = (DATASET_DIR, PREFERENCES_JSONL, FAILED_JSONL)  # what write_dataset writes


def write_dataset(records: list[dict], folder: str | Path) -> dict:
    """Write dataset/ (save_to_disk), preferences.jsonl and failed.jsonl into `folder` (finalize's staging folder,
    switched in whole afterwards). With no accepted pair the dataset is still written with its schema, so
    `load_from_disk` reads it back as 0 rows (save_to_disk writes no data file for 0 rows unless told 1 shard)."""
    import datasets

    folder = Path(folder)
    rows = [preference_row(r) for r in records if r["status"] == "accepted"]
    failures = [failure_row(r) for r in records if r["status"] == "failed"]
    without = sum(ID_COLUMNS[0] not in row for row in rows)
    if without:  # one schema for all rows: text only (fine_tune_dpo tokenizes it as generation would)
        print(f"{without} of {len(rows)} pairs come from journal lines without token ids (an older version wrote "
              "them): the dataset holds text only")
        rows = [{k: v for k, v in row.items() if k not in ID_COLUMNS} for row in rows]
    if rows:
        columns = {name: [row[name] for row in rows] for name in rows[0]}
        datasets.Dataset.from_dict(columns).save_to_disk(str(folder / DATASET_DIR))
    else:
        empty = datasets.Dataset.from_dict({name: [] for name in preference_features()}, features=preference_features())
        empty.save_to_disk(str(folder / DATASET_DIR), num_shards=1)
    _write_jsonl(folder / PREFERENCES_JSONL, rows)
    _write_jsonl(folder / FAILED_JSONL, failures)
    return {"accepted": len(rows), "failed": len(failures)}


def preference_features():
    """The dataset's schema, for a dataset of 0 rows (with rows, datasets infers the same types from them)."""
    import datasets

    kinds = {"prompt": "string", "chosen": "string", "rejected": "string", "target_emotion": "string",
             "rounds": "int64", "index": "int64"}
    return datasets.Features({name: datasets.List(datasets.Value("int64")) if name in ID_COLUMNS
                              else datasets.Value(kinds.get(name, "float64")) for name in preference_row_columns()})


def preference_row_columns() -> list[str]:
    return [*COLUMNS, *ID_COLUMNS, "target_emotion", "rounds", "index", *(f"{s}_{p}" for p in PARTS for s in ("chosen", "rejected"))]
