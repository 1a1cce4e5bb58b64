"""run_pipeline.py on a reduced demo config, two iterations: killed (SIGKILL) during the second iteration's
generation and again during its DPO, the reruns finish without redoing finished stages, and the tables equal those of
an uninterrupted run on the settled data. Iteration 2 samples from iteration 1's adapter."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from emotion_dpo.config import GenerateConfig, PipelineConfig, load_config
from emotion_dpo.errors import PipelineError
from emotion_dpo.journal import read_journal
from conftest import demo_evaluation_overrides

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "args/demo/pipeline_arg.json"
BATCH = 4  # generate's batch_prompts in the reduced config


def world_overrides(w: Path) -> list[str]:
    shared = [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"chat_template={ROOT / 'args/chat_template.json'}",
              "wandb.mode=disabled"]
    scored = [f"dataset={w / 'dialogues'}", f"emotion_classifier={w / 'emotion_classifier'}",
              f"gibberish_detector={w / 'gibberish_detector'}"]
    return ([f"generate.{o}" for o in shared + scored] + [f"dpo.{o}" for o in shared]
            + [f"evaluate.{o}" for o in shared + scored + demo_evaluation_overrides(w)])


# The reduced demo: 16 prompts per iteration, 8 small DPO steps (1 epoch) with a checkpoint every 2, 16 held-out
# prompts.
REDUCED = ["iterations=2", "generate.num_prompts=16", f"generate.batch_prompts={BATCH}", "dpo.eval_fraction=0",
           "dpo.dpo.num_train_epochs=1", "dpo.dpo.per_device_train_batch_size=2", "dpo.dpo.save_steps=2",
           "dpo.dpo.save_total_limit=null", "dpo.dpo.eval_strategy=no", "dpo.dpo.logging_steps=1",
           "evaluate.num_prompts=16", "evaluate.include_base=false", "evaluate.bootstrap_samples=200"]


def command(world, run, extra=()):
    args = [sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(DEMO_CONFIG)]
    for override in world_overrides(world) + REDUCED + [f"output_dir={run}", *extra]:
        args += ["--set", override]
    return args


def kill_when(world, run, log: Path, point: str, path_part: str):
    """Run the pipeline until one of its stages reaches the fault point POINT under a path containing PATH_PART
    (emotion_dpo/faultpoints.py) and SIGKILLs the pipeline process alone, as `kill -9 PID` does; the stage must die
    with it. The pipeline and its stage share one stdout pipe: reading it to its end returns once both are gone (a
    stage outliving the pipeline would keep it open, and the timeout fails the test)."""
    env = {**os.environ, "EMOTION_DPO_FAULT": f"kill-parent@{point}@{path_part}"}
    process = subprocess.Popen(command(world, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                               env=env, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=1800)  # a bound for a hung run, not a race: the run kills itself
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        log.write_text(output)
        pytest.fail(f"the pipeline or its stage did not end after the fault point {point}:\n{output[-3000:]}")
    log.write_text(output)
    assert process.returncode == -signal.SIGKILL, output[-3000:]
    assert f"fault point {point}: kill-parent (process " in output


def marker_times(run: Path) -> dict:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.glob("iter-*/*.done.json")}


@pytest.fixture(scope="module")
def resumed_run(demo_world, tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    run = base / "run"
    journal = run / "iter-2/preferences/journal.rank0.jsonl"

    # killed once iteration 2's generation has journaled its first prompt
    kill_when(demo_world, run, base / "first.log", "settled:1", "iter-2/preferences")
    assert sorted(marker_times(run)) == ["iter-1/dpo.done.json", "iter-1/evaluation.done.json",
                                         "iter-1/preferences.done.json"]
    settled_before_kill = read_journal(journal)
    assert len(settled_before_kill) == 1  # the one it reported
    times_after_first_kill = marker_times(run)

    checkpoints = run / "iter-2/dpo"
    kill_when(demo_world, run, base / "second.log", "dpo-saved:2", "iter-2/dpo")  # iteration 2's first checkpoint
    second = (base / "second.log").read_text()
    assert not (checkpoints / "final_adapter").exists()
    assert "iter-2/dpo.done.json" not in marker_times(run)
    times_after_second_kill = marker_times(run)

    result = subprocess.run(command(demo_world, run), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return SimpleNamespace(run=run, base=base, world=demo_world, second=second, third=result.stdout,
                           settled_before_kill=settled_before_kill, times_after_first_kill=times_after_first_kill,
                           times_after_second_kill=times_after_second_kill)


def test_the_reruns_resume_each_stage_without_redoing_finished_ones(resumed_run):
    r = resumed_run
    # second start: iteration 1 skipped, the interrupted generation resumed from its journal
    for stage in ("generate_preferences.py", "fine_tune_dpo.py", "evaluate.py"):
        assert f"== iteration 1 {stage}: finished earlier" in r.second
    assert "== iteration 2 generate_preferences.py: resuming" in r.second
    assert f"already settled {len(r.settled_before_kill)}" in r.second
    # third start: everything up to iteration 2's DPO skipped; the DPO resumed from its checkpoint
    for stage in ("generate_preferences.py", "fine_tune_dpo.py", "evaluate.py"):
        assert f"== iteration 1 {stage}: finished earlier" in r.third
    assert "== iteration 2 generate_preferences.py: finished earlier" in r.third
    assert "== iteration 2 fine_tune_dpo.py: resuming" in r.third and "(--resume)" in r.third
    # the finished stages' markers were never rewritten
    now = marker_times(r.run)
    assert {k: now[k] for k in r.times_after_first_kill} == r.times_after_first_kill
    assert {k: now[k] for k in r.times_after_second_kill} == r.times_after_second_kill
    assert sorted(now) == sorted(f"iter-{k}/{s}.done.json" for k in (1, 2) for s in ("preferences", "dpo", "evaluation"))
    # the prompts settled before the first kill are kept as they were
    after = {rec["index"]: rec for rec in read_journal(r.run / "iter-2/preferences/journal.rank0.jsonl")}
    assert sorted(after) == list(range(16))
    for record in r.settled_before_kill:
        assert after[record["index"]] == record
    # DPO went on from the checkpoint: every step logged once, none twice
    state = json.loads(max((r.run / "iter-2/dpo").glob("checkpoint-*/trainer_state.json"),
                           key=lambda p: int(p.parent.name.split("-")[1])).read_text())
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    # the demo's accumulate_pairs: iteration 2 trains on both iterations' 16 + 16 pairs, 2 a step
    assert steps == list(range(1, 17))


def test_the_tables_equal_those_of_an_uninterrupted_run_on_the_settled_data(resumed_run):
    r = resumed_run
    resumed = json.loads((r.run / "iterations.json").read_text())
    # the same run folder, iteration 2's DPO and evaluation run again uninterrupted on the settled preference data;
    # the resumed run's files are put back afterwards, so the other tests read the run as the fixture left it
    moved = [r.run / "iter-2" / name for name in ("dpo", "dpo.done.json", "evaluation", "evaluation.done.json")]
    moved += [r.run / f"iterations.{suffix}" for suffix in ("json", "md", "png")]
    aside, again = r.base / "resumed-aside", r.base / "uninterrupted"
    aside.mkdir()
    again.mkdir()
    for path in moved:
        shutil.move(path, aside / path.name)
    try:
        result = subprocess.run(command(r.world, r.run), capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "== iteration 2 fine_tune_dpo.py: running" in result.stdout
        uninterrupted = json.loads((r.run / "iterations.json").read_text())
    finally:
        for path in moved:
            if path.exists():
                shutil.move(path, again / path.name)
            shutil.move(aside / path.name, path)
    assert uninterrupted == resumed
    # and the table holds what the stages wrote (read here from their own files)
    for row in resumed["iterations"]:
        results = json.loads((r.run / f"iter-{row['iteration']}/evaluation/results.json").read_text())
        stats = json.loads((r.run / f"iter-{row['iteration']}/preferences/statistics.json").read_text())
        assert row["emotion_accuracy"] == results["models"]["DPO"]["emotion_accuracy"]
        assert row["clean_rate"] == results["models"]["DPO"]["clean_rate"]
        assert row["win_rate_ci95"] == results["dpo_vs_sft"]["ci95"]
        assert row["acceptance_rate"] == stats["acceptance_rate"]
        assert row["score_gap_median"] == stats["score_gap"]["median"]
    assert resumed["sft"]["emotion_accuracy"] == results["models"]["SFT"]["emotion_accuracy"]
    table = (r.run / "iterations.md").read_text()
    assert "| iteration 2 | " in table and f"{resumed['iterations'][1]['win_rate']:.3f} (" in table
    assert (r.run / "iterations.png").stat().st_size > 0


def test_iteration_2_samples_from_iteration_1s_adapter(resumed_run):
    """The adapter path in the stage's config, and replies: iteration 2's first sampled round is what iteration 1's
    adapter gives under the run's seed, which samples that batch otherwise than the SFT model does under the same
    seed."""
    import torch  # noqa: F401
    from transformers import set_seed

    from emotion_dpo.generation import Scorer, checked_generation_config, generate_candidates
    from emotion_dpo.models import load_generator

    r = resumed_run
    previous = str(r.run / "iter-1/dpo/final_adapter")
    sft = str(r.world / "sft_adapter")
    for stage in ("preferences", "dpo"):
        assert json.loads((r.run / f"iter-2/{stage}/config.json").read_text())["adapter"] == previous
        assert json.loads((r.run / f"iter-2/{stage}.done.json").read_text())["config"]["adapter"] == previous
    assert json.loads((r.run / "iter-1/preferences/config.json").read_text())["adapter"] == sft
    for k in (1, 2):  # each iteration against the SFT model
        evaluation = json.loads((r.run / f"iter-{k}/evaluation/config.json").read_text())
        assert evaluation["adapter"] == sft
        assert evaluation["dpo_adapter"] == str(r.run / f"iter-{k}/dpo/final_adapter")
    # fresh prompts: iteration 2's first prompt is the 17th of the split
    first_prompts = [read_journal(r.run / f"iter-{k}/preferences/journal.rank0.jsonl")[0] for k in (1, 2)]
    assert json.loads((r.run / "iter-2/preferences/config.json").read_text())["skip_prompts"] == 16
    assert {rec["prompt"] for rec in read_journal(r.run / "iter-1/preferences/journal.rank0.jsonl")}.isdisjoint(
        rec["prompt"] for rec in read_journal(r.run / "iter-2/preferences/journal.rank0.jsonl"))
    assert first_prompts[1]["dialogue"] >= 16

    cfg = load_config(GenerateConfig, r.run / "iter-2/preferences/config.json")
    first_call = {rec["index"]: rec for rec in r.settled_before_kill if rec["index"] < BATCH}
    prompts = [first_call[i]["prompt"] if i in first_call else None for i in range(BATCH)]
    journal = {rec["index"]: rec for rec in read_journal(r.run / "iter-2/preferences/journal.rank0.jsonl")}
    texts = [journal[i]["prompt"] for i in range(BATCH)]
    assert all(p is None or p == t for p, t in zip(prompts, texts))
    contexts = [journal[i]["prompt_ids"] for i in range(BATCH)]  # the ids the generator conditioned on

    def first_round(adapter):  # what generate does for its first batch: load, scorer, seed + batch 0, generate
        source = load_config(GenerateConfig, r.run / "iter-2/preferences/config.json", [f"adapter={adapter}"])
        model, tokenizer = load_generator(source)
        Scorer(source, tokenizer)
        set_seed(source.seed + 0)
        groups = generate_candidates(model, tokenizer, contexts, cfg.n_candidates, checked_generation_config(
            cfg.generation, "test"))
        return [[text for text, _ in group] for group in groups]

    from_previous, from_sft = first_round(previous), first_round(sft)
    for i, record in first_call.items():
        assert [c["text"] for c in record["rounds"][0]] == from_previous[i]
    assert from_sft != from_previous  # the two adapters sample this batch differently under the same seed


def test_a_changed_stage_config_is_refused_on_a_finished_run(resumed_run):
    from emotion_dpo.pipeline import run_pipeline

    r = resumed_run
    before = marker_times(r.run)
    sets = world_overrides(r.world) + REDUCED + [f"output_dir={r.run}", "dpo.dpo.beta=0.2"]
    with pytest.raises(PipelineError, match=r"iteration 1 fine_tune_dpo.py finished with another config; these keys "
                                            r"differ:\n  dpo.beta: 0.5 -> 0.2\n"):
        run_pipeline(load_config(PipelineConfig, DEMO_CONFIG, sets))
    assert marker_times(r.run) == before


# ---------------------------------------------------------------- the config, before anything runs

def plan_of(tmp_path, *overrides):
    from emotion_dpo.pipeline import plan

    return plan(load_config(PipelineConfig, DEMO_CONFIG, [f"output_dir={tmp_path}", *overrides]))


def test_set_reaches_each_stages_keys_and_the_pipeline_sets_the_per_iteration_ones(tmp_path):
    stages = plan_of(tmp_path, "generate.num_prompts=64", "generate.generation.temperature=0.7",
                     "dpo.dpo.beta=0.2", "evaluate.include_base=false")
    assert [(s.iteration, s.kind.name) for s in stages] == [(k, n) for k in (1, 2) for n in ("generate", "dpo", "evaluate")]
    g1, d1, e1, g2, d2, e2 = (s.resolved for s in stages)
    assert g1["num_prompts"] == g2["num_prompts"] == 64
    assert g1["generation"]["temperature"] == 0.7 and g1["generation"]["top_k"] == 0  # the file's other keys kept
    assert d1["dpo"]["beta"] == d2["dpo"]["beta"] == 0.2 and d1["dpo"]["max_length"] == 128
    assert e1["include_base"] is False
    assert (g1["skip_prompts"], g2["skip_prompts"]) == (0, 64)
    assert g1["adapter"] == d1["adapter"] == e1["adapter"] == e2["adapter"] == "demo_world/sft_adapter"
    assert g2["adapter"] == d2["adapter"] == str(tmp_path / "iter-1/dpo/final_adapter")
    assert d2["dataset"] == str(tmp_path / "iter-2/preferences/dataset")
    assert e2["dpo_adapter"] == str(tmp_path / "iter-2/dpo/final_adapter")
    assert [s.folder for s in stages[:3]] == [tmp_path / "iter-1" / f for f in ("preferences", "dpo", "evaluation")]
    reused = plan_of(tmp_path, "fresh_prompts_per_iteration=false")
    assert reused[3].resolved["skip_prompts"] == 0


def test_num_prompts_null_takes_all_prompts_in_a_single_iteration(tmp_path):
    # one iteration needs no fresh prompts after it: null (all of them) is a valid num_prompts there
    (generate, _, _) = plan_of(tmp_path, "iterations=1", "generate.num_prompts=null")
    assert (generate.resolved["num_prompts"], generate.resolved["skip_prompts"]) == (None, 0)


@pytest.mark.parametrize("override, message", [
    ("generate.num_promts=3", "generate_preferences_arg.json: key num_promts: unknown key \\(did you mean 'num_prompts'"),
    ("dpo.dpo.beta=-1", "dpo.beta: expected a value > 0"),
    ("generate.output_dir=x", "key generate.output_dir: set by the pipeline"),
    ("dpo.dataset=x", "key dpo.dataset: set by the pipeline"),
    ("evaluate.adapter=other", "the stages name different adapters"),
    ("generate.num_prompts=null", "fresh_prompts_per_iteration needs a number of prompts per iteration"),
    ("iterations=0", "key iterations: expected a value >= 1"),
])
def test_bad_pipeline_configs_are_refused_before_anything_runs(tmp_path, override, message):
    with pytest.raises(PipelineError, match=message):
        plan_of(tmp_path / "run", override)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", ["args/pipeline_arg.json", "args/demo/pipeline_arg.json"])
def test_shipped_pipeline_configs_resolve_every_stage(tmp_path, path):
    from emotion_dpo.pipeline import plan

    cfg = load_config(PipelineConfig, ROOT / path, [f"output_dir={tmp_path}"])
    assert len(plan(cfg)) == 3 * cfg.iterations


def test_a_bad_config_is_refused_before_the_run_folder_is_made_and_leaves_an_existing_one_unlocked(tmp_path):
    from emotion_dpo.files import FolderLock
    from emotion_dpo.pipeline import run_pipeline

    bad = ["evaluate.clean_confidence=2"]
    with pytest.raises(PipelineError, match=r"section evaluate:\n.*key clean_confidence: expected a value <= 1"):
        run_pipeline(load_config(PipelineConfig, DEMO_CONFIG, [f"output_dir={tmp_path / 'new'}", *bad]))
    assert not (tmp_path / "new").exists()
    (tmp_path / "earlier").mkdir()
    with pytest.raises(PipelineError, match="section evaluate:") as refused:
        run_pipeline(load_config(PipelineConfig, DEMO_CONFIG, [f"output_dir={tmp_path / 'earlier'}", *bad]))
    # taken again at once, while the refusal (and so its frames) is still held: the refused run let its lock go
    FolderLock(tmp_path / "earlier", doing="checking").release()
    assert refused.value


def test_a_second_pipeline_on_a_folder_in_use_is_refused_before_its_stage_configs_are_checked(tmp_path):
    """At once: checking the stage configs imports TRL (seconds); its bad key is not what it reports."""
    from emotion_dpo.files import FolderLock
    from emotion_dpo.pipeline import run_pipeline

    with FolderLock(tmp_path, doing="running the pipeline"):
        cfg = load_config(PipelineConfig, DEMO_CONFIG, [f"output_dir={tmp_path}", "evaluate.clean_confidence=2"])
        with pytest.raises(PipelineError, match=rf"process {os.getpid()} is running the pipeline in this folder"):
            run_pipeline(cfg)


def test_accumulate_pairs_trains_iteration_k_on_the_pairs_of_iterations_1_to_k(tmp_path):
    stages = plan_of(tmp_path, "iterations=3", "accumulate_pairs=true")
    dpo = [s.resolved for s in stages if s.kind.name == "dpo"]
    assert [d["dataset"] for d in dpo] == [str(tmp_path / f"iter-{k}/preferences/dataset") for k in (1, 2, 3)]
    assert [d["earlier_datasets"] for d in dpo] == [
        [], [str(tmp_path / "iter-1/preferences/dataset")],
        [str(tmp_path / "iter-1/preferences/dataset"), str(tmp_path / "iter-2/preferences/dataset")]]
    replacing = [s.resolved for s in plan_of(tmp_path, "iterations=2", "accumulate_pairs=false") if s.kind.name == "dpo"]
    assert [d["earlier_datasets"] for d in replacing] == [[], []]
