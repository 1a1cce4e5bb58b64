"""The faults a long job meets (issue 15), each reproduced as a user met it: two writers on one run folder, a
kill during a checkpoint save, a torn config.json, over-long DPO pairs, a run whose every prompt failed, corrupt
journal lines, a crash inside finalize, input that used to pass unnoticed, and OS errors that must read as one line.
Multi-process faults use real processes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from emotion_dpo.config import GenerateConfig, load_config, save_config
from emotion_dpo.errors import PipelineError
from emotion_dpo.journal import journal_files, merge_journals, read_journal
from test_dpo import DEMO_CONFIG as DPO_CONFIG
from test_dpo import config as dpo_config
from test_generate_preferences import DEMO_CONFIG, demo_overrides, run_script

ROOT = Path(__file__).resolve().parents[1]


def generate_config(demo_world, output_dir, extra=()):
    return load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, output_dir, extra=extra))


def write_journal(folder: Path, records, rank=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"journal.rank{rank}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def in_subprocess(code: str, *args, timeout=600):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------- 1. two writers on one output_dir

def test_two_processes_on_one_output_dir_the_second_is_refused_naming_the_first(demo_world, tmp_path):
    out = tmp_path / "dup"
    args = run_script(demo_world, out, num_prompts=16, extra=["batch_prompts=8"])
    logs = [open(tmp_path / f"stderr{i}", "w+") for i in (1, 2)]
    processes = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log) for log in logs]
    results = {}
    for process, log in zip(processes, logs):
        process.wait(timeout=600)
        log.seek(0)
        results[process.pid] = (process.returncode, log.read())
    refused = [pid for pid, (code, _) in results.items() if code == 2]
    assert len(refused) == 1 and sorted(code for code, _ in results.values()) == [0, 2]
    holder = next(pid for pid in results if pid not in refused)
    message = results[refused[0]][1]
    assert f"process {holder} is generating in this folder" in message and "Traceback" not in message
    lines = (out / "journal.rank0.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == list(range(16))  # 16 lines, not 32


def test_torchrun_with_two_processes_gives_each_its_share_and_journal(demo_world, tmp_path):
    """torchrun (no accelerate launcher) on CPUs: accelerate alone saw 1 process, so both wrote rank 0."""
    out = tmp_path / "torchrun"
    args = run_script(demo_world, out, num_prompts=8, extra=["batch_prompts=2"])
    # --standalone: torchrun picks a free port for its rendezvous (no fixed port that another run may hold)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              *args[1:]]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    by_rank = [[r["index"] for r in read_journal(out / f"journal.rank{rank}.jsonl")] for rank in (0, 1)]
    # batches of 2 prompts dealt in turn: rank 0 batches 0 and 2, rank 1 batches 1 and 3
    assert sorted(by_rank[0]) == [0, 1, 4, 5] and sorted(by_rank[1]) == [2, 3, 6, 7]
    assert len(datasets.load_from_disk(str(out / "dataset"))) == json.loads(
        (out / "statistics.json").read_text())["accepted"]


def test_a_journal_two_writers_left_is_recovered_identical_repeats_kept_once(tmp_path, settled_record, capsys):
    records = [settled_record(i) for i in range(4)]
    path = write_journal(tmp_path, records + records)  # what two processes on one journal left: 8 lines, 4 prompts
    assert merge_journals([path]) == records
    assert "4 journal lines repeat a settled prompt with the identical record" in capsys.readouterr().out
    write_journal(tmp_path, records + [settled_record(2, chosen="a different reply .")])
    with pytest.raises(PipelineError) as refused:
        merge_journals([path])
    assert f"{path}:3 and {path}:5" in str(refused.value)  # both lines, and the way out
    assert f"sed -i '5d' {path}" in str(refused.value)


# ---------------------------------------------------------------- 2. kill -9 during a checkpoint save

def preference_pairs(path: Path, count: int, prompt_text=lambda i: f"hello {i} .") -> Path:
    rows = [{"prompt": f"<s>[INST] [EMOTION] joy [/EMOTION] {prompt_text(i)} [/INST] [EMOTION] joy [/EMOTION]",
             "chosen": f"i am so happy for you {i} !", "rejected": f"no {i}"} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_kill_during_a_checkpoint_save_resumes_from_the_newest_complete_checkpoint(demo_world, tmp_path):
    out = tmp_path / "dpo"
    _, sets = dpo_config(demo_world, preference_pairs(tmp_path / "pairs.jsonl", 16), out, "dpo.max_steps=6",
                         "dpo.save_steps=2", "dpo.save_total_limit=null", "dpo.per_device_train_batch_size=4",
                         "eval_fraction=0.0", "dpo.eval_strategy=no")
    command = [sys.executable, str(ROOT / "fine_tune_dpo.py"), "--config", str(DPO_CONFIG)]
    for s in sets:
        command += ["--set", s]
    # SIGKILL inside checkpoint-4's save, before the Trainer writes its trainer_state.json (emotion_dpo/faultpoints.py)
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "EMOTION_DPO_FAULT": "kill@dpo-save:4"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "fault point dpo-save:4: kill (process " in killed.stdout
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()

    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{out / 'checkpoint-4'}: skipped, incomplete (no trainer_state.json" in result.stdout
    assert f"resuming from {out / 'checkpoint-2'}" in result.stdout
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoint-4" / "trainer_state.json").exists()  # saved again, whole, by the resumed run


# ---------------------------------------------------------------- 3. a torn config.json

CUT_SHORT_WRITE = """
import resource, signal, sys
from emotion_dpo.config import GenerateConfig, load_config, save_config
cfg = load_config(GenerateConfig, sys.argv[1], sys.argv[3:])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # ulimit -f: the write stops after 200 bytes
try:
    save_config(cfg, sys.argv[2])
except OSError as e:
    print("cut short:", e.strerror)
"""


def test_a_config_write_cut_short_leaves_the_old_config_json_whole(demo_world, tmp_path):
    cfg = generate_config(demo_world, tmp_path)
    save_config(cfg, tmp_path)
    before = (tmp_path / "config.json").read_text()
    result = in_subprocess(CUT_SHORT_WRITE, DEMO_CONFIG, tmp_path, *demo_overrides(demo_world, tmp_path, extra=["seed=7"]))
    assert "cut short: File too large" in result.stdout, result.stderr[-2000:]
    assert (tmp_path / "config.json").read_text() == before  # not 200 bytes of a new one
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind


def test_a_torn_config_json_is_a_clear_error_and_fresh_or_deleting_it_gets_out(demo_world, tmp_path, settled_record):
    from emotion_dpo.generate import prepare_output_dir

    out = tmp_path / "run"
    cfg = generate_config(demo_world, out)
    write_journal(out, [settled_record(0)])
    save_config(cfg, out)
    (out / "config.json").write_text((out / "config.json").read_text()[:100])  # what a cut write left
    result = subprocess.run(run_script(demo_world, out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{out / 'config.json'}: unreadable" in result.stderr and "--fresh" in result.stderr
    (out / "config.json").unlink()  # the way out the message names: resume with this config
    lock = prepare_output_dir(cfg, fresh=False)
    lock.release()
    assert json.loads((out / "config.json").read_text())["seed"] == cfg.seed
    (out / "config.json").write_text("{")
    lock = prepare_output_dir(cfg, fresh=True)  # --fresh never reads the torn file
    lock.release()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "emotion_dpo_run.json"]  # a new run's folder
    assert len(list(tmp_path.glob("run.old-*/journal.rank0.jsonl"))) == 1


# ---------------------------------------------------------------- 4. DPO pairs too long for max_length

def test_pairs_too_long_are_counted_before_training_and_all_too_long_is_a_clear_error(demo_world, tmp_path, capsys):
    from emotion_dpo.dpo_train import train

    long_prompt = lambda i: ("that is a long story . " * 450 if i % 2 else f"hello {i} .")  # noqa: E731  ~10k chars
    pairs = preference_pairs(tmp_path / "pairs.jsonl", 20, long_prompt)
    cfg, _ = dpo_config(demo_world, pairs, tmp_path / "dpo", "dpo.max_steps=1", "eval_fraction=0.0",
                        "dpo.eval_strategy=no")
    train(cfg)
    out = capsys.readouterr().out
    assert "training: 10 of 20 pairs dropped (prompt alone >= dpo.max_length = 96 tokens)" in out
    assert "training 10 pairs" in out  # what TRL trains on, not the 20 read

    only_long = preference_pairs(tmp_path / "long.jsonl", 4, lambda i: "that is a long story . " * 450)
    cfg, _ = dpo_config(demo_world, only_long, tmp_path / "dpo2", "eval_fraction=0.0")
    with pytest.raises(PipelineError, match=r"dpo.max_length = 96 tokens .*TRL would drop all 4"):
        train(cfg)


def test_generate_preferences_warns_about_a_long_turn_and_prompts_longer_than_the_model_takes(demo_world, tmp_path):
    from emotion_dpo.generate import generate

    turns = [turn("user"), turn("assistant"), turn("user", "hello there . " * 715), turn("assistant")]  # 10,010 chars
    data = tmp_path / "dialogues.jsonl"
    data.write_text(json.dumps({"prompt": turns}) + "\n")
    (tmp_path / "file").write_text("")
    cfg = generate_config(demo_world, tmp_path / "file" / "out", [f"dataset={data}"])
    with pytest.warns(UserWarning) as caught, pytest.raises(PipelineError, match="not writable"):
        generate(cfg)  # stopped right after the checks by an output_dir under a file
    messages = [str(w.message) for w in caught]
    assert any("1 turns are longer than 2000 characters (longest: row 0, turn 2, 10010 characters)" in m
               for m in messages)
    # demo base: max_position_embeddings 256, generation.max_new_tokens 20
    assert any("1 of 1 prompts are longer than the 236 tokens the model takes" in m for m in messages)


# ---------------------------------------------------------------- 5. every prompt failed: a 0-pair dataset

def test_a_run_whose_every_prompt_failed_writes_a_readable_empty_dataset(demo_world, tmp_path, settled_record):
    from emotion_dpo.dpo_train import train
    from emotion_dpo.generate import finalize

    out = tmp_path / "run"
    write_journal(out, [settled_record(i, accepted=False) for i in range(3)])
    finalize(generate_config(demo_world, out), out)
    empty = datasets.load_from_disk(str(out / "dataset"))
    assert len(empty) == 0 and {"prompt", "chosen", "rejected", "chosen_score"} <= set(empty.column_names)
    assert empty.features["chosen_score"].dtype == "float64"
    assert len((out / "failed.jsonl").read_text().splitlines()) == 3
    cfg, _ = dpo_config(demo_world, out / "dataset", tmp_path / "dpo")
    with pytest.raises(PipelineError, match=f"0 pairs in {out / 'dataset'}"):
        train(cfg)
    (tmp_path / "none.jsonl").write_text("")
    cfg, _ = dpo_config(demo_world, tmp_path / "none.jsonl", tmp_path / "dpo")
    with pytest.raises(PipelineError, match=f"0 pairs in {tmp_path / 'none.jsonl'}"):
        train(cfg)


# ---------------------------------------------------------------- 6. corrupt lines in the middle of a journal

@pytest.mark.parametrize("corrupt, message", [
    (lambda r: '{"index": 1, "prompt": "x', "not a JSON line"),
    (lambda r: json.dumps({k: v for k, v in r.items() if k != "rounds"}), "key 'rounds' is missing"),
    (lambda r: json.dumps({**r, "index": "1"}), "key 'index': expected int"),
    (lambda r: json.dumps({**r, "rounds": [[{"text": "hi"}]]}), r"rounds\[0\]\[0\]: expected a scored reply"),
    (lambda r: json.dumps({**r, "chosen_at": 7}), "key 'chosen_at': expected the position of a reply"),
    (lambda r: json.dumps({**r, "status": "maybe"}), "key 'status': \"maybe\", expected one of accepted, failed"),
])
def test_a_corrupt_middle_line_names_the_file_and_line(tmp_path, settled_record, corrupt, message):
    lines = [json.dumps(settled_record(i)) for i in range(3)]
    lines[1] = corrupt(settled_record(1))
    path = tmp_path / "journal.rank0.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PipelineError, match=f"{re.escape(str(path))}:2: .*{message}"):
        merge_journals(journal_files(tmp_path))
    path.write_text("\n".join([json.dumps(settled_record(0)), lines[1][:25]]))  # the same, torn, as the last line
    assert [r["index"] for r in read_journal(path)] == [0]


# ---------------------------------------------------------------- 7. a crash inside finalize

CRASHING_FINALIZE = """
import os, signal, sys
from pathlib import Path
from emotion_dpo.config import GenerateConfig, load_config
from emotion_dpo.generate import finalize

def die(original):
    def dying(*args, **kwargs):
        if sys.argv[1] == "after the switch":
            original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return dying

if sys.argv[1] == "after the switch":
    from emotion_dpo import files
    files._replace_with_link = die(files._replace_with_link)  # its first call switches `final`
else:
    from emotion_dpo import stats
    stats.summarize = die(stats.summarize)  # the dataset is written, the statistics are not
cfg = load_config(GenerateConfig, sys.argv[2], sys.argv[4:])
finalize(cfg, Path(sys.argv[3]))
"""


def output_set(folder: Path) -> dict:
    """What a reader of the documented paths sees."""
    return {"dataset": sorted(datasets.load_from_disk(str(folder / "dataset"))["index"]),
            "preferences": sorted(json.loads(line)["index"] for line in (folder / "preferences.jsonl").open()),
            "failed": sorted(json.loads(line)["index"] for line in (folder / "failed.jsonl").open()),
            "accepted": json.loads((folder / "statistics.json").read_text())["accepted"],
            "settled": json.loads((folder / "statistics.json").read_text())["prompts_settled"]}


@pytest.mark.parametrize("crash_point", ["between the dataset and the statistics", "after the switch"])
def test_a_crash_inside_finalize_leaves_the_old_set_or_the_new_one(demo_world, tmp_path, settled_record, crash_point):
    from emotion_dpo.generate import finalize

    out = tmp_path / "run"
    write_journal(out, [settled_record(i, accepted=i % 3 != 0) for i in range(12)])
    finalize(generate_config(demo_world, out, ["num_prompts=6"]), out)  # the old set: the first 6 prompts
    old = output_set(out)
    assert old == {"dataset": [1, 2, 4, 5], "preferences": [1, 2, 4, 5], "failed": [0, 3], "accepted": 4,
                   "settled": 6}
    crashed = in_subprocess(CRASHING_FINALIZE, crash_point, DEMO_CONFIG, out,
                            *demo_overrides(demo_world, out, num_prompts=12))
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    seen = output_set(out)
    new = {"dataset": [1, 2, 4, 5, 7, 8, 10, 11], "preferences": [1, 2, 4, 5, 7, 8, 10, 11], "failed": [0, 3, 6, 9],
           "accepted": 8, "settled": 12}
    assert seen == (new if crash_point == "after the switch" else old)
    finalize(generate_config(demo_world, out, ["num_prompts=12"]), out)  # and the next finalize is not stuck
    assert output_set(out) == new


# ---------------------------------------------------------------- 8. input that passed unnoticed

def dialogue_file(tmp_path, rows) -> Path:
    data = tmp_path / "dialogues.jsonl"
    data.write_text("".join(json.dumps({"prompt": row}) + "\n" for row in rows))
    return data


def turn(role, dialog="hi .", emotion="neutral"):
    return {"role": role, "content": {"emotion": emotion, "dialog": dialog}}


@pytest.mark.parametrize("row, message", [
    ([turn("user", None), turn("assistant")], r"row 0, turn 0: dialog is null, expected the text of the turn"),
    # the reference template refuses them: hermeschen1116/emotion-chat-bot@1228505,
    # src/scripts/response_generator/chat_templates/Llama2_IN_INST_UNI.json: 'Conversation roles must alternate'
    ([turn("user"), turn("user"), turn("assistant"), turn("assistant")],
     r"row 0, turn 1: a second 'user' turn in a row; roles must alternate"),
    (None, r"row 0: 'prompt' is null, expected a list of turns"),
])
def test_bad_dialogue_rows_are_refused_before_generation(demo_world, tmp_path, row, message):
    from emotion_dpo.generate import generate

    rows = [row] if row is not None else [None]
    cfg = generate_config(demo_world, tmp_path / "out", [f"dataset={dialogue_file(tmp_path, rows)}"])
    with pytest.raises(PipelineError, match=message):
        generate(cfg)
    assert not (tmp_path / "out").exists()


def test_identical_and_repeated_dpo_pairs_are_dropped_with_a_count_and_never_held_out(demo_world, tmp_path, capsys):
    from emotion_dpo.dpo_data import load_preferences

    rows = [{"prompt": f"<s>[INST] [EMOTION] joy [/EMOTION] hi {i} . [/INST] [EMOTION] joy [/EMOTION]",
             "chosen": f"yay {i} !", "rejected": f"no {i}"} for i in range(20)]
    same = [{**rows[0], "rejected": rows[0]["chosen"]}, {**rows[1], "rejected": rows[1]["chosen"]}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:6] + same))  # 28 rows, 20 distinct pairs
    cfg, _ = dpo_config(demo_world, data, tmp_path / "out", "eval_fraction=0.25")
    train_set, eval_set = load_preferences(cfg)
    assert "dropped 2 pairs whose chosen equals rejected and 6 repeated rows; 20 of 28 pairs left" in \
        capsys.readouterr().out
    held_out = set(zip(eval_set["prompt"], eval_set["chosen"]))
    assert len(train_set) + len(eval_set) == 20 and not held_out & set(zip(train_set["prompt"], train_set["chosen"]))


def test_finalize_with_another_n_candidates_or_reward_weights_names_the_keys(demo_world, tmp_path, settled_record):
    from emotion_dpo.generate import finalize_run, prepare_output_dir

    out = tmp_path / "run"
    prepare_output_dir(generate_config(demo_world, out), fresh=False).release()
    write_journal(out, [settled_record(i) for i in range(3)])
    other = generate_config(demo_world, out, ["n_candidates=3", "reward_weights=[1.0,0.0,0.0]"])
    with pytest.warns(UserWarning, match=r"change nothing here:\n  n_candidates: 6 -> 3\n  reward_weights: "):
        finalize_run(other)


# ---------------------------------------------------------------- 9. OS errors as one line

FULL_DISK = """
import errno, os, sys
from emotion_dpo import journal
append = journal.Journal.append
def append_until_the_disk_is_full(self, record):
    if sum(1 for _ in open(self.path)) >= 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
    append(self, record)
journal.Journal.append = append_until_the_disk_is_full
sys.argv = ["generate_preferences.py", *sys.argv[1:]]
import generate_preferences
generate_preferences.main()
"""


def test_a_full_disk_during_generation_says_the_data_is_safe_and_how_to_resume(demo_world, tmp_path):
    out = tmp_path / "full"
    result = in_subprocess(FULL_DISK, *run_script(demo_world, out, num_prompts=8, extra=["batch_prompts=4"])[2:])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {out / 'journal.rank0.jsonl'}: No space left on device. The work finished so far "
                           "is safe")
    assert line.endswith("free some space, then run the same command again to resume")
    assert len(read_journal(out / "journal.rank0.jsonl")) == 2


def test_an_output_dir_that_is_a_file_is_one_clear_line_in_generate_and_dpo(demo_world, tmp_path):
    from emotion_dpo.dpo_train import train
    from emotion_dpo.generate import generate

    (tmp_path / "out").write_text("")
    with pytest.raises(PipelineError, match="output_dir is a file, expected a folder"):
        generate(generate_config(demo_world, tmp_path / "out"))
    cfg, _ = dpo_config(demo_world, preference_pairs(tmp_path / "pairs.jsonl", 4), tmp_path / "out")
    with pytest.raises(PipelineError, match="output_dir is a file, expected a folder"):
        train(cfg)


READ_ONLY = """
import errno, os, pathlib, sys
def read_only(self, *args, **kwargs):  # root writes anywhere: the read-only file system is simulated
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
pathlib.Path.mkdir = read_only
sys.argv = ["generate_preferences.py", *sys.argv[1:]]
import generate_preferences
generate_preferences.main()
"""


def test_finalize_on_a_read_only_folder_is_one_line(demo_world, tmp_path, settled_record):
    out = tmp_path / "run"
    write_journal(out, [settled_record(0)])
    result = in_subprocess(READ_ONLY, *run_script(demo_world, out, flags=["--finalize"])[2:])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: {out / '.staging'}: Read-only file system: cannot write there" in result.stderr
