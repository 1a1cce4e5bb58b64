"""run_pipeline under the faults of issue 22, with real processes, each kill or stop at a step the process reports
(emotion_dpo.faultpoints), never after a sleep:
1. a kill inside DPO's first checkpoint save: the same command then completes, equal to an uninterrupted run;
2. two pipelines on one folder: the second is refused at once naming the first's PID; after kill -9 of the first,
   the second takes over and resumes its DPO from the checkpoint;
7. Ctrl-C (SIGINT) to run_pipeline alone is passed on to the running stage, which stops cleanly.
The faults are DPO's: each test's run folder starts with the uninterrupted run's finished generation (its
preferences and their marker), which the pipeline then skips as finished.
And the demo figures repeat (docs/reliability.md, "The same bytes on a CPU"): the uninterrupted run, made again
from nothing with torch's default thread count instead of one thread, gives the same bytes at every stage (every
RNG seeded, deterministic algorithms: cli.make_reproducible)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import process_environment
from test_distributed import ONE_PROCESS, one_process_run, pipeline  # noqa: F401 (one_process_run: a fixture)

ROOT = Path(__file__).resolve().parents[1]


def command(world, run):
    """test_distributed's 1-process pipeline (one iteration: 16 prompts, 4 DPO steps with a checkpoint every 2,
    8 held-out prompts) in the folder `run`."""
    return pipeline(world, run, *ONE_PROCESS)


def run(world, folder, fault=None, one_thread=True):
    return subprocess.run(command(world, folder), capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=process_environment(fault, one_thread))


def start_until(world, folder, fault: str, point: str):
    """Start the pipeline with `fault`; read its output until the stage reports `point` (it has stopped itself
    there). Returns (the pipeline process, the stopped stage's PID, the output so far)."""
    process = subprocess.Popen(command(world, folder), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT, env=process_environment(fault))
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"fault point {point}: stop (process "):
            return process, int(line.rsplit(" ", 1)[1].rstrip(")\n")), "".join(seen)
    process.wait()
    pytest.fail(f"the pipeline ended before {point}:\n" + "".join(seen)[-3000:])


@pytest.fixture(scope="module")
def uninterrupted(one_process_run) -> Path:
    """The run folder every fault ends as: test_distributed's 1-process pipeline, made with the same command."""
    return one_process_run


def generated(folder: Path, uninterrupted: Path) -> Path:
    """`folder` holding the uninterrupted run's finished generation of iteration 1."""
    source = uninterrupted / "iter-1"
    (folder / "iter-1").mkdir(parents=True)
    shutil.copytree(source / "preferences", folder / "iter-1/preferences", symlinks=True)
    shutil.copy2(source / "preferences.done.json", folder / "iter-1/preferences.done.json")
    return folder


def same_table(run: Path, other_run: Path) -> bool:
    """The two runs' iterations.json, equal once each names its own folder alike."""
    return ((run / "iterations.json").read_text().replace(str(run), "RUN")
            == (other_run / "iterations.json").read_text().replace(str(other_run), "RUN"))


def test_1_a_kill_inside_the_first_checkpoint_save_restarts_dpo_and_ends_as_an_uninterrupted_run(
        demo_world, tmp_path, uninterrupted):
    folder = generated(tmp_path / "run", uninterrupted)
    killed = run(demo_world, folder, fault="kill@dpo-save:2")
    assert killed.returncode == 2 and "fault point dpo-save:2: kill" in killed.stdout, killed.stderr[-2000:]
    first = folder / "iter-1/dpo/checkpoint-2"
    assert first.is_dir() and not (first / "trainer_state.json").exists()  # the only checkpoint, cut short

    result = run(demo_world, folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{first}: incomplete (no trainer_state.json: its save was cut short); removed" in result.stdout
    assert "no complete checkpoint to resume from; starting again from the start adapter" in result.stdout
    assert same_table(folder, uninterrupted)


def test_2_a_second_pipeline_on_the_folder_is_refused_then_takes_over_after_a_kill_9(demo_world, tmp_path,
                                                                                     uninterrupted):
    folder = generated(tmp_path / "run", uninterrupted)
    first, _, _ = start_until(demo_world, folder, "stop@dpo-saved:2", "dpo-saved:2")
    try:
        refused = run(demo_world, folder)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"process {first.pid} is running the pipeline in this folder" in refused.stderr
        assert "== iteration" not in refused.stdout  # refused before any stage started
        # a stage started by hand in the pipeline's folder is refused too, naming the pipeline
        by_hand = subprocess.run([sys.executable, "-c", "import sys; from emotion_dpo.files import FolderLock; "
                                  "FolderLock(sys.argv[1], doing='training')", str(folder / "iter-1/dpo")],
                                 capture_output=True, text=True, cwd=ROOT, env=process_environment())
        assert f"where process {first.pid} is running the pipeline" in by_hand.stderr
    finally:
        first.kill()  # kill -9 of the pipeline; its stopped stage dies with it (PR_SET_PDEATHSIG)
        first.stdout.read()  # to the end: the pipeline and its stage (which shares the pipe) have both exited
        first.wait()

    result = run(demo_world, folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== iteration 1 generate_preferences.py: finished earlier" in result.stdout
    assert f"resuming from {folder / 'iter-1/dpo/checkpoint-2'}" in result.stdout
    assert same_table(folder, uninterrupted)


def test_7_ctrl_c_to_the_pipeline_is_passed_on_and_the_stage_stops_cleanly(demo_world, tmp_path, uninterrupted):
    folder = generated(tmp_path / "run", uninterrupted)
    pipeline, stage_pid, _ = start_until(demo_world, folder, "stop@dpo-saved:2", "dpo-saved:2")
    try:
        pipeline.send_signal(signal.SIGINT)  # to the pipeline alone, as `kill -INT PID` does
        said = []
        for line in pipeline.stdout:
            said.append(line)
            if "interrupted: stopping iteration 1 fine_tune_dpo.py (Ctrl-C passed on to it)" in line:
                break
        os.kill(stage_pid, signal.SIGCONT)  # the stage goes on, with the SIGINT passed on to it pending
        said.append(pipeline.stdout.read())
        code = pipeline.wait(timeout=600)
    finally:
        pipeline.kill()
    output = "".join(said)
    assert code == 130, output[-3000:]
    assert "interrupted: finished work is kept; run it again with --resume" in output  # the stage's own clean exit
    assert "Traceback" not in output
    assert not (folder / "iter-1/dpo.done.json").exists() and (folder / "iter-1/dpo/checkpoint-2/trainer_state.json").exists()


def test_the_run_made_again_with_torchs_default_threads_gives_the_same_bytes_at_every_stage(demo_world, tmp_path,
                                                                                          uninterrupted):
    again = tmp_path / "run"
    result = run(demo_world, again, one_thread=False)  # torch's default: one thread per core
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    first = uninterrupted
    for stage_file in ["preferences/preferences.jsonl", "preferences/failed.jsonl", "preferences/journal.rank0.jsonl",
                       "dpo/final_adapter/adapter_model.safetensors", "evaluation/replies.jsonl"]:
        assert (first / "iter-1" / stage_file).read_bytes() == (again / "iter-1" / stage_file).read_bytes(), stage_file
    a, b = (json.loads((run_folder / "iter-1/evaluation/results.json").read_text()) for run_folder in (first, again))
    assert a["models"] == b["models"] and a["dpo_vs_sft"] == b["dpo_vs_sft"]


def test_on_a_cpu_the_stages_compute_on_one_thread_with_torchs_deterministic_algorithms():
    """What the same bytes rest on beyond the seeds (cli.make_reproducible): on the demo's tiny matrices 2 threads sum
    alike, so the test above cannot tell; a real model's sums split over 4 threads end in other last bits."""
    check = ("import torch; from emotion_dpo.cli import make_reproducible; torch.set_num_threads(4); "  # 4 cores' default
             "make_reproducible(0); print(torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())")
    env = {**process_environment(one_thread=False), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.stdout.split() == ["1", "True"], result.stderr[-2000:]
