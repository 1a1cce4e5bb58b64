"""run_pipeline.py --preflight: iteration 1 on a small slice in a scratch folder, then the whole job projected.

    python run_pipeline.py --config args/demo/pipeline_arg.json --preflight [--preflight-keep]

What it does, in order:
1. every check the full run makes before anything loads (run_pipeline's plan() of the whole job, output_dir);
2. iteration 1's three stages, each run as the pipeline runs it (its own script in a child process), on a slice:
   SLICE_BATCHES prompt batches, DPO_STEPS optimizer steps with one checkpoint, one evaluation batch. So the model
   and data loads, the template and tokenizer checks, the reference guard and the first DPO steps all run;
3. per-unit rates from the slice (each stage's one-off start and its work per prompt-round, step or prompt);
4. the disk the whole job needs, scaled from the slice's files, against the free space of output_dir's disk;
5. the projected time of each stage and of the job (`projection`), and the peak GPU memory seen.

It writes nothing into output_dir: the slice runs in a sibling scratch folder, OUTPUT_DIR.preflight-XXXX (output_dir's
missing parents made for it), removed at the end with those parents unless kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import PipelineError

SLICE_BATCHES = 2  # generate_preferences' prompt batches in the slice
DPO_STEPS = 5  # optimizer steps in the slice, each logged (timed), the last one saved as a checkpoint
PEAK_MEMORY_ENV = "EMOTION_DPO_PEAK_MEMORY_FILE"  # cli.run_main appends the process's peak GPU memory there


# ------------------------------------------------------------------ the arithmetic (pure: tested by hand)

@dataclasses.dataclass(frozen=True)
class Rates:
    """Seconds measured on the slice. A stage's `start` is what it costs once per run whatever its size (process
    start, imports, loading the models and data, writing); the other figure is its work per unit."""
    generate_start: float
    generate_per_prompt_round: float  # one round (n_candidates replies, scored) for one prompt
    dpo_start: float
    dpo_per_step: float  # one optimizer step
    evaluate_start: float
    evaluate_per_prompt: float  # one held-out prompt drawn once, through every model evaluated


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The whole job's size in the same units."""
    iterations: int
    prompts: int  # generation prompts per iteration
    mean_rounds: float  # rounds per prompt (the slice's)
    dpo_steps: tuple[int, ...]  # optimizer steps of each iteration
    evaluation_prompts: int  # held-out prompts x replies_per_prompt, per iteration


def projection(rates: Rates, sizes: Sizes) -> dict[str, float]:
    """Seconds of each stage over all iterations, and the total."""
    generate = sizes.iterations * (rates.generate_start
                                   + rates.generate_per_prompt_round * sizes.prompts * sizes.mean_rounds)
    dpo = sum(rates.dpo_start + rates.dpo_per_step * steps for steps in sizes.dpo_steps)
    evaluate = sizes.iterations * (rates.evaluate_start + rates.evaluate_per_prompt * sizes.evaluation_prompts)
    return {"generate": generate, "dpo": dpo, "evaluate": evaluate, "total": generate + dpo + evaluate}


def training_pairs(pairs: int, eval_fraction: float, min_to_hold_out: int) -> int:
    """The pairs left to train on after fine_tune_dpo's held-out split (datasets' train_test_split: the test share
    rounded up; none held out below min_to_hold_out pairs)."""
    if eval_fraction == 0 or pairs < min_to_hold_out:
        return pairs
    return pairs - math.ceil(eval_fraction * pairs)


def dpo_steps_per_iteration(pairs_per_iteration: int, iterations: int, accumulate: bool, eval_fraction: float,
                            min_to_hold_out: int, steps_for) -> tuple[int, ...]:
    """Each iteration's optimizer steps; with accumulate_pairs iteration k trains on the pairs of 1..k.
    steps_for(training pairs) -> steps is the Trainer's count (dpo_train.training_steps)."""
    return tuple(steps_for(training_pairs(pairs_per_iteration * (k if accumulate else 1), eval_fraction,
                                          min_to_hold_out)) for k in range(1, iterations + 1))


@dataclasses.dataclass(frozen=True)
class SliceBytes:
    """Bytes the slice wrote, by what they scale with."""
    journal: int  # journal*.jsonl: with the prompts
    preferences: int  # dataset/, preferences.jsonl, statistics ...: with the prompts
    checkpoint: int  # one checkpoint-* folder: fixed
    adapter: int  # final_adapter: fixed
    reference_cache: int  # the reference log-probs: with the pairs
    dpo_other: int  # config, metrics, wandb: fixed
    evaluation: int  # the evaluation folder: with the held-out prompts


def disk_estimate(measured: SliceBytes, slice_prompts: int, slice_pairs: int, slice_evaluation_prompts: int,
                  sizes: Sizes, pairs_per_iteration: int, accumulate: bool, checkpoints_kept: tuple[int, ...]) -> dict:
    """Bytes of the whole job by kind, and the total: each kind scaled from the slice by what it grows with."""
    def scaled(value: int, full: float, part: int) -> float:
        return value * full / part if part else value

    iterations = sizes.iterations
    cache = sum(scaled(measured.reference_cache, pairs_per_iteration * (k if accumulate else 1), slice_pairs)
                for k in range(1, iterations + 1))
    parts = {
        "journal": iterations * scaled(measured.journal, sizes.prompts, slice_prompts),
        "dataset": iterations * scaled(measured.preferences, sizes.prompts, slice_prompts),
        "checkpoints": measured.checkpoint * sum(checkpoints_kept),
        "adapters": iterations * (measured.adapter + measured.dpo_other),
        "reference cache": cache,
        "evaluation": iterations * scaled(measured.evaluation, sizes.evaluation_prompts, slice_evaluation_prompts),
    }
    return {**parts, "total": sum(parts.values())}


def checkpoints_kept(steps: int, save_strategy: str, save_steps: float, epochs: float, save_total_limit) -> int:
    """How many checkpoint-* folders are on disk at the end: the saves (every save_steps steps and, as
    transformers' Trainer does, at the last step; or one per epoch), at most save_total_limit of them."""
    if save_strategy == "no":
        return 0
    if save_strategy == "epoch":
        saves = math.ceil(epochs)
    else:
        every = save_steps if save_steps >= 1 else max(1, math.ceil(save_steps * steps))  # a float: a share of steps
        saves = math.ceil(steps / every)
    return saves if save_total_limit is None else min(saves, save_total_limit)


def check_disk_space(needed: float, free: int, where: Path) -> None:
    if needed > free:
        raise PipelineError(f"preflight: the job needs about {gib(needed)} (the estimate) on output_dir's disk "
                            f"({where}), which has {gib(free)} free; free some space, choose another output_dir, or "
                            "lower dpo.save_total_limit")


# ------------------------------------------------------------------ running the slice

def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def scratch_folder(output_dir: Path) -> tuple[Path, list[Path]]:
    """A new folder next to output_dir (on its disk), neither output_dir nor inside it; returns it with the parents
    made for it (output_dir's own parents that did not exist yet), to be removed with it."""
    parent = output_dir.absolute().parent
    made = [p for p in [*reversed(parent.parents), parent] if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.preflight-", dir=parent)), made
    except OSError as e:
        raise PipelineError(f"{parent}: cannot make the preflight's scratch folder there ({e.strerror}); "
                            "output_dir's disk must be writable") from None


def remove_scratch(scratch: Path, made: list[Path]) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    for parent in reversed(made):  # innermost first; one that something else wrote into meanwhile stays
        try:
            parent.rmdir()
        except OSError:
            break


def stage_error_line(output: str) -> str:
    """The stage's own one-line message (cli.stop's "error: ..."), else its last line (a traceback's)."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors[-1][len("error: "):] if errors else lines[-1] if lines else "no output")


def run_timed(stage, lock, num_processes: int, peak_file: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run one stage as run_pipeline does (its script, its --set overrides, under the run's lock), its output
    passed through as it comes and each line timed; returns (wall seconds, [(seconds since start, line)])."""
    env = {**lock.child_environment(), "PYTHONUNBUFFERED": "1", PEAK_MEMORY_ENV: str(peak_file)}
    print(f"== preflight: {stage.label} in {stage.folder}", flush=True)
    stage.folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    process = subprocess.Popen(stage.command((), num_processes), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    lines, pending, text = [], b"", []
    try:
        while chunk := os.read(process.stdout.fileno(), 65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            now = time.monotonic() - started
            pending += chunk
            *whole, pending = re.split(rb"[\r\n]", pending)
            for line in whole:
                decoded = line.decode(errors="replace")
                lines.append((now, decoded))
                text.append(decoded)
        code = process.wait()
    except KeyboardInterrupt:
        process.kill()
        process.wait()
        raise
    wall = time.monotonic() - started
    if code != 0:
        text.append(pending.decode(errors="replace"))
        raise PipelineError(f"preflight: {stage.label} failed: {stage_error_line(chr(10).join(text))}")
    print(f"== preflight: {stage.label} finished in {wall:.0f} s", flush=True)
    return wall, lines


def first_time(lines, marker: str) -> float | None:
    return next((t for t, line in lines if marker in line), None)


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else 0


# ------------------------------------------------------------------ the slice's figures

def generate_figures(folder: Path, wall: float) -> dict:
    """Rates from the slice's generate_preferences, from its metrics log (a line with the time after each sampling
    call): a prompt-round is the time from the first call's line to the last line over the prompt-rounds between
    (the first call, one round of a batch, holds the warm-up of the first generate: it is left out). With several
    processes, rank 0's time over its share, the processes sampling side by side. The rest is its start."""
    from .stats import STATISTICS_JSON

    statistics = json.loads((folder / STATISTICS_JSON).read_text())
    logs = [[json.loads(line) for line in text.splitlines()] for path in sorted(folder.glob("metrics.rank*.jsonl"))
            if (text := path.read_text().strip())]
    rounds = statistics["rounds_per_prompt"]["mean"]
    prompt_rounds = statistics["prompts_settled"] * rounds
    mine = logs[0]
    first, last = mine[0], mine[-1]
    my_prompt_rounds = last["settled"] * last["mean_rounds"]
    first_call = min(first["batch_prompts"], last["settled"])  # one round of the first batch's prompts
    if len(mine) >= 2 and my_prompt_rounds > first_call:
        per_unit = (last["time"] - first["time"]) / (my_prompt_rounds - first_call) / len(logs)
    else:  # one call: the whole sampling time (prompts settled / prompts per minute)
        per_unit = 60 * last["settled"] / last["prompts_per_minute"] / my_prompt_rounds / len(logs)
    return {"prompts": statistics["prompts_settled"], "mean_rounds": rounds,
            "acceptance_rate": statistics["acceptance_rate"], "pairs": statistics["accepted"],
            "start": max(wall - per_unit * prompt_rounds, 0.0), "per_unit": per_unit}


def dpo_figures(folder: Path, wall: float, lines) -> dict:
    """Rates from the slice's fine_tune_dpo: a step is the time between the first step's log line and the last's
    over the steps between (the first step's warm-up and the checkpoint save, after the last log, left out; each
    step is logged: logging_steps 1); without two log lines, trainer.train's runtime over its steps. The rest of
    the stage (imports, loads, TRL's tokenizing, the reference log-probs, the held-out loss, the saves) is its
    start."""
    from .dpo_train import METRICS_NAME

    metrics = json.loads((folder / METRICS_NAME).read_text())
    summary = next(entry for entry in reversed(metrics["train"]) if "train_runtime" in entry)
    steps = summary["step"]
    logged = [t for t, line in lines if line.lstrip().startswith("{'loss'")]
    per_step = (logged[-1] - logged[0]) / (len(logged) - 1) if len(logged) >= 2 else summary["train_runtime"] / steps
    return {"steps": steps, "start": max(wall - per_step * steps, 0.0), "per_unit": per_step,
            "peak_gpu_memory_gib": metrics.get("peak_gpu_memory_gib")}


def evaluate_figures(folder: Path, wall: float, lines) -> dict:
    """Rates from the slice's evaluate: from its first "sampling ... replies" line to its "wrote ..." line the
    work grows with the prompts (sampling, scoring, judges, bootstrap); the rest is its start."""
    from .evaluation import RESULTS_JSON

    setup = json.loads((folder / RESULTS_JSON).read_text())["setup"]
    prompts = setup["prompts"] * setup.get("replies_per_prompt", 1)
    begun, ended = first_time(lines, "sampling "), first_time(lines, "wrote ")
    work = (ended - begun) if begun is not None and ended is not None else wall
    return {"prompts": prompts, "start": max(wall - work, 0.0), "per_unit": work / prompts}


# ------------------------------------------------------------------ the whole job's sizes

def stage_config(stage):
    from . import config as config_module
    from .config import load_config

    return load_config(getattr(config_module, stage.kind.config_class), stage.config_file, stage.overrides)


def prompts_of(cfg) -> int:
    """A stage's prompts: num_prompts, or (null) all those in its split, counted as the stage counts them."""
    if cfg.num_prompts is not None:
        return cfg.num_prompts
    from .prompts import load_prompts

    return len(load_prompts(cfg)[1])


def prompt_count(stage) -> int:
    return stage.resolved["num_prompts"] if stage.resolved["num_prompts"] is not None else \
        prompts_of(stage_config(stage))


def job_sizes(cfg, full_stages, generated: dict) -> tuple[Sizes, dict]:
    """The whole job's Sizes (and the DPO figures the disk estimate needs) from its plan and the slice's rates."""
    from .dpo_data import MIN_PAIRS_TO_HOLD_OUT
    from .dpo_train import build_dpo_config, training_steps

    first = {s.kind.name: s for s in full_stages if s.iteration == 1}
    prompts = prompt_count(first["generate"])
    evaluation = first["evaluate"].resolved
    evaluation_prompts = prompt_count(first["evaluate"]) * evaluation.get("replies_per_prompt", 1)
    train_cfg = stage_config(first["dpo"])
    args = build_dpo_config(train_cfg)
    processes = cfg.launcher.num_processes
    pairs = round(prompts * generated["acceptance_rate"])
    steps = dpo_steps_per_iteration(pairs, cfg.iterations, cfg.accumulate_pairs, train_cfg.eval_fraction,
                                    MIN_PAIRS_TO_HOLD_OUT, lambda n: training_steps(n, args, processes)[0])
    sizes = Sizes(cfg.iterations, prompts, generated["mean_rounds"], steps, evaluation_prompts)
    kept = tuple(checkpoints_kept(s, str(getattr(args.save_strategy, "value", args.save_strategy)), args.save_steps,
                                  args.num_train_epochs, args.save_total_limit) for s in steps)
    return sizes, {"pairs_per_iteration": pairs, "checkpoints_kept": kept}


def slice_bytes(preferences: Path | None, dpo: Path | None, evaluation: Path | None) -> SliceBytes:
    """What the slice's stage folders hold, by kind (a stage not run: None, nothing)."""
    from .dpo_reference import REFERENCE_LOGPS
    from .dpo_train import FINAL_ADAPTER
    from .journal import journal_files

    journal = sum(folder_bytes(p) for p in journal_files(preferences)) if preferences else 0
    checkpoints = sorted(dpo.glob("checkpoint-*")) if dpo else []
    checkpoint = max((folder_bytes(c) for c in checkpoints), default=0)
    adapter, cache = (folder_bytes(dpo / FINAL_ADAPTER), folder_bytes(dpo / REFERENCE_LOGPS)) if dpo else (0, 0)
    return SliceBytes(journal=journal, preferences=(folder_bytes(preferences) - journal) if preferences else 0,
                      checkpoint=checkpoint, adapter=adapter, reference_cache=cache,
                      dpo_other=(folder_bytes(dpo) - adapter - cache - sum(folder_bytes(c) for c in checkpoints))
                      if dpo else 0, evaluation=folder_bytes(evaluation) if evaluation else 0)


# ------------------------------------------------------------------ the report

def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds >= 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s"


def gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def format_projection(rates: Rates, sizes: Sizes, seconds: dict, only: str | None = None) -> str:
    """The table of the stages' projected times and the job's; `only` (a stage's name): that stage's row alone."""
    steps = ", ".join(str(s) for s in sizes.dpo_steps)
    rows = [
        ("generate_preferences", f"{rates.generate_start:.1f} s + {rates.generate_per_prompt_round:.4f} s per "
         f"prompt-round", f"{sizes.prompts} prompts x {sizes.mean_rounds:.2f} rounds", seconds["generate"]),
        ("fine_tune_dpo", f"{rates.dpo_start:.1f} s + {rates.dpo_per_step:.3f} s per step", f"{steps} steps",
         seconds["dpo"]),
        ("evaluate", f"{rates.evaluate_start:.1f} s + {rates.evaluate_per_prompt:.4f} s per prompt",
         f"{sizes.evaluation_prompts} prompts", seconds["evaluate"]),
    ]
    if only is not None:
        rows = [row for row, name in zip(rows, ("generate", "dpo", "evaluate")) if name == only]
        title = "projected time of the whole run:"
    else:
        title = (f"projected time of the whole job ({sizes.iterations} iteration(s); each stage's start is paid "
                 "once per iteration):")
    header = "| stage | measured: start + rate | size | projected |" if only is not None else \
        "| stage | measured: start + rate | size per iteration | projected, all iterations |"
    lines = [title, "", header, "| --- | --- | --- | --- |"]
    def shown(s: float) -> str:
        return duration(s) + (f" ({s:.0f} s)" if s >= 120 else "")

    lines += [f"| {name} | {rate} | {size} | {shown(s)} |" for name, rate, size, s in rows]
    if only is None:
        lines.append(f"| job | | | {shown(seconds['total'])} |")
    return "\n".join(lines)


def peak_gpu_memory(peak_file: Path, dpo_peak) -> str:
    import torch

    if not torch.cuda.is_available():
        return "peak GPU memory: no GPU"
    peaks = [json.loads(line) for line in peak_file.read_text().splitlines()] if peak_file.exists() else []
    by_stage = {}
    for p in peaks:  # one line per process: under a launcher, each stage's highest
        by_stage[p["script"]] = max(p["peak_gib"], by_stage.get(p["script"], 0.0))
    if not by_stage and dpo_peak is not None:
        by_stage["fine_tune_dpo.py"] = dpo_peak
    if not by_stage:
        return "peak GPU memory: not recorded"
    return "peak GPU memory (torch.cuda.max_memory_allocated): " + ", ".join(
        f"{script} {peak:.2f} GiB" for script, peak in by_stage.items()) + f"; highest {max(by_stage.values()):.2f} GiB"


# ------------------------------------------------------------------ the preflight

def generate_slice_prompts(generate: dict) -> int:
    prompts = SLICE_BATCHES * generate["batch_prompts"]
    return prompts if generate["num_prompts"] is None else min(prompts, generate["num_prompts"])


def evaluate_slice_prompts(evaluate: dict) -> int:
    return evaluate["batch_prompts"] if evaluate["num_prompts"] is None else \
        min(evaluate["batch_prompts"], evaluate["num_prompts"])


DPO_SLICE = [f"dpo.max_steps={DPO_STEPS}", f"dpo.save_steps={DPO_STEPS}", "dpo.save_strategy=\"steps\"",
             "dpo.logging_steps=1"]


def slice_overrides(full_stages, scratch: Path) -> list[str]:
    """The pipeline-level --set overrides that make iteration 1 a small slice in the scratch folder."""
    first = {s.kind.name: s.resolved for s in full_stages if s.iteration == 1}
    overrides = [f"output_dir={scratch}", "iterations=1",
                 f"generate.num_prompts={generate_slice_prompts(first['generate'])}",
                 *[f"dpo.{o}" for o in DPO_SLICE], f"evaluate.num_prompts={evaluate_slice_prompts(first['evaluate'])}"]
    for name, resolved in first.items():  # an online wandb would get a run for the slice: kept offline, in scratch
        if resolved["wandb"]["mode"] == "online":
            overrides.append(f"{name}.wandb.mode=\"offline\"")
    return overrides


def check_output_dir(run: Path) -> None:
    """What run_pipeline checks of output_dir before it runs, without making it."""
    from .files import RUN_LOCK, _lock_holder, held_lock

    if run.exists() and not run.is_dir():
        raise PipelineError(f"{run}: output_dir is a file, expected a folder; choose another output_dir")
    holder = held_lock(run / RUN_LOCK)  # only read: the preflight writes nothing there
    if holder is not None:
        pid, doing = _lock_holder(holder, "running the pipeline")
        raise PipelineError(f"{run}: process {pid} is {doing} in this folder (it holds {run / RUN_LOCK}); wait for "
                            "it to end or stop it, then run again")
    where = nearest_existing(run)
    if not os.access(where, os.W_OK):
        raise PipelineError(f"{run}: output_dir is not writable ({where} is read-only to this user)")


def preflight(cfg, config_path: str, overrides: list[str], keep: bool = False) -> dict:
    from .config import PipelineConfig, load_config
    from .files import FolderLock
    from .pipeline import DPO, EVALUATE, GENERATE, plan

    began = time.monotonic()
    run = Path(cfg.output_dir)
    full_stages = plan(cfg)  # every config problem of every stage of every iteration, before anything loads
    check_output_dir(run)
    free = shutil.disk_usage(nearest_existing(run)).free  # before the slice takes any of it
    scratch, made = scratch_folder(run)
    print(f"== preflight: {len(full_stages)} stages planned for {run}; iteration 1 on a slice in {scratch}", flush=True)
    try:
        slice_cfg = load_config(PipelineConfig, config_path, [*overrides, *slice_overrides(full_stages, scratch)])
        stages = plan(slice_cfg)
        peak_file = scratch / "peak_gpu_memory.jsonl"
        timed = {}
        with FolderLock(scratch, doing="running the preflight") as lock:
            for stage in stages:
                timed[stage.kind.name] = run_timed(stage, lock, cfg.launcher.num_processes, peak_file)
        generated = generate_figures(scratch / "iter-1" / GENERATE.folder, timed["generate"][0])
        trained = dpo_figures(scratch / "iter-1" / DPO.folder, *timed["dpo"])
        evaluated = evaluate_figures(scratch / "iter-1" / EVALUATE.folder, *timed["evaluate"])
        rates = Rates(generated["start"], generated["per_unit"], trained["start"], trained["per_unit"],
                      evaluated["start"], evaluated["per_unit"])
        sizes, dpo_sizes = job_sizes(cfg, full_stages, generated)
        seconds = projection(rates, sizes)
        folders = [scratch / "iter-1" / kind.folder for kind in (GENERATE, DPO, EVALUATE)]
        disk = disk_estimate(slice_bytes(*folders), generated["prompts"], generated["pairs"], evaluated["prompts"],
                             sizes, dpo_sizes["pairs_per_iteration"], cfg.accumulate_pairs,
                             dpo_sizes["checkpoints_kept"])
        memory = peak_gpu_memory(peak_file, trained["peak_gpu_memory_gib"])
    finally:
        if keep:
            print(f"== preflight: scratch folder kept: {scratch}")
        else:
            remove_scratch(scratch, made)
    print(format_projection(rates, sizes, seconds))
    print(f"\nslice: {generated['prompts']} prompts ({generated['mean_rounds']:.2f} rounds each, acceptance "
          f"{generated['acceptance_rate']:.3f}), {trained['steps']} DPO steps, {evaluated['prompts']} held-out prompts")
    print("disk: " + ", ".join(f"{kind} {gib(n)}" for kind, n in disk.items() if kind != "total")
          + f"; estimate {gib(disk['total'])} against {gib(free)} free on output_dir's disk")
    print(memory)
    check_disk_space(disk["total"], free, nearest_existing(run))
    print(f"preflight passed in {time.monotonic() - began:.0f} s; nothing was written to {run}")
    return {"rates": dataclasses.asdict(rates), "sizes": dataclasses.asdict(sizes), "seconds": seconds,
            "disk": disk, "free": free, "peak_gpu_memory": memory,
            "slice": {"generate": generated, "dpo": trained, "evaluate": evaluated}}


# ------------------------------------------------------------------ one stage script alone

def stage_slice_overrides(name: str, resolved: dict) -> list[str]:
    overrides = {"generate": lambda: [f"num_prompts={generate_slice_prompts(resolved)}"],
                 "dpo": lambda: list(DPO_SLICE),
                 "evaluate": lambda: [f"num_prompts={evaluate_slice_prompts(resolved)}"]}[name]()
    return overrides + (["wandb.mode=\"offline\""] if resolved["wandb"]["mode"] == "online" else [])


def stage_preflight(name: str, cfg, config_path: str, overrides: list[str], keep: bool = False) -> dict:
    """generate_preferences.py / fine_tune_dpo.py / evaluate.py --preflight: the stage alone on its slice (as in
    run_pipeline's preflight) in a scratch folder next to its output_dir, then its whole run projected."""
    from . import config as config_module
    from .config import load_config, to_dict
    from .distributed import world_size
    from .files import FolderLock
    from .pipeline import KINDS, Stage

    if world_size() > 1:
        raise PipelineError("--preflight starts the stage itself, in one process: run it without accelerate launch "
                            "or torchrun")
    kind = next(k for k in KINDS if k.name == name)
    began = time.monotonic()
    run = Path(cfg.output_dir)
    check_output_dir(run)
    free = shutil.disk_usage(nearest_existing(run)).free
    scratch, made = scratch_folder(run)
    folder = scratch / kind.folder
    print(f"== preflight: {kind.script} on a slice in {folder}", flush=True)
    try:
        stage_overrides = [*overrides, *stage_slice_overrides(name, to_dict(cfg)), f"output_dir={folder}"]
        slice_cfg = load_config(getattr(config_module, kind.config_class), config_path, stage_overrides)
        stage = Stage(kind, 1, folder, config_path, stage_overrides, to_dict(slice_cfg))
        peak_file = scratch / "peak_gpu_memory.jsonl"
        with FolderLock(scratch, doing="running the preflight") as lock:
            wall, lines = run_timed(stage, lock, 1, peak_file)
        # (start, rate) of each stage: the one run here measured, the two not run cost nothing
        stage_rates = {"generate": (0.0, 0.0), "dpo": (0.0, 0.0), "evaluate": (0.0, 0.0)}
        if name == "generate":
            figures = generate_figures(folder, wall)
            prompts = prompts_of(cfg)
            sizes = Sizes(1, prompts, figures["mean_rounds"], (0,), 0)
            what = (f"{figures['prompts']} prompts ({figures['mean_rounds']:.2f} rounds each, acceptance "
                    f"{figures['acceptance_rate']:.3f})")
            measured, scale = slice_bytes(folder, None, None), (figures["prompts"], 0, 0, 0, (0,))
        elif name == "dpo":
            from .dpo_train import build_dpo_config, training_steps

            figures = dpo_figures(folder, wall, lines)
            pairs = next(int(m.group(1)) for _, line in lines if (m := re.match(r"training (\d+) pairs", line)))
            args = build_dpo_config(cfg)
            steps = training_steps(pairs, args)[0]
            sizes = Sizes(1, 0, 0.0, (steps,), 0)
            what = f"{figures['steps']} DPO steps on the run's {pairs} training pairs"
            kept = checkpoints_kept(steps, str(getattr(args.save_strategy, "value", args.save_strategy)),
                                    args.save_steps, args.num_train_epochs, args.save_total_limit)
            measured, scale = slice_bytes(None, folder, None), (0, pairs, 0, pairs, (kept,))
        else:
            figures = evaluate_figures(folder, wall, lines)
            prompts = prompts_of(cfg)
            sizes = Sizes(1, 0, 0.0, (0,), prompts * cfg.replies_per_prompt)
            what = f"{figures['prompts']} held-out prompts"
            measured, scale = slice_bytes(None, None, folder), (0, 0, figures["prompts"], 0, (0,))
        stage_rates[name] = (figures["start"], figures["per_unit"])
        rates = Rates(*stage_rates["generate"], *stage_rates["dpo"], *stage_rates["evaluate"])
        seconds = projection(rates, sizes)
        slice_prompts, slice_pairs, slice_held_out, pairs_per_run, kept = scale
        disk = disk_estimate(measured, slice_prompts, slice_pairs, slice_held_out, sizes, pairs_per_run, False, kept)
        memory = peak_gpu_memory(peak_file, figures.get("peak_gpu_memory_gib"))
    finally:
        if keep:
            print(f"== preflight: scratch folder kept: {scratch}")
        else:
            remove_scratch(scratch, made)
    print(format_projection(rates, sizes, seconds, only=name))
    print(f"\nslice: {what}")
    print("disk: " + ", ".join(f"{kind} {gib(n)}" for kind, n in disk.items() if kind != "total" and n)
          + f"; estimate {gib(disk['total'])} against {gib(free)} free on output_dir's disk")
    print(memory)
    check_disk_space(disk["total"], free, nearest_existing(run))
    print(f"preflight passed in {time.monotonic() - began:.0f} s; nothing was written to {run}")
    return {"rates": dataclasses.asdict(rates), "sizes": dataclasses.asdict(sizes), "seconds": seconds,
            "disk": disk, "free": free, "peak_gpu_memory": memory, "slice": figures}
