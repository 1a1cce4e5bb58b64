"""run_pipeline.py's stages: generate_preferences -> fine_tune_dpo -> evaluate, `iterations` times, in one run folder.

Each stage runs as its own script in a child process (the same command a user would type, with --set for the
keys the pipeline decides). A fresh process per stage: unsloth patches TRL and transformers for the whole process
when it is imported, the GPU memory of one stage's models is given back before the next loads, and each stage's
own checks, resume and refusal of a changed config apply exactly as when it is run by hand.

    run/iter-1/preferences  iter-1/dpo  iter-1/evaluation  iter-1/<stage>.done.json  ...  iterations.{md,json,png}

A stage is finished when its marker `<stage>.done.json` (written atomically after the stage exits cleanly, holding
the stage's resolved config) exists: it is skipped. An unfinished one is run again through its own resume.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import config as config_module
from .config import differing_keys, differing_keys_except, load_config, save_config, to_dict
from .dpo_train import FINAL_ADAPTER, METRICS_NAME
from .errors import PipelineError
from .distributed import die_with_parent, launch_command
from .evaluation import RESULT_FILES, RESULTS_JSON
from .files import PIPELINE_SCRIPT, FolderLock, claim_run_folder, folder_entries, write_text_atomic
from .plotting import pyplot
from .stats import STATISTICS_JSON

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class StageKind:
    name: str  # the pipeline config's section
    folder: str  # sub-folder of iter-k
    script: str
    config_class: str
    owned: frozenset  # keys the pipeline sets

    @property
    def unchanged_when_finished(self) -> frozenset:
        """Keys that may differ from a finished stage's: they change nothing it made (the stage's own list)."""
        return getattr(config_module, self.config_class).unchanged_results


GENERATE = StageKind("generate", "preferences", "generate_preferences.py", "GenerateConfig",
                     frozenset({"output_dir", "skip_prompts"}))
DPO = StageKind("dpo", "dpo", "fine_tune_dpo.py", "TrainConfig",
                frozenset({"output_dir", "dataset", "earlier_datasets", "resume_from_checkpoint", "reference_adapter"}))
EVALUATE = StageKind("evaluate", "evaluation", "evaluate.py", "EvaluateConfig",
                     frozenset({"output_dir", "dpo_adapter"}))
KINDS = (GENERATE, DPO, EVALUATE)
SHARED_KEYS = ("base_model", "adapter", "chat_template")  # one generator: the three stages must agree


@dataclasses.dataclass
class Stage:
    kind: StageKind
    iteration: int
    folder: Path
    config_file: str
    overrides: list[str]  # --set KEY=VALUE, the user's then the pipeline's
    resolved: dict  # the stage's resolved config, as the stage saves it

    @property
    def marker(self) -> Path:
        return self.folder.parent / f"{self.folder.name}.done.json"

    @property
    def label(self) -> str:
        return f"iteration {self.iteration} {self.kind.script}"

    def command(self, flags=(), num_processes: int = 1) -> list[str]:
        args = [str(ROOT / self.kind.script), "--config", self.config_file, *flags]
        for override in self.overrides:
            args += ["--set", override]
        return launch_command(args, num_processes)


# ------------------------------------------------------------------ the plan: every stage's config, resolved up front

def section_overrides(section: dict, prefix: str = "") -> list[str]:
    """A stage section's keys (less "config" and comments) as --set overrides; nested sections key by key."""
    overrides = []
    for key, value in section.items():
        if key.startswith("_") or (not prefix and key == "config"):
            continue
        if isinstance(value, dict):
            overrides += section_overrides(value, f"{prefix}{key}.")
        else:
            overrides.append(f"{prefix}{key}={json.dumps(value)}")
    return overrides


def resolve_stage(cfg, kind: StageKind, overrides: list[str]):
    section = getattr(cfg, kind.name)
    try:
        return load_config(getattr(config_module, kind.config_class), section["config"], overrides)
    except PipelineError as e:
        raise PipelineError(f"{cfg.source}: section {kind.name}:\n{e}") from None


def user_overrides(cfg, kind: StageKind) -> list[str]:
    overrides = section_overrides(getattr(cfg, kind.name))
    owned = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].split(".")[0] in kind.owned]
    if owned:
        raise PipelineError(f"{cfg.source}: key {kind.name}.{owned[0]}: set by the pipeline for each iteration "
                            f"({kind.name}: {', '.join(sorted(kind.owned))}); the run folder is the top-level output_dir")
    return overrides


def check_one_generator(cfg, configs: dict) -> None:
    for key in SHARED_KEYS:
        values = {name: getattr(c, key) for name, c in configs.items()}
        if len(set(values.values())) > 1:
            raise PipelineError(
                f"{cfg.source}: the stages name different {key}s ("
                + ", ".join(f"{name}: {value}" for name, value in values.items())
                + f"); one generator runs through the pipeline: set the same {key} in each stage")


def plan(cfg) -> list[Stage]:
    """Every stage of every iteration with its resolved config; the config problems of all of them raised together
    before anything runs (each once: a stage file's problem recurs in every iteration)."""
    run, problems = Path(cfg.output_dir), {}

    def checked(check, *args):
        try:
            return check(*args)
        except PipelineError as e:
            problems[str(e)] = None

    base = {kind.name: checked(user_overrides, cfg, kind) for kind in KINDS}
    first = {kind.name: checked(resolve_stage, cfg, kind, base[kind.name])
             for kind in KINDS if base[kind.name] is not None}
    if all(first.get(kind.name) for kind in KINDS):
        checked(check_one_generator, cfg, first)
    stages = []
    if first.get("generate"):
        sft = first["generate"].adapter
        per_iteration = first["generate"].num_prompts
        if cfg.iterations > 1 and cfg.fresh_prompts_per_iteration and per_iteration is None:
            problems[f"{cfg.source}: key generate.num_prompts: fresh_prompts_per_iteration needs a number of prompts "
                     "per iteration (null takes them all, leaving none for iteration 2)"] = None
            per_iteration = 0
        for k in range(1, cfg.iterations + 1):
            folder = run / f"iter-{k}"
            generator = sft if k == 1 else str(run / f"iter-{k - 1}" / DPO.folder / FINAL_ADAPTER)
            # iteration 1 takes the first prompts even when num_prompts is null (all of them): no count to skip
            skip = first["generate"].skip_prompts + (
                (k - 1) * per_iteration if cfg.fresh_prompts_per_iteration and k > 1 else 0)
            owned = {
                "generate": [f"adapter={generator}", f"skip_prompts={skip}"],
                # iteration k trains on from the adapter that sampled its data; TRL's frozen "ref" is a copy of it,
                "dpo": [f"adapter={generator}", f"dataset={folder / GENERATE.folder / 'dataset'}"]
                # accumulate_pairs: iteration k trains on the pairs of iterations 1..k (arXiv 2404.01413)
                + ([f"earlier_datasets={json.dumps([str(run / f'iter-{j}' / GENERATE.folder / 'dataset') for j in range(1, k)])}"]
                   if k > 1 and cfg.accumulate_pairs else [])
                # dpo_reference "sft": the SFT adapter stays the frozen reference of every iteration (an anchor)
                + ([f"reference_adapter={sft}"] if k > 1 and cfg.dpo_reference == "sft" else []),
                # every iteration against the SFT model, on the same held-out prompts
                "evaluate": [f"adapter={sft}", f"dpo_adapter={folder / DPO.folder / FINAL_ADAPTER}"],
            }
            for kind in KINDS:
                if base[kind.name] is None:
                    continue
                overrides = base[kind.name] + owned[kind.name] + [f"output_dir={folder / kind.folder}"]
                stage_cfg = checked(resolve_stage, cfg, kind, overrides)
                if stage_cfg is not None:
                    stages.append(Stage(kind, k, folder / kind.folder, stage_cfg.source, overrides, to_dict(stage_cfg)))
    if problems:
        raise PipelineError("\n".join(problems))
    return stages


# ------------------------------------------------------------------ running one stage

def mark_finished(stage: Stage) -> None:
    # whole or not at all: a kill mid-write leaves no half marker that would read as finished
    write_text_atomic(stage.marker, json.dumps({"stage": stage.kind.script, "iteration": stage.iteration,
                                                "config": stage.resolved}, indent=2, sort_keys=True) + "\n")


def refuse_changed(stage: Stage, saved: dict, what: str) -> None:
    changed = differing_keys_except(saved, stage.resolved, stage.kind.unchanged_when_finished)
    if changed:
        raise PipelineError(
            f"{stage.folder}: {stage.label} {what} with another config; these keys differ:\n  " + "\n  ".join(changed)
            + "\nUse the same config to resume, or another output_dir for a new run.")


def saved_config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def finished_unmarked(stage: Stage) -> bool:
    """Killed after the stage wrote its results but before the marker: the results are complete and its own."""
    done = {"dpo": [stage.folder / METRICS_NAME],  # written by fine_tune_dpo after the final adapter
            "evaluate": [stage.folder / name for name in RESULT_FILES]}.get(stage.kind.name)
    return bool(done) and all(p.exists() for p in done) and saved_config(stage.folder) is not None \
        and not differing_keys_except(saved_config(stage.folder), stage.resolved, stage.kind.unchanged_when_finished)


def resume_flags(stage: Stage) -> list[str]:
    """How the stage's own resume continues an interrupted run in its folder."""
    if stage.kind is DPO:
        from .dpo_train import last_checkpoint

        saved = saved_config(stage.folder)
        if saved is not None:  # fine_tune_dpo only warns on a changed config; the pipeline refuses, as for the rest
            refuse_changed(stage, saved, "was started")
        return ["--resume"] if last_checkpoint(stage.folder) else []
    if stage.kind is EVALUATE:
        return ["--fresh"]  # evaluate cannot resume: partial results from a killed run are moved aside, never lost
    return []  # generate_preferences resumes from its journal by itself


def wait_for_stage(stage: Stage, process) -> int:
    """The stage's exit status. The stage runs in its own process group, so a Ctrl-C at the terminal reaches the
    pipeline alone: the first is passed on to the stage (SIGINT: it stops cleanly, its finished work kept), a
    second kills it (its finished work is still kept: journals and checkpoints count only once whole)."""
    try:
        return process.wait()
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping {stage.label} (Ctrl-C passed on to it); its finished work is kept. "
              "Ctrl-C again stops it at once", file=sys.stderr, flush=True)
        process.send_signal(signal.SIGINT)
    try:
        process.wait()
    except KeyboardInterrupt:
        print(f"interrupted again: killing {stage.label}", file=sys.stderr, flush=True)
        process.kill()
        process.wait()
    raise KeyboardInterrupt


def run_stage(stage: Stage, lock: FolderLock | None = None, num_processes: int = 1) -> str:
    """Run one stage unless finished, under the run's `lock`; returns what happened ("skipped", "ran", "resumed")."""
    if stage.marker.exists():
        refuse_changed(stage, json.loads(stage.marker.read_text())["config"], "finished")
        print(f"== {stage.label}: finished earlier ({stage.marker}), skipped", flush=True)
        return "skipped"
    if finished_unmarked(stage):
        mark_finished(stage)
        print(f"== {stage.label}: its results were complete ({stage.folder}), marked finished", flush=True)
        return "skipped"
    flags = resume_flags(stage) if stage.folder.exists() else []
    started = bool(folder_entries(stage.folder))
    print(f"== {stage.label}: {'resuming' if started else 'running'} in {stage.folder}"
          + (f" ({' '.join(flags)})" if flags else ""), flush=True)
    stage.folder.parent.mkdir(parents=True, exist_ok=True)
    started_at = time.time()
    process = subprocess.Popen(stage.command(flags, num_processes), env=lock.child_environment() if lock else None,
                               process_group=0,  # Ctrl-C at the terminal reaches the pipeline, which passes it on
                               preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
    code = wait_for_stage(stage, process)
    if code != 0:
        raise PipelineError(f"{stage.label} stopped (exit status {code}); its own message is above. Run the same "
                            "command again to resume: finished stages are skipped")
    mark_finished(stage)
    print(f"== {stage.label}: finished in {time.time() - started_at:.0f} s", flush=True)
    return "resumed" if started else "ran"


# ------------------------------------------------------------------ iterations side by side

MODEL_KEYS = ("emotion_accuracy", "emotion_macro_f1", "clean_rate", "cutoff_rate")
DIVERSITY_KEYS = ("distinct_replies", "distinct_1", "distinct_2", "canned_share", "most_frequent_share",
                  "length_words_mean", "length_words_sd")


def diversity_columns(report: dict) -> dict:
    """A model's degeneration figures for the table, with the worst requested emotion's most frequent reply."""
    worst = max(report["by_group"].items(), key=lambda item: item[1]["most_frequent_share"])
    return {**{key: report[key] for key in DIVERSITY_KEYS}, "most_frequent_reply": report["most_frequent_reply"],
            "worst_emotion": worst[0], "worst_emotion_share": worst[1]["most_frequent_share"],
            "worst_emotion_reply": worst[1]["most_frequent_reply"]}


def iteration_row(iteration: int, results: dict, statistics: dict) -> dict:
    """One iteration's figures: its DPO model against SFT (evaluate's results.json) and its preference data
    (generate_preferences' statistics.json)."""
    dpo, win = results["models"]["DPO"], results["dpo_vs_sft"]
    return {
        "iteration": iteration,
        "adapter": results["setup"]["sources"]["DPO"],
        **{key: dpo[key] for key in MODEL_KEYS},
        **diversity_columns(results["diversity"]["models"]["DPO"]),
        "collapse": results["diversity"]["collapse"]["DPO"],
        "mean_total_reward": dpo["mean_total_reward"],
        "kl_to_sft": results.get("kl_to_sft", {}).get("DPO", {}).get("kl"),
        "judges": {name: {"emotion_accuracy": j["models"]["DPO"]["emotion_accuracy"],
                          "emotion_weighted_f1": j["models"]["DPO"]["emotion_weighted_f1"],
                          "win_rate": j["dpo_vs_sft"]["win_rate"], "win_rate_ci95": j["dpo_vs_sft"]["ci95"]}
                   for name, j in results.get("judges", {}).items()},
        "win_rate": win["win_rate"], "win_rate_ci95": win["ci95"],
        "acceptance_rate": statistics["acceptance_rate"],
        "accepted": statistics["accepted"], "prompts_settled": statistics["prompts_settled"],
        "score_gap_median": statistics["score_gap"]["median"], "score_gap_mean": statistics["score_gap"]["mean"],
    }


def iterations_table(stages: list[Stage]) -> dict:
    rows, sft = [], None
    for stage in stages:
        if stage.kind is not EVALUATE or not stage.marker.exists():
            continue
        results = json.loads((stage.folder / RESULTS_JSON).read_text())
        generate_folder = stage.folder.parent / GENERATE.folder
        statistics = json.loads((generate_folder / STATISTICS_JSON).read_text())
        if sft is None:
            sft = {"adapter": results["setup"]["sources"]["SFT"], "prompts": results["setup"]["prompts"],
                   "replies_per_prompt": results["setup"].get("replies_per_prompt", 1),
                   **{key: results["models"]["SFT"][key] for key in MODEL_KEYS},
                   **diversity_columns(results["diversity"]["models"]["SFT"]),
                   "mean_total_reward": results["models"]["SFT"]["mean_total_reward"],
                   "judges": {name: {"emotion_accuracy": j["models"]["SFT"]["emotion_accuracy"],
                                     "emotion_weighted_f1": j["models"]["SFT"]["emotion_weighted_f1"],
                                     "kappa_with_training_classifier": j["kappa_with_training_classifier_on_sft"]}
                              for name, j in results.get("judges", {}).items()},
                   **({"ceiling_distinct_replies": results["diversity"]["ceiling"]["expected_distinct_replies"]}
                      if "ceiling" in results["diversity"] else {})}
        rows.append(iteration_row(stage.iteration, results, statistics))
    return {"sft": sft, "iterations": rows}


def format_iterations(table: dict) -> str:
    f3 = "{:.3f}".format
    sft = table["sft"]
    lines = [f"# Iterations of DPO against SFT\n\n{sft['prompts']} held-out prompts, the same for every iteration; "
             f"SFT: `{sft['adapter']}`.\n",
             "| model | emotion accuracy | macro-F1 | clean rate | cut-off rate | win rate vs SFT (95 % CI) "
             "| acceptance rate | score gap median / mean |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             "| SFT | " + " | ".join(f3(sft[k]) for k in MODEL_KEYS) + " | - | - | - |"]
    for row in table["iterations"]:
        low, high = row["win_rate_ci95"]
        gap = "-" if row["score_gap_median"] is None else f"{f3(row['score_gap_median'])} / {f3(row['score_gap_mean'])}"
        lines.append(f"| iteration {row['iteration']} | " + " | ".join(f3(row[k]) for k in MODEL_KEYS)
                     + f" | {f3(row['win_rate'])} ({f3(low)}-{f3(high)}) | {f3(row['acceptance_rate'])} "
                       f"({row['accepted']}/{row['prompts_settled']}) | {gap} |")
    per = sft.get("replies_per_prompt", 1)
    lines += ["", "Degeneration (one reply per held-out prompt" + (f", the mean over {per} draws" if per > 1 else "")
              + "; canned: the same text given to >= 3 different prompts;"
              " worst emotion: the requested emotion whose most frequent reply takes the largest share of its prompts)"
              + (f"; the demo world's ceiling keeps {sft['ceiling_distinct_replies']:.1f} distinct replies"
                 if "ceiling_distinct_replies" in sft else "") + ":", "",
              "| model | distinct replies (of SFT's) | distinct-1 | distinct-2 | canned share | most frequent reply "
              "(share) | worst emotion: its most frequent reply's share | length in words, mean (SD) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in [("SFT", sft)] + [(f"iteration {r['iteration']}", r) for r in table["iterations"]]:
        lines.append(f"| {name} | {row['distinct_replies']} ({row['distinct_replies'] / sft['distinct_replies']:.0%}) "
                     f"| {f3(row['distinct_1'])} | {f3(row['distinct_2'])} | {f3(row['canned_share'])} | "
                     f"{row['most_frequent_reply']!r} ({f3(row['most_frequent_share'])}) | {row['worst_emotion']}: "
                     f"{f3(row['worst_emotion_share'])} | {row['length_words_mean']:.2f} ({row['length_words_sd']:.2f}) |")
    lines += ["", "Away from SFT and under the held-out judges (KL: mean log p_iter(y|x) - log p_SFT(y|x) over the "
              "iteration's own replies, nats; judges: emotion accuracy, and the win rate over SFT by the judge's "
              "confidence in the requested emotion):", ""]
    judges = list(sft["judges"])
    lines += ["| model | mean total reward | KL to SFT | " + " | ".join(f"{j}: accuracy | {j}: win rate vs SFT"
                                                                    for j in judges) + " |",
              "| --- | --- | --- |" + " --- | --- |" * len(judges),
              f"| SFT | {f3(sft['mean_total_reward'])} | 0 | " + " | ".join(
                  f"{f3(sft['judges'][j]['emotion_accuracy'])} (kappa with the training classifier "
                  f"{f3(sft['judges'][j]['kappa_with_training_classifier'])}) | -" for j in judges) + " |"]
    for row in table["iterations"]:
        kl = "-" if row["kl_to_sft"] is None else f3(row["kl_to_sft"])
        cells = [f"{f3(row['judges'][j]['emotion_accuracy'])} | {f3(row['judges'][j]['win_rate'])} "
                 f"({f3(row['judges'][j]['win_rate_ci95'][0])}-{f3(row['judges'][j]['win_rate_ci95'][1])})"
                 for j in judges if j in row["judges"]]
        lines.append(f"| iteration {row['iteration']} | {f3(row['mean_total_reward'])} | {kl} | "
                     + " | ".join(cells) + " |")
    lines += [""] + collapse_lines(table)
    return "\n".join(lines) + "\n"


def collapse_lines(table: dict) -> list[str]:
    """The collapse warning of each iteration (diversity.collapse_warnings against SFT), or that there is none."""
    flagged = [f"COLLAPSE WARNING, iteration {r['iteration']}: " + "; ".join(r["collapse"])
               for r in table["iterations"] if r["collapse"]]
    return flagged or ["No collapse warning (thresholds: docs/evaluation.md, 'Collapse warning')."]


def plot_iterations(table: dict, path: Path) -> None:
    plt = pyplot()

    rows = table["iterations"]
    steps = [0] + [r["iteration"] for r in rows]
    fig, (left, right, degeneration, reward_kl) = plt.subplots(1, 4, figsize=(20, 4))
    for key in MODEL_KEYS:
        left.plot(steps, [table["sft"][key]] + [r[key] for r in rows], marker="o", label=key.replace("_", " "))
    left.set_xticks(steps)
    left.set_xticklabels(["SFT"] + [f"iter {s}" for s in steps[1:]])
    left.set_ylim(0, 1)
    left.legend(fontsize=8)
    left.set_title(f"{table['sft']['prompts']} held-out prompts")
    wins = [r["win_rate"] for r in rows]
    errors = [[w - r["win_rate_ci95"][0] for w, r in zip(wins, rows)],
              [r["win_rate_ci95"][1] - w for w, r in zip(wins, rows)]]
    right.errorbar(steps[1:], wins, yerr=errors, marker="o", capsize=4)
    right.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    right.set_xticks(steps[1:])
    right.set_ylim(0, 1)
    right.set_title("win rate vs SFT (95 % bootstrap interval)")
    sft = table["sft"]
    for key, label in (("distinct_replies", "distinct replies / SFT's"), ("canned_share", "canned share"),
                       ("worst_emotion_share", "worst emotion's most frequent share")):
        scale = sft["distinct_replies"] if key == "distinct_replies" else 1
        degeneration.plot(steps, [sft[key] / scale] + [r[key] / scale for r in rows], marker="o", label=label)
    degeneration.set_xticks(steps)
    degeneration.set_xticklabels(["SFT"] + [f"iter {s}" for s in steps[1:]])
    degeneration.set_ylim(0, max(1.05, max(r["distinct_replies"] / sft["distinct_replies"] for r in rows) + 0.05))
    degeneration.legend(fontsize=8)
    degeneration.set_title("degeneration")
    # reward against KL to SFT, the curve RLHF papers plot: SFT at KL 0
    points = [(0.0, sft["mean_total_reward"], "SFT")] + [(r["kl_to_sft"], r["mean_total_reward"], f"iter {r['iteration']}")
                                                          for r in rows if r["kl_to_sft"] is not None]
    reward_kl.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    for x, y, label in points:
        reward_kl.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    reward_kl.set_xlabel("KL to SFT (nats, on the model's own replies)")
    reward_kl.set_ylabel("mean total reward")
    reward_kl.set_title("reward vs KL to SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_iterations(run: Path, stages: list[Stage]) -> dict | None:
    table = iterations_table(stages)
    if not table["iterations"]:
        return None
    write_text_atomic(run / "iterations.json", json.dumps(table, indent=2) + "\n")
    write_text_atomic(run / "iterations.md", format_iterations(table))
    plot_iterations(table, run / "iterations.png")
    return table


# ------------------------------------------------------------------ the whole job

def run_pipeline(cfg) -> dict | None:
    """The whole job under one lock on the run folder: a second pipeline (or a stage started by hand inside it) is
    refused at once, naming this process; the stages run under it (files.runs_under)."""
    run = Path(cfg.output_dir)
    # An existing run folder is locked before the stage configs are checked (that imports TRL: seconds), so that a
    # second pipeline on it is refused at once; a new one is made only after, so that a bad config leaves no folder.
    # Either way a refused run writes nothing into it.
    planned = []
    if run.is_dir():
        with lock_run_folder(run, check=lambda folder, started: planned.append(plan(cfg))) as lock:
            return run_stages(cfg, planned[0], run, lock)
    stages = plan(cfg)
    with lock_run_folder(run) as lock:
        return run_stages(cfg, stages, run, lock)


def lock_run_folder(run: Path, check=None) -> FolderLock:
    return claim_run_folder(run, PIPELINE_SCRIPT, "running the pipeline", "pipeline run", check=check)


def run_stages(cfg, stages: list[Stage], run: Path, lock: FolderLock) -> dict | None:
    saved = run / "pipeline_config.json"
    if saved.exists():
        changed = [k for k in differing_keys(json.loads(saved.read_text()), to_dict(cfg))
                   if not k.startswith("iterations:")]  # more iterations extend a run; the stages check the rest
        if changed:
            print("pipeline config differs from the run's (each stage checks its own):\n  " + "\n  ".join(changed))
    save_config(cfg, run, saved.name)
    for stage in stages:
        run_stage(stage, lock, cfg.launcher.num_processes)
        if stage.kind is EVALUATE:
            write_iterations(run, stages)
    table = write_iterations(run, stages)
    if table is not None:
        print(format_iterations(table))
        print(f"wrote iterations.md, iterations.json and iterations.png to {run}")
        print("\n".join(collapse_lines(table)))
    return table
