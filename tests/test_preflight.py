"""run_pipeline.py --preflight: the projection's arithmetic with given rates (no clocks), the disk estimate, the slice
it runs, and one small preflight on the demo world end to end."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from emotion_dpo.config import PipelineConfig, load_config
from emotion_dpo.dpo_train import training_steps
from emotion_dpo.errors import PipelineError
from emotion_dpo.preflight import (Rates, SliceBytes, Sizes, check_disk_space, checkpoints_kept, disk_estimate,
                                   dpo_steps_per_iteration, duration, projection, slice_overrides, stage_error_line,
                                   stage_slice_overrides)

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "args/demo/pipeline_arg.json"

# The demo job's shape: 2 iterations of 512 prompts at 1.9 rounds each, 29 DPO steps, 252 held-out prompts.
RATES = Rates(generate_start=30, generate_per_prompt_round=0.05, dpo_start=90, dpo_per_step=0.8,
              evaluate_start=60, evaluate_per_prompt=0.1)
SIZES = Sizes(iterations=2, prompts=512, mean_rounds=1.9, dpo_steps=(29, 29), evaluation_prompts=252)


def test_each_stage_is_its_start_plus_its_rate_times_its_size_in_every_iteration():
    seconds = projection(RATES, SIZES)
    assert seconds["generate"] == pytest.approx(157.28)  # 2 x (30 + 0.05 x 512 prompts x 1.9 rounds = 48.64)
    assert seconds["dpo"] == pytest.approx(226.4)  # (90 + 0.8 x 29 steps = 23.2) + (90 + 23.2)
    assert seconds["evaluate"] == pytest.approx(170.4)  # 2 x (60 + 0.1 x 252 prompts = 25.2)
    assert seconds["total"] == pytest.approx(554.08)  # 157.28 + 226.4 + 170.4


def test_each_iteration_pays_its_own_dpo_steps():
    seconds = projection(RATES, Sizes(iterations=2, prompts=512, mean_rounds=1.9, dpo_steps=(29, 57),
                                      evaluation_prompts=252))
    assert seconds["dpo"] == pytest.approx(248.8)  # (90 + 0.8 x 29 = 113.2) + (90 + 0.8 x 57 = 135.6)


def test_durations_read_as_a_clock_would():
    assert [duration(s) for s in (59.6, 119, 174, 230, 3599, 3600 + 29 * 60 + 40)] == [
        "60 s", "119 s", "2 min 54 s", "3 min 50 s", "59 min 59 s", "1 h 30 min"]  # 5380 s: 89.7 min, rounded


def trainer_steps(batch=16, accumulation=1, epochs=1):
    args = SimpleNamespace(per_device_train_batch_size=batch, dataloader_drop_last=False, max_steps=-1,
                           gradient_accumulation_steps=accumulation, num_train_epochs=epochs)
    return lambda pairs: training_steps(pairs, args)[0]


def test_dpo_steps_come_from_the_pairs_left_after_the_held_out_split():
    # 503 pairs, 10 % held out rounded up: 51, so 452 trained; batch 16: ceil(452 / 16) = 29 steps
    assert dpo_steps_per_iteration(503, 2, False, 0.1, 10, trainer_steps()) == (29, 29)
    # accumulate_pairs: iteration 2 trains on 1006 pairs, 101 held out (ceil 100.6), 905 trained: ceil(905 / 16) = 57
    assert dpo_steps_per_iteration(503, 2, True, 0.1, 10, trainer_steps()) == (29, 57)
    # 3 epochs, 2 batches a step: 29 batches an epoch, ceil(29 / 2) = 15 updates, x 3 = 45 steps
    assert dpo_steps_per_iteration(503, 1, False, 0.1, 10, trainer_steps(accumulation=2, epochs=3)) == (45,)
    # 8 pairs are below the 10 a held-out set needs: all trained, one batch
    assert dpo_steps_per_iteration(8, 1, False, 0.1, 10, trainer_steps()) == (1,)


def test_checkpoints_on_disk_are_the_saves_up_to_save_total_limit():
    # the Trainer saves every save_steps steps and at the last step
    assert checkpoints_kept(29, "steps", 50, 1, 2) == 1  # the demo job: one save, at step 29
    assert checkpoints_kept(100, "steps", 50, 1, 2) == 2  # at 50 and 100 (the last)
    assert checkpoints_kept(130, "steps", 50, 1, None) == 3  # at 50, 100 and 130
    assert checkpoints_kept(250, "steps", 50, 1, 2) == 2  # 5 saves, 2 kept
    assert checkpoints_kept(250, "steps", 50, 1, None) == 5  # no limit: all 5
    assert checkpoints_kept(100, "steps", 0.25, 1, None) == 4  # a float: every quarter of the steps, 25
    assert checkpoints_kept(100, "epoch", 50, 3, 2) == 2  # one an epoch, 2 kept
    assert checkpoints_kept(100, "no", 50, 3, 2) == 0


def test_the_disk_estimate_scales_each_kind_by_what_it_grows_with():
    measured = SliceBytes(journal=1000, preferences=500, checkpoint=10_000, adapter=2000, reference_cache=300,
                          dpo_other=100, evaluation=400)
    sizes = Sizes(iterations=2, prompts=512, mean_rounds=1.9, dpo_steps=(120, 120), evaluation_prompts=256)
    # the slice: 128 prompts, 120 pairs, 64 held-out prompts; the job: 480 pairs an iteration, 2 checkpoints kept in each
    disk = disk_estimate(measured, 128, 120, 64, sizes, 480, False, (2, 2))
    assert disk == {
        "journal": 8000,  # 2 iterations x 1000 x 512 / 128 prompts
        "dataset": 4000,  # 2 x 500 x 4
        "checkpoints": 40_000,  # 10 000 x (2 + 2)
        "adapters": 4200,  # 2 x (2000 + 100)
        "reference cache": 2400,  # 2 x 300 x 480 / 120 pairs
        "evaluation": 3200,  # 2 x 400 x 256 / 64 prompts
        "total": 61_800,
    }
    # accumulate_pairs: iteration 2's cache covers 960 pairs: 300 x 4 + 300 x 8 = 3600
    assert disk_estimate(measured, 128, 120, 64, sizes, 480, True, (2, 2))["reference cache"] == 3600


def test_too_little_space_is_an_error_naming_the_estimate(tmp_path):
    check_disk_space(2**30, 2**31, tmp_path)  # 1 GiB needed, 2 free: passes
    with pytest.raises(PipelineError, match=r"needs about 3.00 GiB \(the estimate\) .* has 2.00 GiB free"):
        check_disk_space(3 * 2**30, 2**31, tmp_path)


def test_a_failed_stage_is_named_by_its_own_one_line_message():
    output = "loading ...\nprompts:  10%|#   \r\nerror: args/x.json: key adapter: no such folder\n"
    assert stage_error_line(output) == "args/x.json: key adapter: no such folder"
    assert stage_error_line("Traceback ...\n  File ...\nRuntimeError: boom\n") == "RuntimeError: boom"


def test_the_slice_is_iteration_1_with_two_prompt_batches_a_few_dpo_steps_and_one_evaluation_batch(tmp_path):
    from emotion_dpo.pipeline import plan

    run, scratch = tmp_path / "run", tmp_path / "run.preflight-x"
    full = plan(load_config(PipelineConfig, DEMO_CONFIG, [f"output_dir={run}"]))
    stages = plan(load_config(PipelineConfig, DEMO_CONFIG, [f"output_dir={run}", *slice_overrides(full, scratch)]))
    generate, dpo, evaluate = (s.resolved for s in stages)
    assert [s.iteration for s in stages] == [1, 1, 1]
    assert generate["num_prompts"] == 128  # 2 batches of 64
    assert (dpo["dpo"]["max_steps"], dpo["dpo"]["save_steps"]) == (5, 5)  # one checkpoint, at the last step
    assert dpo["dpo"]["logging_steps"] == 1  # each step's log line timed
    assert evaluate["num_prompts"] == 64  # one batch of 64 (the demo's num_prompts is null: all 252)
    assert all(Path(s.folder).is_relative_to(scratch) for s in stages)
    assert not run.exists()
    # a stage script's --preflight takes the same slice of its own config
    full_generate, full_dpo, full_evaluate = (s.resolved for s in full[:3])
    assert stage_slice_overrides("generate", full_generate) == ["num_prompts=128"]
    assert stage_slice_overrides("dpo", full_dpo) == ["dpo.max_steps=5", "dpo.save_steps=5", 'dpo.save_strategy="steps"',
                                                      "dpo.logging_steps=1"]
    assert stage_slice_overrides("evaluate", {**full_evaluate, "num_prompts": 16}) == ["num_prompts=16"]  # < a batch


def test_the_preflight_on_the_demo_world_projects_the_job_and_leaves_no_trace(demo_world, tmp_path):
    from test_pipeline import world_overrides

    run = tmp_path / "run"
    small = ["generate.num_prompts=64", "generate.batch_prompts=4", "dpo.dpo.per_device_train_batch_size=2",
             "evaluate.batch_prompts=4", "evaluate.include_base=false", "evaluate.bootstrap_samples=200",
             f"output_dir={run}"]
    args = [sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(DEMO_CONFIG), "--preflight"]
    for override in world_overrides(demo_world) + small:
        args += ["--set", override]
    from conftest import process_environment

    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900, env=process_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for stage in ("generate_preferences.py", "fine_tune_dpo.py", "evaluate.py"):
        assert f"== preflight: iteration 1 {stage} finished in" in out
    assert "| job |" in out and "64 prompts x" in out  # the whole job's 64 prompts, not the slice's 8
    assert "slice: 8 prompts" in out and ", 5 DPO steps," in out
    assert "disk: journal" in out and "peak GPU memory:" in out
    assert not run.exists() and list(tmp_path.iterdir()) == []  # output_dir not made, the scratch folder removed
