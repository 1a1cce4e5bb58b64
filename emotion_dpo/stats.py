"""The statistics the reference reported for a preference dataset, plus acceptance and retry figures."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path


def summarize(records: list[dict], total_prompts: int | None = None) -> dict:
    """Score-gap median/mean/SD (sample SD), acceptance rate, rounds per prompt, failure reasons."""
    accepted = [r for r in records if r["status"] == "accepted"]
    gaps = []
    for r in accepted:
        last = r["rounds"][-1]
        gaps.append(last[r["chosen_at"]]["total"] - last[r["rejected_at"]]["total"])
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
    for reason, count in summary["failure_reasons"].items():
        lines.append(f"  failed: {reason}: {count}")
    return "\n".join(lines)


def plot_gaps(gaps: list[float], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(gaps, bins=30, color="#4a7ab5")
    ax.set_xlabel("chosen_score - rejected_score")
    ax.set_ylabel("prompts")
    ax.set_title(f"Score gap, {len(gaps)} pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(records: list[dict], folder: str | Path, total_prompts: int | None = None) -> dict:
    folder = Path(folder)
    summary = summarize(records, total_prompts)
    gaps = summary.pop("gaps")
    (folder / "statistics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "statistics.txt").write_text(format_summary(summary) + "\n")
    plot_gaps(gaps, folder / "score_gap.png")
    return summary
