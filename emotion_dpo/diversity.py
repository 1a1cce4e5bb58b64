"""Degeneration figures of a set of replies: pure functions of plain strings.

A model trained on its own reward can learn a few stock sentences that the reward likes; accuracy then rises while
the replies stop depending on the dialogue. These figures show that: how many different replies there are, how
varied their words are, how many replies are "canned" (the very same text given to several different prompts), and
how much the most frequent reply takes.

- distinct replies: the number of different reply texts (compared after stripping surrounding spaces);
- distinct-1 / distinct-2: different words / word pairs over all words / word pairs of all replies (Li et al. 2016,
  corpus level; words split on white space, as the tokenizer-free measure the literature uses);
- canned share: the share of replies whose text was given to CANNED_PROMPTS or more different prompts;
- most frequent reply and its share; mean and SD of the length in words.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter, defaultdict

CANNED_PROMPTS = 3  # a reply given to this many different prompts is canned

# The collapse warning (see docs/evaluation.md, "Collapse warning"): a model is flagged when
#  - its distinct replies fall below DISTINCT_FLOOR x SFT's (half its variety gone), or
#  - its canned share exceeds CANNED_FACTOR x SFT's (twice as many stock replies), or
#  - within a requested emotion with at least MIN_GROUP prompts, one reply takes more than TOP_SHARE_LIMIT of them
#    (on the demo world the ceiling's expected share is 8-15 %, SFT's worst 12.5 %).
DISTINCT_FLOOR = 0.5
CANNED_FACTOR = 2.0
TOP_SHARE_LIMIT = 0.30
MIN_GROUP = 10


def _ngrams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    grams = [g for t in texts for g in _ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity(texts: list[str], prompts: list | None = None) -> dict:
    """The figures above for one set of replies; `prompts[i]` names the prompt reply i answered (default: each
    reply its own prompt), so that a reply counts as canned only when different prompts got it."""
    texts = [t.strip() for t in texts]
    prompts = list(range(len(texts))) if prompts is None else list(prompts)
    counts = Counter(texts)
    askers = defaultdict(set)
    for text, prompt in zip(texts, prompts):
        askers[text].add(prompt)
    canned = sum(n for text, n in counts.items() if len(askers[text]) >= CANNED_PROMPTS)
    top, top_count = counts.most_common(1)[0] if texts else ("", 0)
    lengths = [len(t.split()) for t in texts]
    return {
        "replies": len(texts),
        "distinct_replies": len(counts),
        "distinct_share": len(counts) / len(texts) if texts else 0.0,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "canned_replies": canned,
        "canned_share": canned / len(texts) if texts else 0.0,
        "most_frequent_reply": top,
        "most_frequent_count": top_count,
        "most_frequent_share": top_count / len(texts) if texts else 0.0,
        "length_words_mean": statistics.fmean(lengths) if lengths else 0.0,
        "length_words_sd": statistics.stdev(lengths) if len(lengths) > 1 else 0.0,
    }


def diversity_by_group(texts: list[str], groups: list[str], prompts: list | None = None) -> dict:
    """diversity() within each group (e.g. each requested emotion), groups sorted by name."""
    prompts = list(range(len(texts))) if prompts is None else list(prompts)
    table = {}
    for group in sorted(set(groups)):
        rows = [i for i, g in enumerate(groups) if g == group]
        table[group] = diversity([texts[i] for i in rows], [prompts[i] for i in rows])
    return table


def diversity_report(texts: list[str], groups: list[str], prompts: list | None = None) -> dict:
    return {**diversity(texts, prompts), "by_group": diversity_by_group(texts, groups, prompts)}


def per_draw_report(texts: list[str], groups: list[str], prompts: list, draws: int) -> dict:
    """diversity_report of `draws` replies per prompt (a prompt's draws next to each other), on the scale of one reply
    per prompt: each number is the mean over the draws of that draw's report (draw j: the j-th reply of every
    prompt), a lower-noise estimate of the one-reply figure; the most frequent replies are named over all draws."""
    pooled = diversity_report(texts, groups, prompts)
    if draws == 1:
        return pooled
    reports = [diversity_report(texts[j::draws], groups[j::draws], prompts[j::draws]) for j in range(draws)]
    return _mean_of(reports, pooled)


def _mean_of(reports: list[dict], pooled: dict) -> dict:
    mean = {}
    for key, value in pooled.items():
        if isinstance(value, dict):
            mean[key] = _mean_of([r[key] for r in reports], value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            mean[key] = statistics.fmean(r[key] for r in reports)
        else:  # a text: named over all draws
            mean[key] = value
    return mean


def collapse_warnings(model: dict, sft: dict) -> list[str]:
    """Why a model's replies count as collapsed against SFT's (diversity_report of each); [] when they do not."""
    reasons = []
    if model["distinct_replies"] < DISTINCT_FLOOR * sft["distinct_replies"]:
        reasons.append(f"distinct replies {model['distinct_replies']:g} < {DISTINCT_FLOOR:g} x SFT's "
                       f"{sft['distinct_replies']:g}")
    if model["canned_share"] > CANNED_FACTOR * sft["canned_share"]:
        reasons.append(f"canned share {model['canned_share']:.3f} > {CANNED_FACTOR:g} x SFT's {sft['canned_share']:.3f}")
    for group, row in model.get("by_group", {}).items():
        if row["replies"] >= MIN_GROUP and row["most_frequent_share"] > TOP_SHARE_LIMIT:
            reasons.append(f"{group}: {row['most_frequent_share']:.0%} of its {row['replies']:g} prompts get "
                           f"{row['most_frequent_reply']!r}")
    return reasons


# ------------------------------------------------------------------ the ceiling of a finite language

def ceiling(prompts_per_group: dict, well_formed: dict, draws: int = 2000, seed: int = 0) -> dict:
    """What a model that always answers in the requested emotion, choosing uniformly among that emotion's
    well-formed replies, keeps: the expected distinct replies (exact: a group of n prompts over W replies keeps
    W (1 - (1 - 1/W)^n)) and, per group, the expected share of its most frequent reply (by `draws` seeded draws).
    `well_formed`: group -> its replies; `prompts_per_group`: group -> prompts."""
    rng = random.Random(seed)
    distinct, top = 0.0, {}
    for group, n in sorted(prompts_per_group.items()):
        replies = sorted(set(well_formed[group]))
        w = len(replies)
        distinct += w * (1 - (1 - 1 / w) ** n)
        shares = [max(Counter(rng.randrange(w) for _ in range(n)).values()) / n for _ in range(draws)]
        top[group] = {"prompts": n, "well_formed": w, "expected_most_frequent_share": statistics.fmean(shares)}
    return {"prompts": sum(prompts_per_group.values()), "expected_distinct_replies": distinct, "by_group": top}


def replies_file_reports(path) -> dict:
    """Each model's diversity_report from evaluate's replies.jsonl (one line per prompt: index, target_emotion and a
    {"text": ...} per model)."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    models = [key for key, value in rows[0].items() if isinstance(value, dict) and "text" in value] if rows else []
    groups = [row["target_emotion"] for row in rows]
    prompts = [row["index"] for row in rows]
    return {m: diversity_report([row[m]["text"] for row in rows], groups, prompts) for m in models}
