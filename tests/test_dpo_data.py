"""fine_tune_dpo's data before TRL sees it: the held-out split and the token ids generate_preferences stored, on
hand-made pairs (a tokenizer from the demo world, no model)."""

import json
import re
from pathlib import Path

import datasets
import pytest

from emotion_dpo.config import TrainConfig, load_config
from emotion_dpo.dpo_data import load_preferences, read_preferences, token_id_rows
from emotion_dpo.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "<s>[INST] [EMOTION] neutral [/EMOTION] hi {} . [/INST] [EMOTION] happiness [/EMOTION] "


def pairs_file(tmp_path, n):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": PROMPT.format(i), "chosen": "great !", "rejected": "no"}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.parametrize("name", ["pairs.json", "pairs.txt"])
def test_a_preference_file_of_any_suffix_is_checked_as_json_lines(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(json.dumps({"prompt": PROMPT.format(0), "chosen": "great !", "rejected": "no"}).encode() + b"\n"
                     + '{"prompt": "p", "chosen": "caf\xe9", "rejected": "no"}\n'.encode("latin-1"))
    with pytest.raises(PipelineError, match=re.escape(f"{path}:2: not UTF-8 (byte 0xe9 at column 31); save the "
                                                      "preference data file as UTF-8")):
        read_preferences(str(path), "train")


def config(tmp_path, data, fraction):
    return load_config(TrainConfig, ROOT / "args/demo/dpo_arg.json",
                       [f"dataset={data}", f"output_dir={tmp_path / 'dpo'}", f"eval_fraction={fraction}"])


def test_ten_pairs_are_split_by_eval_fraction(tmp_path):
    train, held_out = load_preferences(config(tmp_path, pairs_file(tmp_path, 10), 0.2))
    assert (len(train), len(held_out)) == (8, 2)


def test_fewer_than_ten_pairs_train_on_all_and_say_that_none_is_held_out(tmp_path, capsys):
    data = pairs_file(tmp_path, 9)
    train, held_out = load_preferences(config(tmp_path, data, 0.2))
    assert (len(train), held_out) == (9, None)
    assert (f"{data}: 9 pairs, fewer than the 10 a held-out set needs: eval_fraction 0.2 is not applied; training on "
            "all of them, with no held-out loss") in capsys.readouterr().out
    load_preferences(config(tmp_path, data, 0.0))  # no held-out set asked for: nothing to say
    assert "held-out" not in capsys.readouterr().out


@pytest.fixture
def tokenizer(demo_tokenizer):
    return demo_tokenizer


def test_every_rows_prompt_ids_are_checked_against_the_tokenizer(tokenizer):
    prompts = [PROMPT.format(i) for i in range(3)]
    ids = [tokenizer(p[:-1], add_special_tokens=False)["input_ids"] for p in prompts]  # without the final space
    rows = {"prompt": prompts, "chosen": ["a !"] * 3, "rejected": ["b"] * 3, "prompt_ids": ids,
            "chosen_ids": [[5, 2]] * 3, "rejected_ids": [[6, 2]] * 3}
    assert token_id_rows(datasets.Dataset.from_dict(rows), tokenizer, "train")["prompt_ids"] == ids
    wrong = {**rows, "prompt_ids": [ids[0], ids[1][:-1], ids[2]]}  # row 1 generated with another tokenizer
    with pytest.raises(PipelineError, match=r"train dataset: the prompt_ids of 1 of 3 rows \(first: row 1\) are not "
                                            "their prompt's tokens under this adapter's tokenizer"):
        token_id_rows(datasets.Dataset.from_dict(wrong), tokenizer, "train")


def test_earlier_datasets_are_trained_on_with_the_dataset_and_a_pair_in_both_counts_once(tmp_path):
    first = pairs_file(tmp_path, 6)  # pairs 0-5
    earlier = tmp_path / "earlier.jsonl"
    # pairs 4-9 of an earlier iteration: 4 and 5 repeat the dataset's
    earlier.write_text("".join(json.dumps({"prompt": PROMPT.format(i), "chosen": "great !", "rejected": "no"}) + "\n"
                               for i in range(4, 10)))
    cfg = load_config(TrainConfig, ROOT / "args/demo/dpo_arg.json",
                      [f"dataset={first}", f"earlier_datasets={json.dumps([str(earlier)])}",
                       f"output_dir={tmp_path / 'dpo'}", "eval_fraction=0"])
    train, _ = load_preferences(cfg)
    assert sorted(train["prompt"]) == sorted(PROMPT.format(i) for i in range(10))  # 6 + 6 - 2 repeats


def test_an_earlier_dataset_with_other_columns_is_refused_naming_both(tmp_path):
    first = pairs_file(tmp_path, 3)
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text(json.dumps({"prompt": PROMPT.format(9), "chosen": "a !", "rejected": "b", "prompt_ids": [1],
                                   "chosen_ids": [2], "rejected_ids": [3]}) + "\n")
    cfg = load_config(TrainConfig, ROOT / "args/demo/dpo_arg.json",
                      [f"dataset={first}", f"earlier_datasets={json.dumps([str(earlier)])}",
                       f"output_dir={tmp_path / 'dpo'}", "eval_fraction=0"])
    with pytest.raises(PipelineError, match=re.escape(
            f"{earlier}: columns chosen, chosen_ids, prompt, prompt_ids, rejected, rejected_ids differ from {first}'s "
            "(chosen, prompt, rejected): the datasets are trained on together")):
        load_preferences(cfg)
