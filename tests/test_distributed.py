"""The whole job on several processes through accelerate (issue 24), proven on the CPU: 2 processes over gloo,
started by `accelerate launch` as a user starts them, each rendezvous on a port the launcher picks free (port 0).

One 2-process run_pipeline iteration (generate, DPO with 2 processes x batch 1, evaluate) is the reference the tests
compare with: a 1-process pipeline (DPO 1 process x batch 2: the same global batch and order), a 1-process evaluate
of the same adapter, and a 2-process DPO run killed after a checkpoint and resumed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import made_once_for_the_workers, process_environment
from test_pipeline import DEMO_CONFIG as PIPELINE_CONFIG
from test_pipeline import world_overrides

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
# One iteration, small: 16 prompts, 4 DPO steps with a checkpoint every 2, 8 held-out prompts in 4 batches.
REDUCED = ["iterations=1", "generate.num_prompts=16", "generate.batch_prompts=4", "dpo.eval_fraction=0",
           "dpo.dpo.max_steps=4", "dpo.dpo.warmup_steps=0", "dpo.dpo.save_steps=2", "dpo.dpo.save_total_limit=null",
           "dpo.dpo.eval_strategy=no", "dpo.dpo.logging_steps=1", "evaluate.num_prompts=8", "evaluate.batch_prompts=2",
           "evaluate.include_base=false", "evaluate.bootstrap_samples=200",
           # TRL's sft term (the demo's RPO) is a token mean per process: DDP averages it as a mean of per-process
           # means, not 1 process's mean over the global batch's tokens (docs/distributed.md); the DPO loss itself is a
           # mean of pairs
           'dpo.dpo.loss_type=["sigmoid"]',
           # Adam divides each gradient element by its root mean square + epsilon: an element whose gradient is at
           # rounding level (DDP's all-reduce sums in another order) moves by up to a whole learning rate either way
           # with the default 1e-8; 1e-6 keeps rounding noise at rounding size
           "dpo.dpo.adam_epsilon=1e-6"]
ADAPTER = "adapter_model.safetensors"


def run(args, log: Path, expect_ok=True) -> str:
    with open(log, "w") as out:
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=process_environment(),
                                timeout=900)
    text = log.read_text()
    if expect_ok:
        assert result.returncode == 0, text[-4000:]
    return text


def pipeline(world, folder: Path, *extra) -> list[str]:
    args = [sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(PIPELINE_CONFIG)]
    for override in world_overrides(world) + REDUCED + [f"output_dir={folder}", *extra]:
        args += ["--set", override]
    return args


def without_folder(value, folder: Path):
    """iterations.json with its run folder's paths made relative (two runs live in two folders)."""
    return json.loads(json.dumps(value).replace(str(folder), "RUN"))


def largest_difference(a: Path, b: Path) -> float:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


ONE_PROCESS = ["dpo.dpo.per_device_train_batch_size=2"]  # the 2-process run's global batch on one process


@pytest.fixture(scope="session")
def one_process_run(demo_world, tmp_path_factory) -> Path:
    """The 1-process pipeline from the start (made once per test run: test_reliability_pipeline's uninterrupted run
    too)."""
    def made(folder: Path) -> None:
        run(pipeline(demo_world, folder / "run", *ONE_PROCESS), folder / "run.log")

    return made_once_for_the_workers(tmp_path_factory, "one_process_run", made) / "run"


@pytest.fixture(scope="module")
def runs(demo_world, tmp_path_factory, one_process_run):
    """The 2-process pipeline from the start, and the 1-process one."""
    base = tmp_path_factory.mktemp("distributed")
    two = base / "two"
    two_log = run(pipeline(demo_world, two, "launcher.num_processes=2", "dpo.dpo.per_device_train_batch_size=1"),
                  base / "two.log")
    return {"base": base, "two": two, "one": one_process_run, "two_log": two_log}


def test_the_pipeline_with_2_processes_runs_every_stage_on_both_and_completes_one_iteration(runs):
    two = runs["two"]
    assert sorted(p.name for p in (two / "iter-1").glob("*.done.json")) == [
        "dpo.done.json", "evaluation.done.json", "preferences.done.json"]
    journals = sorted(p.name for p in (two / "iter-1/preferences").glob("journal.rank*.jsonl"))
    assert journals == ["journal.rank0.jsonl", "journal.rank1.jsonl"]  # generate: each process its own journal
    log = runs["two_log"]
    assert "process 0: 4 of 8 prompts" in log and "process 1: 4 of 8 prompts" in log  # evaluate's shares
    state = json.loads((two / "iter-1/dpo/checkpoint-4/trainer_state.json").read_text())
    assert state["train_batch_size"] == 1 and state["global_step"] == 4
    assert (two / "iter-1/dpo/checkpoint-4/rng_state_1.pth").is_file()  # the Trainer's state of rank 1: DDP ran
    assert "generate_preferences.py stopped" not in log


def test_the_2_process_pipeline_selects_the_pairs_of_the_1_process_run(runs):
    """generate_preferences samples batch b from seed + b in whichever process takes it (4 batches of 4 prompts)."""
    pairs = [(runs[r] / "iter-1/preferences/preferences.jsonl").read_text() for r in ("one", "two")]
    assert pairs[0] == pairs[1] and pairs[0].count("\n") > 4
    statistics = [json.loads((runs[r] / "iter-1/preferences/statistics.json").read_text()) for r in ("one", "two")]
    assert statistics[0] == statistics[1]


def test_the_2_process_pipeline_gives_the_iterations_table_of_the_1_process_run(runs):
    one, two = runs["one"], runs["two"]
    tables = [without_folder(json.loads((run / "iterations.json").read_text()), run) for run in (one, two)]
    # KL to SFT is a log-prob sum through the trained adapter itself, which DDP gives to 1e-5, not bitwise (the test
    # below); every other figure comes from the sampled replies, which are the same
    kl = [[row.pop("kl_to_sft") for row in table["iterations"]] for table in tables]
    assert kl[0] == pytest.approx(kl[1], abs=1e-4)
    assert tables[0] == tables[1]


def test_dpo_on_2_processes_of_batch_1_trains_the_adapter_of_1_process_of_batch_2(runs, demo_world):
    """DDP averages the two processes' gradients as one process averages over its batch of 2 (the same pairs in
    the same order: the Trainer's sampler hands global batch k's pairs to the processes in turn)."""
    one, two = (runs[r] / "iter-1/dpo/final_adapter" / ADAPTER for r in ("one", "two"))
    assert largest_difference(one, two) <= 1e-5
    sft = demo_world / "sft_adapter" / ADAPTER
    assert largest_difference(two, sft) > 1e-3  # it trained: equal to 1e-5 says something
    states = [json.loads((runs[r] / "iter-1/dpo/checkpoint-4/trainer_state.json").read_text()) for r in ("one", "two")]
    losses = [[e["loss"] for e in s["log_history"] if "loss" in e] for s in states]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the logged loss: the mean over the global batch


def test_only_the_main_process_writes_and_says_once(runs):
    dpo = runs["two"] / "iter-1/dpo"
    metrics = json.loads((dpo / "metrics.json").read_text())
    assert metrics["reference_check"]["first_batch"]["max_abs_logratio"] <= 1e-3  # the guard ran before training
    assert (dpo / "start_adapter.json").is_file() and (dpo / "final_adapter" / ADAPTER).is_file()
    log = runs["two_log"]
    assert log.count("one base model, adapters: default, ref") == 1  # DPO's start line, from the main process
    assert log.count("saved the trained adapter to") == 1


EVALUATE_CONFIG = ROOT / "args/demo/evaluate_arg.json"


def test_evaluate_on_1_process_gives_the_results_of_2(runs):
    """The 2-process pipeline's evaluation against evaluate.py alone on the same adapter and prompts."""
    two = runs["two"] / "iter-1"
    resolved = json.loads((two / "evaluation.done.json").read_text())["config"]
    resolved["output_dir"] = str(runs["base"] / "evaluate-1")
    config = runs["base"] / "evaluate-1.json"
    config.write_text(json.dumps(resolved))
    run([sys.executable, str(ROOT / "evaluate.py"), "--config", str(config)], runs["base"] / "evaluate-1.log")
    for name in ("replies.jsonl", "results.json", "results.md"):
        assert (runs["base"] / "evaluate-1" / name).read_bytes() == (two / "evaluation" / name).read_bytes(), name
    replies = [json.loads(line) for line in (two / "evaluation/replies.jsonl").read_text().splitlines()]
    # 8 prompts, each with the demo's replies_per_prompt draws next to each other
    assert [r["index"] for r in replies] == sorted(r["index"] for r in replies)
    assert len(replies) == 8 * resolved["replies_per_prompt"] and len({r["index"] for r in replies}) == 8


KILLED_AFTER_CHECKPOINT_2 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from transformers.trainer_callback import CallbackHandler

on_save = CallbackHandler.on_save

def killed_after_checkpoint_2(self, args, state, control):
    control = on_save(self, args, state, control)  # checkpoint-2 is whole: the Trainer's files and the config's
    if state.global_step == 2:
        dist.barrier()  # every process has written its part (its RNG state)
        if state.is_world_process_zero:
            print("checkpoint-2 saved: SIGKILL", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return control

CallbackHandler.on_save = killed_after_checkpoint_2
import fine_tune_dpo
fine_tune_dpo.main(sys.argv[1:])
"""


def dpo_config_of(runs, output_dir: Path) -> Path:
    """The 2-process pipeline's resolved DPO config (its marker holds it), in another output_dir."""
    resolved = json.loads((runs["two"] / "iter-1/dpo.done.json").read_text())["config"]
    resolved["output_dir"] = str(output_dir)
    path = output_dir.with_suffix(".json")
    path.write_text(json.dumps(resolved))
    return path


def test_a_2_process_dpo_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_adapter(runs):
    base = runs["base"]
    out = base / "killed-dpo"
    config = dpo_config_of(runs, out)
    script = base / "killed_after_checkpoint_2.py"
    script.write_text(KILLED_AFTER_CHECKPOINT_2.format(root=str(ROOT)))
    killed = run(ACCELERATE_2 + [str(script), "--config", str(config)], base / "killed.log", expect_ok=False)
    assert "checkpoint-2 saved: SIGKILL" in killed
    assert (out / "checkpoint-2/trainer_state.json").is_file() and not (out / "checkpoint-4").exists()
    assert not (out / "final_adapter").exists()

    resumed = run(ACCELERATE_2 + [str(ROOT / "fine_tune_dpo.py"), "--config", str(config), "--resume"],
                  base / "resumed.log")
    assert resumed.count(f"resuming from {out / 'checkpoint-2'}") == 1  # said once, by the main process
    state = json.loads((out / "checkpoint-4/trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
    uninterrupted = runs["two"] / "iter-1/dpo/final_adapter" / ADAPTER
    assert largest_difference(out / "final_adapter" / ADAPTER, uninterrupted) == 0.0


REFERENCE_TAMPERED_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {root!r})
import torch
from emotion_dpo import dpo_train

make_trainer = dpo_train.make_trainer

def tampered_on_rank_1(*args, **kwargs):
    trainer = make_trainer(*args, **kwargs)
    if os.environ["RANK"] == "1":  # one process's reference drifts: only that process's guard can see it
        with torch.no_grad():
            next(p for n, p in trainer.model.named_parameters() if ".ref." in n and "lora_B" in n).add_(1.0)
    return trainer

dpo_train.make_trainer = tampered_on_rank_1
import fine_tune_dpo
fine_tune_dpo.main(sys.argv[1:])
"""


def test_the_reference_guard_runs_on_every_process_and_counts_are_said_once(runs, demo_world):
    """A reference that drifted on rank 1 alone is refused; the data counts come once, not once per process."""
    base = runs["base"]
    pairs = [{"prompt": f"<s>[INST] [EMOTION] joy [/EMOTION] hello {i} . [/INST] [EMOTION] joy [/EMOTION]",
              "chosen": f"i am so happy for you {i} !", "rejected": f"no {i}"} for i in range(8)]
    long_prompt = "<s>[INST] [EMOTION] joy [/EMOTION] " + "hello " * 120 + "[/INST] [EMOTION] joy [/EMOTION]"
    pairs += [pairs[0], {**pairs[1], "rejected": pairs[1]["chosen"]},  # a repeat; chosen equals rejected
              {"prompt": long_prompt, "chosen": "fine .", "rejected": "no"}]  # longer than dpo.max_length
    data = base / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = base / "tampered"
    config = dpo_config_of(runs, out)
    script = base / "tampered.py"
    script.write_text(REFERENCE_TAMPERED_ON_RANK_1.format(root=str(ROOT)))
    sets = ["--set", f"dataset={data}", "--set", "dpo.max_length=96"]
    log = run(ACCELERATE_2 + [str(script), "--config", str(config), *sets], base / "tampered.log", expect_ok=False)
    assert "the reference adapter 'ref' differs from the trainable adapter 'default'" in log
    assert log.count("dropped 1 pairs whose chosen equals rejected and 1 repeated rows") == 1
    assert log.count("training: 1 of 9 pairs dropped (prompt alone >= dpo.max_length = 96 tokens)") == 1
    assert not (out / "final_adapter").exists() and not list(out.glob("checkpoint-*"))
