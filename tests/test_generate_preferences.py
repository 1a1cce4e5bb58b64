"""generate_preferences.py end to end on the demo world: the dataset, the filters, resume after kill -9,
--reselect, and bad input refused before generation starts."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

from emotion_dpo.config import GenerateConfig, load_config
from emotion_dpo.errors import PipelineError
from emotion_dpo.distributed import shard
from emotion_dpo.journal import journal_files, merge_journals, read_journal
from conftest import REFERENCE_SELECTION

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "args/demo/generate_preferences_arg.json"
COLUMNS = ["prompt", "chosen", "rejected", "chosen_score", "rejected_score", "prompt_ids", "chosen_ids", "rejected_ids",
           "target_emotion", "rounds"]


def demo_overrides(demo_world, output_dir, num_prompts=16, extra=()):
    w = demo_world
    return [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dataset={w / 'dialogues'}",
            f"emotion_classifier={w / 'emotion_classifier'}", f"gibberish_detector={w / 'gibberish_detector'}",
            f"chat_template={ROOT / 'args/chat_template.json'}", f"output_dir={output_dir}",
            f"num_prompts={num_prompts}", "wandb.mode=disabled", *REFERENCE_SELECTION, *extra]


def run_script(demo_world, output_dir, num_prompts=16, extra=(), flags=()):
    args = [sys.executable, str(ROOT / "generate_preferences.py"), "--config", str(DEMO_CONFIG), *flags]
    for override in demo_overrides(demo_world, output_dir, num_prompts, extra):
        args += ["--set", override]
    return args


@pytest.fixture(scope="module")
def finished_run(demo_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "preferences"
    result = subprocess.run(run_script(demo_world, out), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, out))
    return SimpleNamespace(out=out, cfg=cfg, stdout=result.stdout)


def test_dataset_has_the_documented_columns(finished_run):
    data = datasets.load_from_disk(str(finished_run.out / "dataset"))
    assert set(COLUMNS) <= set(data.column_names)
    assert len(data) > 0
    lines = (finished_run.out / "preferences.jsonl").read_text().splitlines()
    assert len(lines) == len(data)
    assert (finished_run.out / "failed.jsonl").exists()


def test_every_prompt_is_settled_exactly_once(finished_run):
    records = merge_journals(journal_files(finished_run.out))
    assert [r["index"] for r in records] == list(range(16))


def reference_rendering(system: str, turns: list, target: str) -> str:
    """The rules of the reference's template (hermeschen1116/emotion-chat-bot 288acc1,
    src/bot/response_generator/chat_template/Llama2_OUT_INST_UNI.json), written out: BOS before every user turn,
    the system prompt inside the first [INST], stripped dialogs, ' ' + EOS + newline after every reply, and the
    generation prompt ending in a space."""
    text = ""
    for at, turn in enumerate(turns):
        emotion, dialog = turn["content"]["emotion"], turn["content"]["dialog"].strip()
        if turn["role"] == "user":
            head = f"[INST]<<SYS>>\n{system}\n<</SYS>>\n\n" if at == 0 and system else "[INST] "
            text += f"<s>{head}[EMOTION] {emotion} [/EMOTION] {dialog}"
        else:
            text += f" [/INST] [EMOTION] {emotion} [/EMOTION] {dialog} </s>\n"
    return text + f" [/INST] [EMOTION] {target} [/EMOTION] "


def test_prompts_are_stored_exactly_as_the_model_saw_them(finished_run, demo_world):
    cfg = finished_run.cfg  # the demo's: one turn pair of history, the last window of each dialogue
    splits = datasets.load_from_disk(str(demo_world / "dialogues"))
    rows = datasets.concatenate_datasets([splits["train"], splits["validation"]])["prompt"]
    records = merge_journals(journal_files(finished_run.out))
    assert records
    for record in records:
        window = rows[record["dialogue"]][-(2 + 2 * cfg.num_turns_history):]
        assert window[-1]["content"]["emotion"] == record["target_emotion"]
        assert record["prompt"] == reference_rendering(cfg.system_prompt, window[:-1], record["target_emotion"])


def test_every_chosen_passes_the_filters_and_every_gap_reaches_the_target(finished_run):
    """The rules of docs/selection.md, "The rules", written out literally against the stored labels and texts (demo
    config: target_score_range 5, min_chosen_score 8, clean confidence >= 0.8, endings ! . ?)."""
    accepted = [r for r in merge_journals(journal_files(finished_run.out)) if r["status"] == "accepted"]
    assert accepted
    for record in accepted:
        last = record["rounds"][-1]
        chosen, rejected = last[record["chosen_at"]], last[record["rejected_at"]]
        totals = [reply["total"] for reply in last]
        assert chosen["total"] == max(totals) and rejected["total"] == min(totals)
        assert chosen["emotion_label"].lower() == record["target_emotion"].lower()
        assert chosen["gibberish_label"].lower() == "clean"
        assert chosen["gibberish_confidence"] >= 0.8
        assert chosen["text"].rstrip(" ")[-1:] in ("!", ".", "?")
        assert chosen["total"] - rejected["total"] >= 5.0
        assert chosen["total"] >= 8.0


def length_reward_by_the_rule(length, shortest=5, longest=20):
    a, b = (length - shortest) / shortest, (length - longest) / longest
    if abs(a) < 1:
        return a * 0.0001
    if abs(a) > 1 > abs(b):
        return abs(a + b) * 10
    return b * 0.9


def test_scores_recomputed_from_the_stored_components_match(finished_run):
    """Each stored reward part and total, recomputed from the stored classifier outputs and length with the
    formulas written out here (demo config: weights [0.4, 0.25, 0.35], bias 0.001, characters, 5 / 20)."""
    rows = {r["index"]: r for r in map(json.loads, (finished_run.out / "preferences.jsonl").read_text().splitlines())}
    for record in merge_journals(journal_files(finished_run.out)):
        target = record["target_emotion"]
        for round_ in record["rounds"]:
            for stored in round_:
                assert stored["length"] == len(stored["text"])
                emotion = stored["emotion_confidence"] * 10 if stored["emotion_label"].lower() == target else 0.0
                gibberish = {"clean": stored["gibberish_confidence"] * 10,
                             "mild gibberish": stored["gibberish_confidence"] * 5}.get(
                    stored["gibberish_label"].lower(), stored["gibberish_confidence"] - 2)
                length = length_reward_by_the_rule(stored["length"])
                assert stored["emotion_reward"] == pytest.approx(emotion)
                assert stored["gibberish_reward"] == pytest.approx(gibberish)
                assert stored["length_reward"] == pytest.approx(length)
                assert stored["total"] == pytest.approx(0.4 * emotion + 0.25 * length + 0.35 * gibberish + 0.001)
        if record["status"] == "accepted":
            last = record["rounds"][-1]
            assert rows[record["index"]]["chosen_score"] == last[record["chosen_at"]]["total"]
            assert rows[record["index"]]["rejected_score"] == last[record["rejected_at"]]["total"]


def test_statistics_are_reported(finished_run):
    """statistics.json against the run's own rows and journal, summed up here with Python's statistics module."""
    import statistics
    from collections import Counter

    from emotion_dpo.config import to_dict

    out = finished_run.out
    stats = json.loads((out / "statistics.json").read_text())
    rows = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    records = merge_journals(journal_files(out))
    gaps = [row["chosen_score"] - row["rejected_score"] for row in rows]
    assert (stats["prompts_settled"], stats["accepted"], stats["failed"]) == (16, len(rows), 16 - len(rows))
    assert stats["acceptance_rate"] == len(rows) / 16
    assert stats["score_gap"]["median"] == pytest.approx(statistics.median(gaps))
    assert stats["score_gap"]["mean"] == pytest.approx(statistics.fmean(gaps))
    assert stats["score_gap"]["sd"] == pytest.approx(statistics.stdev(gaps))
    assert stats["rounds_per_prompt"]["histogram"] == {
        str(k): v for k, v in sorted(Counter(len(r["rounds"]) for r in records).items())}
    for plot in ("score_gap.png", "reward_parts.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"score gap (chosen - rejected): median {statistics.median(gaps):.3f}" in finished_run.stdout
    assert to_dict(load_config(GenerateConfig, out / "config.json")) == to_dict(finished_run.cfg)  # the resolved config


def test_num_prompts_lowered_after_a_run_gives_a_dataset_of_the_first_num_prompts(finished_run, demo_world, tmp_path):
    import shutil

    from emotion_dpo.generate import finalize

    copy = tmp_path / "run"
    shutil.copytree(finished_run.out, copy)
    cfg = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, copy, num_prompts=8))
    summary = finalize(cfg, copy)
    rows = [json.loads(line) for line in (copy / "preferences.jsonl").read_text().splitlines()]
    first_8 = [r for r in merge_journals(journal_files(copy)) if r["index"] < 8]
    assert [r["index"] for r in rows] == [r["index"] for r in first_8 if r["status"] == "accepted"]
    assert summary["prompts_settled"] == len(first_8) == 8
    assert len(merge_journals(journal_files(copy))) == 16  # the journal keeps what settled


def test_reselect_with_the_original_settings_reproduces_the_dataset(finished_run, demo_world, tmp_path):
    out = tmp_path / "same"
    result = subprocess.run(run_script(demo_world, finished_run.out, flags=["--reselect", str(out)]),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "preferences.jsonl").read_text() == (finished_run.out / "preferences.jsonl").read_text()


def reselected(finished_run, demo_world, tmp_path, extra):
    from emotion_dpo.generate import reselect_run

    cfg = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, finished_run.out, extra=extra))
    reselect_run(cfg, str(tmp_path / "reselected"))
    return merge_journals(journal_files(tmp_path / "reselected"))


def test_diversity_aware_pairs_pass_the_rules_over_the_prompts_pool_and_keep_under_the_cap(finished_run, demo_world,
                                                                                             tmp_path):
    """docs/selection.md, "Diversity-aware selection", written out literally on the run's stored candidates: a cap of
    25 % (at least 1) per text and emotion, the pair from anywhere in the prompt's rounds."""
    reselected(finished_run, demo_world, tmp_path, ["chosen_text_cap=0.25", "chosen_text_cap_min=1"])
    out = tmp_path / "reselected"
    records = {r["index"]: r for r in merge_journals(journal_files(out))}  # the candidates, as the run stored them
    rows = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert rows
    by_emotion = {}
    for row in rows:
        pool = [reply for round_ in records[row["index"]]["rounds"] for reply in round_]
        chosen = next(reply for reply in pool if reply["text"] == row["chosen"] and reply["total"] == row["chosen_score"])
        assert row["rejected_score"] == min(reply["total"] for reply in pool)
        assert chosen["emotion_label"].lower() == row["target_emotion"].lower()
        assert chosen["gibberish_label"].lower() == "clean" and chosen["gibberish_confidence"] >= 0.8
        assert chosen["text"].rstrip(" ")[-1:] in ("!", ".", "?")
        assert row["chosen_score"] >= 8.0 and row["chosen_score"] - row["rejected_score"] >= 5.0
        by_emotion.setdefault(row["target_emotion"], []).append(row["chosen"].strip())
    statistics = json.loads((out / "statistics.json").read_text())["chosen_text"]
    for emotion, texts in by_emotion.items():
        cap = max(1, int(0.25 * statistics[emotion]["prompts"]))
        assert statistics[emotion]["cap"] == cap
        assert max(texts.count(t) for t in texts) <= cap


def test_reselect_with_fewer_retries_counts_only_the_first_rounds(finished_run, demo_world, tmp_path):
    records = reselected(finished_run, demo_world, tmp_path, ["max_retries=0"])
    original = {r["index"]: r for r in merge_journals(journal_files(finished_run.out))}
    assert any(len(r["rounds"]) > 1 for r in original.values())  # the demo run did retry
    assert all(len(r["rounds"]) == 1 for r in records)
    assert {r["index"] for r in records if r["status"] == "accepted"} == {
        i for i, r in original.items() if r["status"] == "accepted" and len(r["rounds"]) == 1}


def test_reselect_with_another_length_unit_measures_the_replies_again(finished_run, demo_world, tmp_path):
    records = reselected(finished_run, demo_world, tmp_path, ["length_unit=words"])
    replies = [reply for r in records for round_ in r["rounds"] for reply in round_]
    assert all(reply["length"] == len(reply["text"].split()) for reply in replies)
    assert any(len(reply["text"]) != len(reply["text"].split()) for reply in replies)


def test_reselect_in_tokens_counts_them_with_the_generators_tokenizer(finished_run, demo_world, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_world / "sft_adapter")
    records = reselected(finished_run, demo_world, tmp_path, ["length_unit=tokens"])
    replies = [reply for r in records for round_ in r["rounds"] for reply in round_]
    assert all(reply["length"] == len(tokenizer(reply["text"], add_special_tokens=False)["input_ids"])
               for reply in replies)


def test_reselect_refuses_keys_that_would_need_new_generation(finished_run, demo_world, tmp_path):
    with pytest.raises(PipelineError, match=r"would need new generation:\n  n_candidates: 6 -> 3"):
        reselected(finished_run, demo_world, tmp_path, ["n_candidates=3"])
    assert not (tmp_path / "reselected").exists()


def test_a_run_killed_with_sigkill_resumes_without_loss_or_duplicates(demo_world, tmp_path):
    out = tmp_path / "killed"
    args = run_script(demo_world, out, num_prompts=30, extra=["batch_prompts=3"])
    journal = out / "journal.rank0.jsonl"
    # the run kills itself with SIGKILL once its 4th settled prompt is on disk (emotion_dpo/faultpoints.py)
    killed = subprocess.run(args, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "EMOTION_DPO_FAULT": "kill@settled:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "fault point settled:4: kill (process " in killed.stdout
    before = {r["index"]: r for r in read_journal(journal)}
    assert len(before) == 4  # exactly the 4 it reported before it died
    assert not (out / "dataset").exists()

    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"already settled {len(before)}" in result.stdout
    after = merge_journals(journal_files(out))
    assert [r["index"] for r in after] == list(range(30))
    for record in after:
        if record["index"] in before:
            assert record == before[record["index"]]  # finished work is never redone or changed
    rows = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert len({row["index"] for row in rows}) == len(rows)


class Killed(BaseException):
    """A fault point's SIGKILL, in-process: generate() stops at the point (only its finally blocks run, and they
    write no data), and the test goes on to resume it."""


def test_a_run_killed_at_any_settled_count_resumes_to_the_pairs_of_an_uninterrupted_run(demo_world, tmp_path,
                                                                                           monkeypatch, capsys):
    from emotion_dpo import faultpoints
    from emotion_dpo.generate import generate

    def kill(pid, signal_number):
        raise Killed

    monkeypatch.setattr(faultpoints, "os", SimpleNamespace(environ=os.environ, getpid=os.getpid, getppid=os.getppid,
                                                           kill=kill))

    def run(out, fault=None):
        if fault:
            monkeypatch.setenv("EMOTION_DPO_FAULT", fault)
        else:
            monkeypatch.delenv("EMOTION_DPO_FAULT", raising=False)
        # 8 prompts in batches of 3 (0-2, 3-5, 6-7), one process
        generate(load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, out, 8, ["batch_prompts=3"])))

    run(tmp_path / "uninterrupted")
    uninterrupted = merge_journals(journal_files(tmp_path / "uninterrupted"))
    for count in (2, 4):  # inside the first batch; inside the second, the first one settled
        out = tmp_path / f"killed-at-{count}"
        with pytest.raises(Killed):
            run(out, f"kill@settled:{count}")
        assert len(read_journal(out / "journal.rank0.jsonl")) == count
        run(out)
        # on the CPU the prompts settled before the kill come out of their batch's second sampling exactly again
        assert "got other replies when their batch was sampled again" not in capsys.readouterr().out
        assert merge_journals(journal_files(out)) == uninterrupted  # every prompt's rounds, and so its pair
        assert (out / "preferences.jsonl").read_text() == (tmp_path / "uninterrupted" / "preferences.jsonl").read_text()


def test_a_different_config_on_an_existing_run_is_refused_with_the_differing_keys(finished_run, demo_world):
    args = run_script(demo_world, finished_run.out, extra=["n_candidates=3", "max_retries=2"])
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "max_retries:" in result.stderr
    assert "n_candidates" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- bad input, refused before generation

def check_refused(demo_world, output_dir, extra, message):
    from emotion_dpo.generate import generate

    cfg = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, output_dir, extra=extra))
    with pytest.raises(PipelineError, match=message):
        generate(cfg)


def test_missing_dataset_column_is_refused(demo_world, tmp_path):
    data = tmp_path / "dialogues.jsonl"
    data.write_text(json.dumps({"turns": []}) + "\n")
    check_refused(demo_world, tmp_path / "out", [f"dataset={data}"], "missing column 'prompt'")


def test_unknown_emotion_label_is_refused(demo_world, tmp_path):
    data = tmp_path / "dialogues.jsonl"
    turns = [{"role": "user", "content": {"emotion": "joy", "dialog": "hi ."}},
             {"role": "assistant", "content": {"emotion": "neutral", "dialog": "hello ."}}]
    data.write_text(json.dumps({"prompt": turns}) + "\n")
    check_refused(demo_world, tmp_path / "out", [f"dataset={data}"], "row 0, turn 0: unknown emotion 'joy'")


def test_a_classifier_without_the_expected_labels_is_refused(demo_world, tmp_path):
    # The gibberish detector used as the emotion classifier: no emotion labels.
    check_refused(demo_world, tmp_path / "out", [f"emotion_classifier={demo_world / 'gibberish_detector'}"],
                  "the emotion classifier has 4 outputs")


@pytest.mark.parametrize("override, message", [
    # GenerationConfig.validate() passes these; generate's logits processors refuse them after the models load
    ("generation.temperature=-1.0", "key generation.temperature: expected a value > 0, got -1.0"),
    ("generation.repetition_penalty=0", "key generation.repetition_penalty: expected a value > 0, got 0"),
    ('generation.top_k="five"', 'key generation.top_k: expected an integer, got "five"'),
    ('generation.top_p="x"', 'key generation.top_p: expected a number, got "x"'),
    # data_process_dpo.py (hermeschen1116/emotion-chat-bot 1228505) passes "do_sample": "False", a truthy string
    ('generation.do_sample="False"', 'key generation.do_sample: expected true or false, got "False"'),
])
def test_a_bad_sampling_value_is_refused_as_the_config_loads(override, message):
    with pytest.raises(PipelineError, match=message):
        load_config(GenerateConfig, DEMO_CONFIG, [override])


def test_whole_numbers_for_float_sampling_settings_are_taken_as_floats():
    from emotion_dpo.generation import checked_generation_config

    config = checked_generation_config({"do_sample": True, "temperature": 2, "top_p": 1, "max_new_tokens": 4}, "x")
    assert (config.temperature, config.top_p) == (2.0, 1.0)  # generate's TemperatureLogitsWarper refuses int 2
    assert type(config.temperature) is float and type(config.top_p) is float


def test_a_foreign_non_empty_output_folder_is_refused(demo_world, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    check_refused(demo_world, tmp_path / "out", [], "output_dir is not empty")
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_a_refused_start_leaves_no_folder_that_blocks_the_corrected_run(demo_world, tmp_path):
    # the dataset path mistyped: refused before output_dir is written
    check_refused(demo_world, tmp_path / "out", [f"dataset={tmp_path / 'nope.jsonl'}"], "not found")
    assert not (tmp_path / "out").exists()


def test_a_start_that_settled_no_prompt_does_not_block_another_config(demo_world, tmp_path):
    from emotion_dpo.generate import prepare_output_dir

    out = tmp_path / "out"
    failed_start = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, out, extra=["n_candidates=3"]))
    prepare_output_dir(failed_start, fresh=False)  # what a start writes before its models load (and fail to)
    corrected = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, out))
    prepare_output_dir(corrected, fresh=False)
    assert json.loads((out / "config.json").read_text())["n_candidates"] == corrected.n_candidates


def test_an_adapter_folder_that_does_not_exist_is_refused_before_anything_is_written(demo_world, tmp_path):
    check_refused(demo_world, tmp_path / "out", [f"adapter={tmp_path / 'sft'}"], "key adapter: adapter folder")
    assert not (tmp_path / "out").exists()


# CI runs as root, who can write into any folder; a path under a plain file is unwritable for root too.
def test_an_output_path_under_a_file_is_refused(demo_world, tmp_path):
    (tmp_path / "file").write_text("")
    check_refused(demo_world, tmp_path / "file" / "out", [], "not writable")


# ---------------------------------------------------------------- several GPUs: the split and the merge

def test_shards_partition_the_prompts():
    prompts = list(range(11))
    shards = [shard(prompts, rank, 3) for rank in range(3)]
    assert sorted(p for s in shards for p in s) == prompts


def test_merge_of_rank_journals_has_no_loss_or_duplicates(tmp_path, settled_record):
    for rank, indices in enumerate([[0, 2, 4], [1, 3]]):
        with open(tmp_path / f"journal.rank{rank}.jsonl", "w") as f:
            f.writelines(json.dumps(settled_record(i)) + "\n" for i in indices)
    assert [r["index"] for r in merge_journals(journal_files(tmp_path))] == [0, 1, 2, 3, 4]
    with open(tmp_path / "journal.rank1.jsonl", "a") as f:
        f.write(json.dumps(settled_record(2, chosen="another reply .")) + "\n")
    with pytest.raises(PipelineError, match="prompt 2 is settled twice with different results"):
        merge_journals(journal_files(tmp_path))


def test_a_torn_last_line_is_not_a_settled_prompt(tmp_path, settled_record):
    from emotion_dpo.journal import Journal

    path = tmp_path / "journal.rank0.jsonl"
    path.write_text(json.dumps(settled_record(0)) + "\n" + json.dumps(settled_record(1))[:40])
    assert [r["index"] for r in read_journal(path)] == [0]
    journal = Journal(path)
    journal.append(settled_record(1))
    journal.close()
    assert [r["index"] for r in read_journal(path)] == [0, 1]


# ---------------------------------------------------------------- the 4-bit loaders

@pytest.mark.parametrize("use_unsloth", [False, True])
def test_the_4bit_generator_paths_run_end_to_end(demo_world, tmp_path, use_unsloth):
    """bitsandbytes NF4, and unsloth's FastLanguageModel (which runs on the CPU too), both 4-bit."""
    out = tmp_path / "four_bit"
    extra = ["load_in_4bit=true", f"use_unsloth={'true' if use_unsloth else 'false'}"]
    result = subprocess.run(run_script(demo_world, out, num_prompts=6, extra=extra), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("Unsloth" in result.stdout + result.stderr) == use_unsloth
    assert len(merge_journals(journal_files(out))) == 6
    assert (out / "dataset").exists()


def test_batched_classification_returns_what_the_pipeline_returns(demo_world):
    from emotion_dpo.template import load_chat_format
    from emotion_dpo.generation import Scorer
    from emotion_dpo.models import load_tokenizer

    cfg = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, "unused", extra=["classifier_batch_size=4"]))
    scorer = Scorer(cfg, load_tokenizer(cfg.base_model, cfg.adapter, load_chat_format(cfg.chat_template)))
    texts = ["i am so happy !", "ugh , that is gross .", "wow wow wow", "qx zz", "", "i am terrified of the exam ."]
    for classifier in (scorer.emotion, scorer.gibberish):
        expected = classifier(texts, truncation=True)
        got = scorer.classify(classifier, texts)
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], abs=1e-5)


# ---------------------------------------------------------------- the shared prefill

SAME_REPLIES_SCRIPT = """
import json, sys
import torch
from transformers import GenerationConfig
from emotion_dpo import generation
from emotion_dpo.config import GenerateConfig, load_config
from emotion_dpo.models import load_generator
from emotion_dpo.prompts import load_prompts

cfg = load_config(GenerateConfig, sys.argv[1], sys.argv[2:])
model, tokenizer = load_generator(cfg)
contexts = [p.ids for p in load_prompts(cfg)[1][:8]]
settings = GenerationConfig(**cfg.generation)
ids = tokenizer.pad({"input_ids": contexts}, return_tensors="pt", padding=True)
shared = (generation.shares_prefill(model, settings, 6, ids["input_ids"].shape[1])
          and generation.prefill_cache(model, ids["input_ids"], ids["attention_mask"], 6) is not None)
torch.manual_seed(7)
with_prefill = generation.generate_candidates(model, tokenizer, contexts, 6, settings)
generation.prefill_cache = lambda *args: None  # the plain call: num_return_sequences repeats each prompt
torch.manual_seed(7)
plain = generation.generate_candidates(model, tokenizer, contexts, 6, settings)
print(json.dumps({"shared": shared, "with_prefill": with_prefill, "plain": plain}))
"""


@pytest.mark.parametrize("loading", ["full precision", "bitsandbytes 4-bit", "unsloth 4-bit"])
def test_the_shared_prefill_samples_the_replies_the_plain_generate_call_samples(demo_world, tmp_path, loading):
    """Each prompt is prefilled once and its KV cache repeated for the N candidates; from the same seed the
    replies are those `generate(num_return_sequences=N)` samples. Own process: importing unsloth patches."""
    extra = {"full precision": [], "bitsandbytes 4-bit": ["load_in_4bit=true", "use_unsloth=false"],
             "unsloth 4-bit": ["load_in_4bit=true", "use_unsloth=true"]}[loading]
    result = subprocess.run([sys.executable, "-c", SAME_REPLIES_SCRIPT, str(DEMO_CONFIG),
                             *demo_overrides(demo_world, tmp_path, extra=extra)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["shared"], "the model should have handed back a full cache to share"
    assert len(got["plain"]) == 8 and all(len(group) == 6 for group in got["plain"])
    assert got["with_prefill"] == got["plain"]
    assert len({text for group in got["plain"] for text, _ in group}) > 8  # sampled, not one reply repeated


def test_the_shared_prefill_is_skipped_where_it_would_not_pay_or_is_unchecked(demo_world, tmp_path):
    from transformers import GenerationConfig

    from emotion_dpo.generation import shares_prefill
    from emotion_dpo.models import load_generator

    cfg = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, tmp_path))
    model, _ = load_generator(cfg)
    sampling = GenerationConfig(**cfg.generation)
    assert shares_prefill(model, sampling, n_candidates=6, prompt_length=40)
    assert not shares_prefill(model, sampling, n_candidates=1, prompt_length=40)  # nothing to share
    assert not shares_prefill(model, sampling, n_candidates=6, prompt_length=1)  # no prompt token to prefill
    static = GenerationConfig(**cfg.generation, cache_implementation="static")
    assert not shares_prefill(model, static, n_candidates=6, prompt_length=40)  # the user asked for another cache
    beams = GenerationConfig(**{**cfg.generation, "do_sample": False}, num_beams=6)
    assert not shares_prefill(model, beams, n_candidates=6, prompt_length=40)  # beam search expands the inputs
    greedy = GenerationConfig(**{**cfg.generation, "do_sample": False})
    assert not shares_prefill(model, greedy, n_candidates=6, prompt_length=40)  # would give 6 copies of one reply
    chunked = GenerationConfig(**cfg.generation, prefill_chunk_size=16)
    assert not shares_prefill(model, chunked, n_candidates=6, prompt_length=40)  # re-prefills from position 0
    model.unsloth_cuda_decode = True  # unsloth on CUDA hands back no cache to share (bench/gpu_unsloth.sh)
    assert not shares_prefill(model, sampling, n_candidates=6, prompt_length=40)


def test_out_of_memory_halves_the_batch_and_every_prompt_still_gets_its_replies(monkeypatch):
    from emotion_dpo import generation

    calls = []

    def generate_or_run_out(model, tokenizer, contexts, n, settings):
        calls.append(len(contexts))
        if len(contexts) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [[f"{c} reply {i}" for i in range(n)] for c in contexts]

    class EchoScorer:
        def score(self, replies, targets):
            return list(zip(replies, targets))

    monkeypatch.setattr(generation, "generate_candidates", generate_or_run_out)
    prompts = [SimpleNamespace(ids=f"p{i}", target_emotion="joy") for i in range(8)]
    sampler = generation.CandidateSampler(None, None, EchoScorer(), 3, None, batch_prompts=8)
    rounds = sampler.sample(prompts)
    assert [group[0][0] for group in rounds] == [f"p{i} reply 0" for i in range(8)]  # all, in order
    assert all(len(group) == 3 for group in rounds)
    assert calls[:2] == [8, 4] and sampler.batch_prompts == 2
    monkeypatch.setattr(generation, "generate_candidates",
                        lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
    with pytest.raises(PipelineError, match="out of GPU memory generating 3 replies for a single prompt"):
        sampler.sample(prompts[:1])


def test_out_of_memory_while_classifying_halves_the_classifier_batch_and_every_reply_is_scored(monkeypatch):
    from emotion_dpo import generation

    calls = []

    def classify_or_run_out(self, classifier, texts):
        calls.append(len(texts))
        if len(texts) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return [{"label": classifier, "score": float(t)} for t in texts]

    monkeypatch.setattr(generation.Scorer, "classify_batch", classify_or_run_out)
    scorer = object.__new__(generation.Scorer)  # no classifiers loaded: classify_batch stands in for them
    scorer.batch_size = 8
    texts = [str(i) for i in range(7)]
    assert scorer.classify("emotion", texts) == [{"label": "emotion", "score": float(i)} for i in range(7)]
    assert calls[:3] == [7, 4, 2] and scorer.batch_size == 2
    scorer.batch_size = 1
    monkeypatch.setattr(generation.Scorer, "classify_batch",
                        lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
    with pytest.raises(PipelineError, match="out of GPU memory classifying a single reply"):
        scorer.classify("emotion", texts)
