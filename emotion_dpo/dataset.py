"""Settled prompts -> the TRL-style preference dataset (and back again under other reward settings)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from .selection import (ScoredReply, chosen_order, distinct_texts, passing_in_pool, pick_pair, pool_settles,
                        rejected_place, rescore, round_failure, text_cap, top_share, uses_pool)

COLUMNS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")
# The token ids generation used, which fine_tune_dpo trains on as they are: the context the generator was
# conditioned on, and each reply's generated ids followed by the EOS the SFT model learned to end with.
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
PARTS = ("emotion_reward", "length_reward", "gibberish_reward")


def settle(prompt, rounds: list[list[ScoredReply]], selection, final: bool, eos_token_id: int) -> dict | None:
    """The journal record for a prompt whose rounds are enough, or that is given up (`final`); else None.

    The reference's rule: the latest round passes. With a diversity key (selection.uses_pool): the prompt's whole
    pool holds min_distinct_passing different passing texts; a prompt given up is accepted with what passes. The
    pair recorded here is the prompt's own best; finalize may re-pick it (choose_pairs)."""
    target = prompt.target_emotion
    pooled = uses_pool(selection)
    if pooled:
        passing = passing_in_pool(rounds, target, selection)
        if not final and distinct_texts(rounds, passing) < selection.min_distinct_passing:  # pool_settles' rule
            return None
        reason = None if passing else round_failure(rounds[-1], target, selection)
    else:
        reason = round_failure(rounds[-1], target, selection)
        if reason is not None and not final:
            return None
    record = {
        "index": prompt.index,
        "dialogue": prompt.dialogue,
        "prompt": prompt.text,
        "prompt_ids": list(prompt.ids),
        "eos_token_id": eos_token_id,
        "target_emotion": target,
        "status": "accepted" if reason is None else "failed",
        "reason": reason,
        "chosen_at": None,
        "rejected_at": None,
        "rounds": [[reply.to_dict() for reply in round_] for round_ in rounds],
    }
    return {**record, **pair_keys(rounds, target, selection)} if reason is None else record


def pair_keys(rounds, target: str, selection) -> dict:
    """chosen_at / rejected_at (positions in the last round) by the reference's rule; with a diversity key, the
    prompt's own best passing reply and lowest reply anywhere in its pool (chosen_round / rejected_round too)."""
    if not uses_pool(selection):
        chosen_at, rejected_at = pick_pair(rounds[-1])
        return {"chosen_at": chosen_at, "rejected_at": rejected_at}
    passing = passing_in_pool(rounds, target, selection)
    chosen = chosen_order(rounds, passing, None)[0]
    rejected = rejected_place(rounds, rounds[chosen[0]][chosen[1]], passing, None, selection.target_score_range)
    return {"chosen_round": chosen[0], "chosen_at": chosen[1], "rejected_round": rejected[0], "rejected_at": rejected[1]}


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
        if (pool_settles(rounds[:count], target, selection) if uses_pool(selection)
                else round_failure(rounds[count - 1], target, selection) is None):
            break
    rounds = rounds[:count]
    if uses_pool(selection):  # the stored rounds' end counts as given up: more would have needed generation
        reason = None if passing_in_pool(rounds, target, selection) else round_failure(rounds[-1], target, selection)
    else:
        reason = round_failure(rounds[-1], target, selection)
    unpicked = {key: None for key in ("chosen_round", "rejected_round") if key in record}
    return {
        **record,
        **unpicked,
        "status": "accepted" if reason is None else "failed",
        "reason": reason,
        "chosen_at": None,
        "rejected_at": None,
        **(pair_keys(rounds, target, selection) if reason is None else {}),
        "rounds": [[reply.to_dict() for reply in round_] for round_ in rounds],
    }


def picked(record: dict) -> tuple[dict, dict]:
    """An accepted record's (chosen, rejected) replies: positions in the last round, or in the round that
    chosen_round / rejected_round name (diversity-aware selection chooses over the prompt's whole pool)."""
    rounds = record["rounds"]
    chosen_round, rejected_round = record.get("chosen_round"), record.get("rejected_round")
    return (rounds[-1 if chosen_round is None else chosen_round][record["chosen_at"]],
            rounds[-1 if rejected_round is None else rejected_round][record["rejected_at"]])


def choose_pairs(records: list[dict], selection) -> tuple[list[dict], dict]:
    """The run's pairs under its diversity keys, counted in prompt order over the stored candidates, and what the
    rule changed: per target emotion, the most frequent chosen text's share before the rule (each prompt's own best)
    and after it, the cap, and the prompts left without a pair (every passing text at the cap).

    With the reference's rule the records are returned as they are (before = after)."""
    records = sorted(records, key=lambda r: r["index"])
    emotions = sorted({r["target_emotion"] for r in records if r["status"] == "accepted"})
    if not uses_pool(selection):
        texts = defaultdict(list)
        for r in records:
            if r["status"] == "accepted":
                texts[r["target_emotion"]].append(picked(r)[0]["text"].strip())
        return records, {e: cap_row(len(texts[e]), None, texts[e], texts[e], 0) for e in emotions}

    def pool(record):
        return [[ScoredReply(**reply) for reply in round_] for round_ in record["rounds"]]

    rarity = defaultdict(Counter)  # DivPO's measure: copies of a text among the run's candidates for the emotion
    for r in records:
        rarity[r["target_emotion"]].update(reply["text"].strip() for round_ in r["rounds"] for reply in round_)
    pools = {r["index"]: (rounds := pool(r), passing_in_pool(rounds, r["target_emotion"], selection))
             for r in records if r["status"] == "accepted"}
    accepted = defaultdict(int)  # per emotion, the prompts with a passing reply: the cap is a share of them
    for r in records:
        accepted[r["target_emotion"]] += r["status"] == "accepted" and bool(pools[r["index"]][1])
    caps = {e: text_cap(selection.chosen_text_cap, n, selection.chosen_text_cap_min) for e, n in accepted.items()}
    taken = defaultdict(Counter)
    before, after, dropped, out = defaultdict(list), defaultdict(list), Counter(), []
    for record in records:
        emotion = record["target_emotion"]
        if record["status"] != "accepted":
            out.append(record)
            continue
        rounds, passing = pools[record["index"]]
        if not passing:  # accepted under other rules (an older or hand-made journal): no pair under these
            out.append({**record, "status": "failed", "reason": round_failure(rounds[-1], emotion, selection)
                        or "no candidate passes in the prompt's pool", "chosen_at": None, "rejected_at": None,
                        "chosen_round": None, "rejected_round": None})
            continue
        order = chosen_order(rounds, passing, rarity[emotion] if selection.chosen_rule == "rarest" else None)
        best = chosen_order(rounds, passing, None)[0]
        before[emotion].append(rounds[best[0]][best[1]].text.strip())
        pick = next((p for p in order if taken[emotion][rounds[p[0]][p[1]].text.strip()] < caps[emotion]), None)
        if pick is None:
            dropped[emotion] += 1
            out.append({**record, "status": "failed", "reason": "every passing text is at chosen_text_cap",
                        "chosen_at": None, "rejected_at": None, "chosen_round": None, "rejected_round": None})
            continue
        chosen = rounds[pick[0]][pick[1]]
        taken[emotion][chosen.text.strip()] += 1
        after[emotion].append(chosen.text.strip())
        rejected = rejected_place(rounds, chosen, passing,
                                  rarity[emotion] if selection.rejected_rule == "most_common" else None,
                                  selection.target_score_range)
        out.append({**record, "chosen_round": pick[0], "chosen_at": pick[1], "rejected_round": rejected[0],
                    "rejected_at": rejected[1]})
    return out, {e: cap_row(accepted[e], caps[e], before[e], after[e], dropped[e]) for e in emotions}


def cap_row(prompts: int, cap, before: list[str], after: list[str], dropped: int) -> dict:
    top_before, share_before = top_share(before)
    top_after, share_after = top_share(after)
    return {"prompts": prompts, "cap": None if cap in (None, float("inf")) else cap,
            "top_text_before": top_before, "top_share_before": share_before,
            "top_text_after": top_after, "top_share_after": share_after, "left_without_pair": dropped}


def preference_row(record: dict) -> dict:
    chosen, rejected = picked(record)
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
