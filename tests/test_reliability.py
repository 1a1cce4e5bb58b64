"""Issue 22's failures, each reproduced as reported (on the code before the fix each of these fails or gives a raw
traceback): one writer per run folder for every script (2), checkpoints complete only when every file the resume
reads loads (1, 6), a DPO run that would train 0 steps (3), DPO on a full disk (4), one-line errors for bad dialogue
files, chat input that is not UTF-8 and token ids beyond the vocabulary (6), and the smaller ones (7)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from emotion_dpo.errors import PipelineError
from test_dpo import DEMO_CONFIG as DPO_CONFIG
from test_dpo import config as dpo_config
from test_faults import generate_config, preference_pairs, write_journal

ROOT = Path(__file__).resolve().parents[1]


def script(name, config, sets, *flags):
    args = [sys.executable, str(ROOT / name), "--config", str(config), *flags]
    for s in sets:
        args += ["--set", s]
    return args


def run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT, **kwargs)


def one_error_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("emotion_dpo.models.load_generator", refuse)


# ---------------------------------------------------------------- 2. one writer per run folder

HOLDER = """
import subprocess, sys
from emotion_dpo.files import FolderLock
lock = FolderLock(sys.argv[1], doing="running the pipeline", create=True)
stage = "import sys; from emotion_dpo.files import FolderLock; FolderLock(sys.argv[1], doing='training', create=True); print('stage ran')"
child = subprocess.run([sys.executable, "-c", stage, sys.argv[1] + "/iter-1/dpo"], env=lock.child_environment(),
                       capture_output=True, text=True)
print(child.stdout.strip() or child.stderr.strip().splitlines()[-1], flush=True)
print("holding", flush=True)
sys.stdin.read()  # until the test closes it
"""


def test_2_a_stage_runs_under_its_pipelines_lock_and_nothing_else_writes_inside_it(tmp_path, monkeypatch):
    from emotion_dpo.files import LOCK_HOLDER_ENV, FolderLock

    run_folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "stage ran"  # started by the holder, with its variable
        assert holder.stdout.readline().strip() == "holding"
        inside = run_folder / "iter-1" / "evaluation"
        with pytest.raises(PipelineError, match=f"where process {holder.pid} is running the pipeline"):
            FolderLock(inside, doing="evaluating")  # this process did not start from the holder
        # the variable alone proves nothing: this test process is no descendant of the holder
        monkeypatch.setenv(LOCK_HOLDER_ENV, f"{(run_folder / '.lock').resolve()}:{holder.pid}")
        with pytest.raises(PipelineError, match=f"where process {holder.pid} is running the pipeline"):
            FolderLock(inside, doing="evaluating")
        with pytest.raises(PipelineError, match=f"process {holder.pid} is running the pipeline in this folder"):
            FolderLock(run_folder, doing="running the pipeline")
    finally:
        holder.stdin.close()
        holder.wait()
    FolderLock(inside, doing="evaluating", create=True).release()  # the holder is gone: free again


def test_2_fine_tune_dpo_and_evaluate_are_refused_on_a_folder_another_process_writes(demo_world, tmp_path,
                                                                                      no_model_loading):
    from emotion_dpo.config import EvaluateConfig, load_config
    from emotion_dpo.dpo_train import train
    from emotion_dpo.evaluation import evaluate
    from emotion_dpo.files import FolderLock
    from test_evaluate import DEMO_CONFIG as EVALUATE_CONFIG

    folder = tmp_path / "out"
    folder.mkdir()
    cfg, _ = dpo_config(demo_world, preference_pairs(tmp_path / "pairs.jsonl", 8), folder)
    w = demo_world
    evaluate_cfg = load_config(EvaluateConfig, EVALUATE_CONFIG, [
        f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dpo_adapter={w / 'sft_adapter'}",
        f"dataset={w / 'dialogues'}", f"emotion_classifier={w / 'emotion_classifier'}",
        f"gibberish_detector={w / 'gibberish_detector'}", f"chat_template={ROOT / 'args/chat_template.json'}",
        f"output_dir={folder}", "wandb.mode=disabled", "num_prompts=4"])
    with FolderLock(folder, doing="training"):  # another writer (a lock held through another open file)
        with pytest.raises(PipelineError, match=f"process {os.getpid()} is training in this folder"):
            train(cfg)
        with pytest.raises(PipelineError, match=f"process {os.getpid()} is training in this folder"):
            evaluate(evaluate_cfg)
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # the holder's; nothing by the refused ones
    assert sorted(p.name for p in folder.iterdir()) == []  # the holder took its .lock with it


# ---------------------------------------------------------------- 3. a DPO run that would train 0 steps

@pytest.mark.parametrize("setting, message", [
    ("dpo.num_train_epochs=0", r"keys dpo.num_train_epochs, dpo.max_steps: dpo.num_train_epochs is 0"),
    ("dpo.num_train_epochs=-3", r"keys dpo.num_train_epochs, dpo.max_steps: dpo.num_train_epochs is -3"),
    ("dpo.max_steps=0", r"keys dpo.num_train_epochs, dpo.max_steps: dpo.max_steps is 0"),
    ("dpo.dataloader_drop_last=true", r"keys dpo.per_device_train_batch_size, dpo.dataloader_drop_last: 6 training "
                                      r"pairs make no batch of 8"),
])
def test_3_a_run_that_would_train_0_steps_is_an_error_before_the_model_loads(demo_world, tmp_path, setting, message,
                                                                            no_model_loading):
    from emotion_dpo.dpo_train import train

    cfg, _ = dpo_config(demo_world, preference_pairs(tmp_path / "pairs.jsonl", 6), tmp_path / "out",
                        "eval_fraction=0.0", "dpo.per_device_train_batch_size=8", setting)
    with pytest.raises(PipelineError, match=message):
        train(cfg)
    assert not (tmp_path / "out" / "final_adapter").exists()


def test_3_training_steps_count_as_the_trainer_counts_them():
    from types import SimpleNamespace

    from emotion_dpo.dpo_train import training_steps

    def args(**kw):
        return SimpleNamespace(**{"per_device_train_batch_size": 4, "dataloader_drop_last": False, "max_steps": -1,
                                  "gradient_accumulation_steps": 1, "num_train_epochs": 3.0, **kw})

    assert training_steps(16, args()) == (12, 4)  # 4 batches of 4, 3 epochs
    assert training_steps(17, args()) == (15, 5)  # the last batch of 1 counts
    assert training_steps(17, args(dataloader_drop_last=True)) == (12, 4)
    assert training_steps(16, args(gradient_accumulation_steps=3)) == (6, 4)  # ceil(4 / 3) = 2 updates per epoch
    assert training_steps(16, args(), processes=2) == (6, 2)  # 8 pairs per step across 2 processes
    assert training_steps(16, args(num_train_epochs=0.1)) == (1, 4)  # ceil(0.4)
    assert training_steps(16, args(max_steps=7)) == (7, 4)


# ---------------------------------------------------------------- 4. DPO on a full disk

# The text is safetensors' own, measured on a 64 KiB tmpfs (mount -t tmpfs -o size=64k): save_file there raised
# SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)").
FULL_DISK_DPO = """
import sys
import peft.peft_model
from safetensors import SafetensorError
from transformers import Trainer
def no_space(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
peft.peft_model.safe_save_file = no_space
sys.argv = ["fine_tune_dpo.py", *sys.argv[1:]]
import fine_tune_dpo
fine_tune_dpo.main()
"""


def test_4_dpo_on_a_full_disk_is_one_line_saying_the_work_is_safe_and_how_to_resume(demo_world, tmp_path):
    out = tmp_path / "dpo"
    _, sets = dpo_config(demo_world, preference_pairs(tmp_path / "pairs.jsonl", 8), out, "dpo.max_steps=2",
                         "dpo.save_steps=2", "eval_fraction=0.0", "dpo.eval_strategy=no",
                         "dpo.per_device_train_batch_size=4")
    result = run([sys.executable, "-c", FULL_DISK_DPO, *script("fine_tune_dpo.py", DPO_CONFIG, sets)[2:]])
    line = one_error_line(result)
    assert line.startswith(f"error: {out}: No space left on device. The work finished so far is safe")
    assert "free some space, then run it again with --resume" in line


# ---------------------------------------------------------------- 1 and 6. checkpoints: complete when every file loads

@pytest.fixture(scope="module")
def one_checkpoint(demo_world, tmp_path_factory):
    base = tmp_path_factory.mktemp("checkpoint")
    out = base / "dpo"
    _, sets = dpo_config(demo_world, preference_pairs(base / "pairs.jsonl", 8), out, "dpo.max_steps=2",
                         "dpo.save_steps=2", "eval_fraction=0.0", "dpo.eval_strategy=no",
                         "dpo.per_device_train_batch_size=4")
    result = run(script("fine_tune_dpo.py", DPO_CONFIG, sets))
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(out / "final_adapter")  # as if killed after the first checkpoint: a run to resume
    (out / "metrics.json").unlink()
    return out, sets


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                                  "start_adapter.json", "ref/adapter_model.safetensors"])
def test_6_a_checkpoint_with_a_file_cut_short_next_to_a_whole_trainer_state_is_incomplete(one_checkpoint, tmp_path,
                                                                                        name):
    from emotion_dpo.dpo_train import checkpoint_problem

    source, _ = one_checkpoint
    out = tmp_path / "dpo"
    shutil.copytree(source, out)
    assert checkpoint_problem(out / "checkpoint-2") is None
    json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())  # whole
    cut_in_half(out / "checkpoint-2" / name)
    assert checkpoint_problem(out / "checkpoint-2").startswith(f"{Path(name).name} does not load")


def test_1_and_6_resume_with_only_incomplete_checkpoints_restarts_from_the_start_adapter(one_checkpoint, tmp_path):
    source, sets = one_checkpoint
    out = tmp_path / "dpo"
    shutil.copytree(source, out)
    cut_in_half(out / "checkpoint-2" / "optimizer.pt")
    sets = [s for s in sets if not s.startswith("output_dir=")] + [f"output_dir={out}"]
    result = run(script("fine_tune_dpo.py", DPO_CONFIG, sets, "--resume"))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{out / 'checkpoint-2'}: incomplete (optimizer.pt does not load" in result.stdout
    assert "starting again from the start adapter" in result.stdout
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (out / "final_adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- 6. one-line errors

def test_6_token_ids_beyond_the_vocabulary_are_an_error_before_the_model_loads(demo_world, tmp_path, no_model_loading):
    from transformers import AutoTokenizer

    from emotion_dpo.dpo_train import train

    tokenizer = AutoTokenizer.from_pretrained(demo_world / "sft_adapter")
    prompt = "<s>[INST] [EMOTION] joy [/EMOTION] hi . [/INST] [EMOTION] joy [/EMOTION]"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # the template's text, one BOS
    rows = [{"prompt": prompt, "chosen": f"yay {i} !", "rejected": f"no {i}", "prompt_ids": prompt_ids,
             "chosen_ids": [5 + i, tokenizer.eos_token_id], "rejected_ids": [9 + i, tokenizer.eos_token_id]}
            for i in range(4)]
    rows[2]["chosen_ids"] = [len(tokenizer) + 7, tokenizer.eos_token_id]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, _ = dpo_config(demo_world, data, tmp_path / "out", "eval_fraction=0.0")
    with pytest.raises(PipelineError, match=rf"row 2, column 'chosen_ids': token id {len(tokenizer) + 7} is outside "
                                            rf"this tokenizer's {len(tokenizer)} tokens"):
        train(cfg)


def test_6_a_token_id_beyond_the_vocabulary_is_reported_with_its_row_in_the_file(demo_world, tmp_path,
                                                                                   no_model_loading):
    from transformers import AutoTokenizer

    from emotion_dpo.dpo_train import train

    tokenizer = AutoTokenizer.from_pretrained(demo_world / "sft_adapter")
    prompt = "<s>[INST] [EMOTION] joy [/EMOTION] hi {} . [/INST] [EMOTION] joy [/EMOTION]"
    rows = [{"prompt": prompt.format(i), "chosen": f"yay {i} !", "rejected": f"no {i}",
             "prompt_ids": tokenizer(prompt.format(i), add_special_tokens=False)["input_ids"],
             "chosen_ids": [5 + i, tokenizer.eos_token_id], "rejected_ids": [9 + i, tokenizer.eos_token_id]}
            for i in range(12)]
    rows[9]["chosen_ids"] = [len(tokenizer) + 7, tokenizer.eos_token_id]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a held-out share: the training split is a shuffle of the file's rows
    cfg, _ = dpo_config(demo_world, data, tmp_path / "out", "eval_fraction=0.25")
    with pytest.raises(PipelineError, match=re.escape(f"{data}: row 9, column 'chosen_ids': token id "
                                                      f"{len(tokenizer) + 7} is outside this tokenizer's")):
        train(cfg)


DIALOGUE = {"prompt": [{"role": "user", "content": {"emotion": "neutral", "dialog": "hi ."}},
                       {"role": "assistant", "content": {"emotion": "joy", "dialog": "hello !"}}]}


@pytest.mark.parametrize("tail, message", [
    ('{"prompt": "caf\xe9"}\n'.encode("latin-1"), r"dialogues.jsonl:3: not UTF-8 \(byte 0xe9 at column 16\)"),
    (json.dumps(DIALOGUE)[:30].encode(), r"dialogues.jsonl:3: not a JSON object \(.*\); it is the last line and "
                                         r"looks cut short"),
])
def test_6_a_dialogue_file_not_utf8_or_cut_short_is_one_line_naming_the_line(demo_world, tmp_path, tail, message,
                                                                             no_model_loading):
    from emotion_dpo.generate import generate

    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_bytes((json.dumps(DIALOGUE) + "\n").encode() * 2 + tail)
    with pytest.raises(PipelineError, match=message) as refused:  # the scripts print it as `error: ...`, exit 2
        generate(generate_config(demo_world, tmp_path / "out", extra=[f"dataset={dialogues}"]))
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_6_chat_refuses_a_line_that_is_not_utf8_and_the_session_goes_on(demo_world):
    w = demo_world
    sets = [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dpo_adapter={w / 'sft_adapter'}",
            f"emotion_classifier={w / 'emotion_classifier'}", f"gibberish_detector={w / 'gibberish_detector'}",
            f"chat_template={ROOT / 'args/chat_template.json'}", "wandb.mode=disabled"]
    for locale in ("C.UTF-8", "en_US.UTF-8"):  # stdin decodes with surrogateescape in the first, strictly otherwise
        result = subprocess.run(script("chat.py", ROOT / "args/demo/evaluate_arg.json", sets), input=b"caf\xe9\nhello .\n",
                                capture_output=True, timeout=600, cwd=ROOT,
                                env={**os.environ, "LC_ALL": locale, "LANG": locale, "PYTHONUTF8": "0"})
        out, err = result.stdout.decode(), result.stderr.decode()
        assert result.returncode == 0 and "Traceback" not in err, err[-3000:]
        assert "error: the line is not UTF-8 text (byte 0xe9 at character 4); the line is skipped" in err
        assert re.search(r"^you \(.*\): hello \.$", out, re.M) and "\n  DPO: " in out  # the next line is answered


# ---------------------------------------------------------------- 7. smaller ones

def test_7_finalize_during_a_run_counts_the_runs_total(demo_world, tmp_path, settled_record, capsys):
    from emotion_dpo.generate import finalize_run, prepare_output_dir

    out = tmp_path / "run"
    cfg = generate_config(demo_world, out)  # num_prompts 16
    prepare_output_dir(cfg, fresh=False).release()
    write_journal(out, [settled_record(i) for i in range(2)])  # 2 settled so far
    summary = finalize_run(cfg)
    assert re.search(r"prompts settled +2 / 16$", capsys.readouterr().out, re.M)
    assert summary["prompts_total"] == 16


def test_7_a_pair_whose_chosen_ids_equal_its_rejected_ids_is_dropped(capsys):
    from emotion_dpo.dpo_data import without_repeats

    rows = [{"prompt": "p", "chosen": "hi !", "rejected": "hi!", "prompt_ids": [1, 4], "chosen_ids": [7, 8, 2],
             "rejected_ids": [7, 8, 2]},  # two texts, one id sequence: nothing to learn
            {"prompt": "p", "chosen": "yes", "rejected": "no", "prompt_ids": [1, 4], "chosen_ids": [9, 2],
             "rejected_ids": [10, 2]}]
    kept = without_repeats(datasets.Dataset.from_list(rows), "pairs")
    assert kept["chosen"] == ["yes"]
    assert "dropped 1 pairs whose chosen equals rejected" in capsys.readouterr().out
