"""The statistics the reference reported for a preference dataset, plus acceptance and retry figures."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from .dataset import PARTS, picked  # PARTS in reward_weights' order
from .diversity import diversity_report
from .plotting import pyplot


pair_of = picked  # an accepted record's (chosen, rejected) replies


def gap_of(record: dict) -> float:
    chosen, rejected = pair_of(record)
    return chosen["total"] - rejected["total"]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values) if values else None,
            "mean": statistics.fmean(values) if values else None}


def by_emotion(records: list[dict]) -> dict:
    """Per target emotion: prompts settled, acceptance rate, mean rounds, score gap median and mean (accepted)."""
    table = {}
    for emotion in sorted({r["target_emotion"] for r in records}):
        mine = [r for r in records if r["target_emotion"] == emotion]
        accepted = [r for r in mine if r["status"] == "accepted"]
        table[emotion] = {"prompts": len(mine), "accepted": len(accepted),
                          "acceptance_rate": len(accepted) / len(mine),
                          "mean_rounds": statistics.fmean(len(r["rounds"]) for r in mine),
                          "score_gap": spread([gap_of(r) for r in accepted])}
    return table


def reward_parts(accepted: list[dict]) -> dict:
    """The distribution of each reward part over the chosen and over the rejected replies."""
    table = {}
    for part in PARTS:
        table[part] = {}
        for side, values in (("chosen", [pair_of(r)[0][part] for r in accepted]),
                             ("rejected", [pair_of(r)[1][part] for r in accepted])):
            table[part][side] = {**spread(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
                                 "min": min(values) if values else None, "max": max(values) if values else None}
    return table


def reply_diversity(accepted: list[dict]) -> dict:
    """The degeneration figures (diversity.py) of the chosen and of the rejected replies, overall and per target
    emotion: a preference set whose chosen replies are a few stock sentences teaches DPO to collapse."""
    emotions = [r["target_emotion"] for r in accepted]
    prompts = [r["index"] for r in accepted]
    return {side: diversity_report([pair_of(r)[i]["text"] for r in accepted], emotions, prompts)
            for i, side in enumerate(("chosen", "rejected"))}


def decided_by(accepted: list[dict], weights) -> dict:
    """How many pairs each part decides: the part whose weighted difference (chosen - rejected) adds most to
    the score gap."""
    counts = dict.fromkeys(PARTS, 0)
    for record in accepted:
        chosen, rejected = pair_of(record)
        shares = [w * (chosen[part] - rejected[part]) for w, part in zip(weights, PARTS)]
        counts[PARTS[shares.index(max(shares))]] += 1
    return counts


def cut_off_shares(accepted: list[dict]) -> dict:
    """The share of chosen and of rejected replies that generation cut off at max_new_tokens (no EOS), over the
    pairs whose journal records how they ended (older journals do not)."""
    known = [pair_of(r) for r in accepted if all(reply.get("ended_on_eos") is not None for reply in pair_of(r))]
    return {"pairs": len(known),
            "chosen": statistics.fmean(not c["ended_on_eos"] for c, _ in known) if known else None,
            "rejected": statistics.fmean(not r["ended_on_eos"] for _, r in known) if known else None}


# Bins of the chosen replies' length, as fractions of length_max: the reference's length reward rises to
# 2 x length_max and drops there to about 1 (the cliff), so the longest replies just under it win.
LENGTH_BINS = (0.0, 1.0, 1.5, 1.8, 2.0)


def length_against_cliff(lengths: list[float], length_max: float) -> dict:
    """How many chosen replies fall in each length bin (LENGTH_BINS x length_max, the last bin open-ended)."""
    edges = [f * length_max for f in LENGTH_BINS] + [float("inf")]
    bins = []
    for low, high in zip(edges, edges[1:]):
        n = sum(low <= length < high for length in lengths)
        bins.append({"from": low, "to": None if high == float("inf") else high, "chosen": n,
                     "share": n / len(lengths) if lengths else 0.0})
    return {"cliff": 2 * length_max, "bins": bins}


def chosen_text_warnings(rows: dict) -> list[str]:
    """The evaluation's collapse rule (diversity.py) on the pairs: within a target emotion with at least MIN_GROUP
    pairs, one chosen text takes more than TOP_SHARE_LIMIT of them. DPO learns what it is shown."""
    from .diversity import MIN_GROUP, TOP_SHARE_LIMIT

    return [f"{emotion}: {row['top_share_after']:.0%} of its {pairs} pairs choose {row['top_text_after']!r}"
            for emotion, row in rows.items()
            if (pairs := row["prompts"] - row["left_without_pair"]) >= MIN_GROUP
            and row["top_share_after"] > TOP_SHARE_LIMIT]


def summarize(records: list[dict], total_prompts: int | None = None, weights=None, chosen_text: dict | None = None,
              length_max: float | None = None) -> dict:
    """Score-gap median/mean/SD (sample SD), acceptance rate, rounds per prompt, failure reasons; by target emotion;
    the reward parts of chosen and rejected, and (given the reward weights) which part decides each pair."""
    accepted = [r for r in records if r["status"] == "accepted"]
    gaps = [gap_of(r) for r in accepted]
    rounds = [len(r["rounds"]) for r in records]
    return {
        "prompts_settled": len(records),
        "prompts_total": total_prompts if total_prompts is not None else len(records),
        "accepted": len(accepted),
        "failed": len(records) - len(accepted),
        "acceptance_rate": len(accepted) / len(records) if records else 0.0,
        "score_gap": {
            "median": statistics.median(gaps) if gaps else None,
            "mean": statistics.fmean(gaps) if gaps else None,
            "sd": statistics.stdev(gaps) if len(gaps) > 1 else None,
            "min": min(gaps) if gaps else None,
            "max": max(gaps) if gaps else None,
        },
        "rounds_per_prompt": {
            "mean": statistics.fmean(rounds) if rounds else None,
            "histogram": {str(k): v for k, v in sorted(Counter(rounds).items())},
        },
        "failure_reasons": dict(Counter(r["reason"] for r in records if r["status"] == "failed").most_common()),
        "by_emotion": by_emotion(records),
        "reward_parts": reward_parts(accepted),
        "cut_off": cut_off_shares(accepted),
        "diversity": reply_diversity(accepted),
        **({"decided_by": decided_by(accepted, weights)} if weights is not None else {}),
        **({"chosen_text": chosen_text, "collapse_ahead": chosen_text_warnings(chosen_text)}
           if chosen_text is not None else {}),
        **({"chosen_length": length_against_cliff([pair_of(r)[0]["length"] for r in accepted], length_max)}
           if length_max is not None else {}),
        "gaps": gaps,
    }


def format_summary(summary: dict) -> str:
    gap = summary["score_gap"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        f"prompts settled     {summary['prompts_settled']} / {summary['prompts_total']}",
        f"accepted            {summary['accepted']} ({100 * summary['acceptance_rate']:.1f} %)",
        f"failed              {summary['failed']}",
        f"score gap (chosen - rejected): median {fmt(gap['median'])}  mean {fmt(gap['mean'])}  SD {fmt(gap['sd'])}"
        f"   (reference: 17.547 / 16.144 / 5.815)",
        f"rounds per prompt   mean {fmt(summary['rounds_per_prompt']['mean'])}  histogram "
        + ", ".join(f"{k}: {v}" for k, v in summary["rounds_per_prompt"]["histogram"].items()),
    ]
    cut = summary.get("cut_off") or {}
    if cut.get("pairs"):
        lines.append(f"cut off at max_new_tokens: chosen {100 * cut['chosen']:.1f} %  rejected "
                     f"{100 * cut['rejected']:.1f} %  (of {cut['pairs']} pairs)")
    for reason, count in summary["failure_reasons"].items():
        lines.append(f"  failed: {reason}: {count}")
    for warning in summary.get("collapse_ahead", []):
        lines.append(f"COLLAPSE AHEAD in the pairs: {warning}")
    return "\n".join(lines)


def format_tables(summary: dict) -> str:
    """The per-emotion and per-reward-part tables (markdown: statistics.txt and the dataset card)."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| target emotion | prompts | accepted | acceptance rate | mean rounds | score gap median | "
             "score gap mean |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for emotion, row in summary["by_emotion"].items():
        lines.append(f"| {emotion} | {row['prompts']} | {row['accepted']} | {fmt(row['acceptance_rate'])} | "
                     f"{fmt(row['mean_rounds'])} | {fmt(row['score_gap']['median'])} | {fmt(row['score_gap']['mean'])} |")
    lines += ["", "| reward part | reply | median | mean | SD | min | max |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for part, sides in summary["reward_parts"].items():
        for side, d in sides.items():
            lines.append(f"| {part} | {side} | {fmt(d['median'])} | {fmt(d['mean'])} | {fmt(d['sd'])} | "
                         f"{fmt(d['min'])} | {fmt(d['max'])} |")
    if "diversity" in summary:
        d = summary["diversity"]
        lines += ["", "| replies | distinct | distinct-1 | distinct-2 | canned share (to >= 3 prompts) | most frequent "
                  "reply (share) | length in words, mean (SD) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for side, r in d.items():
            lines.append(f"| {side} | {r['distinct_replies']} of {r['replies']} | {fmt(r['distinct_1'])} | "
                         f"{fmt(r['distinct_2'])} | {fmt(r['canned_share'])} | {r['most_frequent_reply']!r} "
                         f"({fmt(r['most_frequent_share'])}) | {r['length_words_mean']:.2f} ({r['length_words_sd']:.2f}) |")
        lines += ["", "| target emotion | chosen: distinct / most frequent share | rejected: distinct / most frequent "
                  "share |", "| --- | --- | --- |"]
        for emotion, chosen in d["chosen"]["by_group"].items():
            rejected = d["rejected"]["by_group"][emotion]
            lines.append(f"| {emotion} | {chosen['distinct_replies']} of {chosen['replies']} / "
                         f"{fmt(chosen['most_frequent_share'])} | {rejected['distinct_replies']} of "
                         f"{rejected['replies']} / {fmt(rejected['most_frequent_share'])} |")
    if "chosen_text" in summary:
        lines += ["", "| target emotion | pairs | cap | top chosen text before the rule (share) | after the rule "
                  "(share) | left without a pair |", "| --- | --- | --- | --- | --- | --- |"]
        for emotion, row in summary["chosen_text"].items():
            lines.append(f"| {emotion} | {row['prompts'] - row['left_without_pair']} | "
                         f"{'-' if row['cap'] is None else row['cap']} | {row['top_text_before']!r} "
                         f"({fmt(row['top_share_before'])}) | {row['top_text_after']!r} ({fmt(row['top_share_after'])}) "
                         f"| {row['left_without_pair']} |")
    if "chosen_length" in summary:
        cliff = summary["chosen_length"]
        lines += ["", f"| chosen reply length (the reference's length reward drops at {cliff['cliff']:g}) | chosen | "
                  "share |", "| --- | --- | --- |"]
        for b in cliff["bins"]:
            span = f"{b['from']:g} and more" if b["to"] is None else f"{b['from']:g} to under {b['to']:g}"
            lines.append(f"| {span} | {b['chosen']} | {fmt(b['share'])} |")
    if "decided_by" in summary:
        total = sum(summary["decided_by"].values())
        lines += ["", "| reward part | pairs it decides (largest weighted share of the gap) |", "| --- | --- |"]
        lines += [f"| {part} | {count}" + (f" ({100 * count / total:.1f} %)" if total else "") + " |"
                  for part, count in summary["decided_by"].items()]
    return "\n".join(lines)


def plot_gaps(gaps: list[float], path: str | Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(gaps, bins=30, color="#4a7ab5")
    ax.set_xlabel("chosen_score - rejected_score")
    ax.set_ylabel("prompts")
    ax.set_title(f"Score gap, {len(gaps)} pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reward_parts(accepted: list[dict], path: str | Path) -> None:
    """One box plot per reward part: chosen against rejected."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(PARTS), figsize=(10, 3.5))
    for ax, part in zip(axes, PARTS):
        sides = [[pair_of(r)[0][part] for r in accepted], [pair_of(r)[1][part] for r in accepted]]
        if accepted:
            ax.boxplot(sides)
        ax.set_xticks([1, 2])
        ax.set_xticklabels(["chosen", "rejected"])
        ax.set_title(part.replace("_", " "))
    fig.suptitle(f"Reward parts, {len(accepted)} pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PLOTS = ("score_gap.png", "reward_parts.png")
STATISTICS_JSON, STATISTICS_TXT = "statistics.json", "statistics.txt"
REPORT_FILES = (STATISTICS_JSON, STATISTICS_TXT, *PLOTS)  # what write_report writes


def write_report(records: list[dict], folder: str | Path, total_prompts: int | None = None, weights=None,
                 chosen_text: dict | None = None, length_max: float | None = None) -> dict:
    folder = Path(folder)
    summary = summarize(records, total_prompts, weights, chosen_text, length_max)
    gaps = summary.pop("gaps")
    (folder / STATISTICS_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    (folder / STATISTICS_TXT).write_text(format_summary(summary) + "\n\n" + format_tables(summary) + "\n")
    plot_gaps(gaps, folder / PLOTS[0])
    plot_reward_parts([r for r in records if r["status"] == "accepted"], folder / PLOTS[1])
    return summary
