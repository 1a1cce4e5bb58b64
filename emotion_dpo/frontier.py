"""Settings side by side: held-out-judge emotion accuracy against distinct replies, per iteration of each run.

    python -m emotion_dpo.frontier --judge demo_world/judge --label-map joy=happiness --out outputs/frontier \\
        today=outputs/frontier/today anchor=outputs/frontier/anchor ...

Reads each run's iter-k/evaluation/replies.jsonl (the replies and the training classifier's labels), judges the
replies with the judge, and writes frontier.md, frontier.json and frontier.png (x: distinct replies as a share of
SFT's, y: the judge's emotion accuracy; the issue's goal region shaded)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import EMOTIONS
from .diversity import replies_file_reports
from .judges import judge_figures, judge_label_mapping, judge_replies
from .plotting import pyplot

GOAL = {"distinct_of_sft": 0.55, "judge_accuracy_over_sft": 0.25, "worst_emotion_share": 0.30}


def run_points(name: str, run: Path, judge: str, mapping: list[str]) -> list[dict]:
    points = []
    for evaluation in sorted(run.glob("iter-*/evaluation/replies.jsonl"), key=lambda p: int(p.parts[-3][5:])):
        rows = [json.loads(line) for line in evaluation.read_text().splitlines() if line.strip()]
        reports = replies_file_reports(evaluation)
        targets = [r["target_emotion"] for r in rows]
        iteration = int(evaluation.parts[-3][5:])
        for model in ("SFT", "DPO") if iteration == 1 else ("DPO",):
            accuracy = judge_figures(targets, judge_replies(judge, mapping, [r[model]["text"] for r in rows], 256))
            report = reports[model]
            points.append({
                "setting": name, "iteration": 0 if model == "SFT" else iteration,
                "distinct_replies": report["distinct_replies"], "canned_share": report["canned_share"],
                "worst_emotion_share": max(g["most_frequent_share"] for g in report["by_group"].values()),
                "judge_accuracy": accuracy["emotion_accuracy"],
                "training_classifier_accuracy": sum(r[model]["emotion_label"].lower() == t.lower()
                                                    for r, t in zip(rows, targets)) / len(rows)})
    return points


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER")
    parser.add_argument("--judge", required=True)
    parser.add_argument("--label-map", nargs="*", default=[], help="JUDGE_LABEL=EMOTION")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from .models import classifier_labels

    mapping = judge_label_mapping(classifier_labels(args.judge), dict(m.split("=", 1) for m in args.label_map),
                                  EMOTIONS, args.judge)
    points = []
    for spec in args.runs:
        name, folder = spec.split("=", 1)
        points += run_points(name, Path(folder), args.judge, mapping)
    sft = next(p for p in points if p["iteration"] == 0)
    for p in points:
        p["distinct_of_sft"] = p["distinct_replies"] / sft["distinct_replies"]
        p["meets_goal"] = (p["iteration"] > 0 and p["distinct_of_sft"] >= GOAL["distinct_of_sft"]
                           and p["worst_emotion_share"] <= GOAL["worst_emotion_share"]
                           and p["judge_accuracy"] >= sft["judge_accuracy"] + GOAL["judge_accuracy_over_sft"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps({"goal": GOAL, "points": points}, indent=2) + "\n")
    lines = ["| setting | iteration | judge accuracy | training classifier accuracy | distinct replies (of SFT's) | "
             "canned share | worst emotion's most frequent share | meets the goal |", "| --- |" + " --- |" * 7]
    for p in points:
        if p["iteration"] == 0 and p is not sft:
            continue
        lines.append(f"| {'SFT' if p['iteration'] == 0 else p['setting']} | {p['iteration']} | {p['judge_accuracy']:.3f} | "
                     f"{p['training_classifier_accuracy']:.3f} | {p['distinct_replies']} ({p['distinct_of_sft']:.0%}) | "
                     f"{p['canned_share']:.3f} | {p['worst_emotion_share']:.3f} | {'yes' if p['meets_goal'] else 'no'} |")
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(points, sft, out / "frontier.png")


def plot(points: list[dict], sft: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.fill_between([GOAL["distinct_of_sft"], 1.1], sft["judge_accuracy"] + GOAL["judge_accuracy_over_sft"], 1.0,
                    color="green", alpha=0.1, label="goal (and worst emotion <= 30 %)")
    ax.plot([1.0], [sft["judge_accuracy"]], "k*", markersize=12, label="SFT")
    for setting in dict.fromkeys(p["setting"] for p in points):
        mine = [p for p in points if p["setting"] == setting and p["iteration"] > 0]
        ax.plot([p["distinct_of_sft"] for p in mine], [p["judge_accuracy"] for p in mine], marker="o", label=setting)
        for p in mine:
            ax.annotate(str(p["iteration"]), (p["distinct_of_sft"], p["judge_accuracy"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel("distinct replies / SFT's")
    ax.set_ylabel("held-out judge: emotion accuracy")
    ax.set_xlim(0, 1.1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("frontier: judge accuracy against diversity (numbers: iteration)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
