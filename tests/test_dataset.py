"""Settled prompts -> preference rows (docs/data.md, "Outputs of generate_preferences"), on hand-made journal records:
the token ids DPO trains on, one schema for the whole dataset, the failure rows, and --reselect's round limit."""

from types import SimpleNamespace

import datasets
import pytest

from emotion_dpo.dataset import preference_row, reselect, settle, write_dataset
from emotion_dpo.prompts import Prompt
from emotion_dpo.selection import score_reply

REWARDS = SimpleNamespace(reward_weights=[0.4, 0.25, 0.35], reward_bias=0.001, length_min=5, length_max=20)
SELECTION = SimpleNamespace(target_score_range=5.0, min_chosen_score=8.0, min_chosen_gibberish_confidence=0.8,
                            chosen_endings=["!", ".", "?"], max_retries=3)
EOS = 2


def reply(text, emotion="happiness", ids=None):
    return score_reply(text, emotion, 0.9, "clean", 0.95, len(text), "happiness", REWARDS, ids)


# "so lovely , thanks !" (20 characters, happy): a = 3, b = 0: length |3+0|*10 = 30; 0.4*9 + 0.25*30 + 0.35*9.5 + 0.001 = 14.426
GOOD = reply("so lovely , thanks !", ids=[11, 12])
# "ok ." (4 characters, neutral): 0 + 0.25*(-0.2*0.0001) + 3.325 + 0.001 = 3.325995
SHORT = reply("ok .", emotion="neutral", ids=[13])
SAD = reply("so lovely , thanks !", emotion="sadness", ids=[14])  # the chosen filter fails: not happiness
PROMPT = Prompt(7, 3, "happiness", [], "<s>[INST] hi [/INST]", [1, 5, 6])


def test_a_passing_round_settles_the_prompt_with_its_pair_and_the_eos_id():
    record = settle(PROMPT, [[SHORT, GOOD]], SELECTION, final=False, eos_token_id=EOS)
    assert (record["status"], record["reason"], record["chosen_at"], record["rejected_at"]) == ("accepted", None, 1, 0)
    assert (record["index"], record["dialogue"], record["prompt_ids"], record["eos_token_id"]) == (7, 3, [1, 5, 6], 2)


def test_a_failing_round_settles_nothing_unless_it_is_the_last_one_allowed():
    assert settle(PROMPT, [[SAD, SHORT]], SELECTION, final=False, eos_token_id=EOS) is None
    given_up = settle(PROMPT, [[SAD, SHORT]], SELECTION, final=True, eos_token_id=EOS)
    assert (given_up["status"], given_up["reason"]) == ("failed", "chosen emotion is not the target")
    assert (given_up["chosen_at"], given_up["rejected_at"]) == (None, None)


def accepted(*rounds, eos=EOS):
    return settle(PROMPT, list(rounds), SELECTION, final=False, eos_token_id=eos)


def test_a_row_holds_the_pair_its_ids_with_eos_and_each_reward_part():
    row = preference_row(accepted([SAD, SHORT], [SHORT, GOOD, SAD]))  # 2 rounds, 3 candidates in the last
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("<s>[INST] hi [/INST]", GOOD.text, SHORT.text)
    assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == ([1, 5, 6], [11, 12, 2], [13, 2])
    assert (row["rounds"], row["index"], row["target_emotion"]) == (2, 7, "happiness")
    assert (row["chosen_emotion_reward"], row["rejected_emotion_reward"]) == (pytest.approx(9.0), 0.0)
    assert row["chosen_length_reward"] == pytest.approx(30.0) and row["rejected_length_reward"] == pytest.approx(-0.00002)
    assert (row["chosen_gibberish_reward"], row["rejected_gibberish_reward"]) == (pytest.approx(9.5), pytest.approx(9.5))


def test_a_reply_cut_off_at_max_new_tokens_trains_without_eos_one_that_stopped_on_it_with_it():
    ended = score_reply(GOOD.text, "happiness", 0.9, "clean", 0.95, len(GOOD.text), "happiness", REWARDS, [11, 12], True)
    cut = score_reply("ok .", "neutral", 0.9, "clean", 0.95, 4, "happiness", REWARDS, [13], False)
    row = preference_row(accepted([cut, ended]))
    assert (row["chosen_ids"], row["rejected_ids"]) == ([11, 12, 2], [13])


def test_a_record_without_the_eos_id_gives_a_text_only_row():
    row = preference_row(accepted([SHORT, GOOD], eos=None))
    assert "prompt_ids" not in row and "chosen_ids" not in row


def test_a_dataset_mixing_rows_with_and_without_ids_is_written_as_text_only(tmp_path, capsys):
    records = [accepted([SHORT, GOOD]), {**accepted([SHORT, GOOD]), "index": 8, "eos_token_id": None}]
    assert write_dataset(records, tmp_path) == {"accepted": 2, "failed": 0}
    written = datasets.load_from_disk(str(tmp_path / "dataset"))
    assert not {"prompt_ids", "chosen_ids", "rejected_ids"} & set(written.column_names)
    assert "1 of 2 pairs come from journal lines without token ids" in capsys.readouterr().out


def test_failed_prompts_are_written_with_their_dialogue_reason_and_rounds(tmp_path):
    failed = settle(PROMPT, [[SAD, SHORT], [SAD, SHORT]], SELECTION, final=True, eos_token_id=EOS)
    write_dataset([failed], tmp_path)
    assert (tmp_path / "failed.jsonl").read_text() == \
        '{"index": 7, "dialogue": 3, "reason": "chosen emotion is not the target", "rounds": 2}\n'
    empty = datasets.load_from_disk(str(tmp_path / "dataset"))  # 0 rows, the full schema
    assert len(empty) == 0 and empty.features["target_emotion"].dtype == "string"
    assert empty.features["chosen_ids"] == datasets.List(datasets.Value("int64"))


def test_reselect_counts_only_the_first_one_plus_max_retries_rounds():
    record = accepted([SAD, SHORT], [SAD, SHORT], [SHORT, GOOD])  # accepted in round 3
    one_retry = SimpleNamespace(**{**vars(SELECTION), "max_retries": 1})
    again = reselect(record, REWARDS, one_retry)
    assert (again["status"], len(again["rounds"])) == ("failed", 2)
    two_retries = SimpleNamespace(**{**vars(SELECTION), "max_retries": 2})
    assert reselect(record, REWARDS, two_retries)["status"] == "accepted"


def test_reselect_stops_at_the_first_round_that_passes():
    record = {**accepted([SHORT, GOOD]), "rounds": [[r.to_dict() for r in (SHORT, GOOD)],
                                                    [r.to_dict() for r in (GOOD, SHORT)]]}
    again = reselect(record, REWARDS, SELECTION)
    assert (len(again["rounds"]), again["chosen_at"]) == (1, 1)


def test_reselect_measures_each_reply_again_when_told_how():
    record = accepted([SHORT, GOOD])
    again = reselect(record, REWARDS, SELECTION, length_of=lambda text: len(text.split()))
    # in words: "so lovely , thanks !" is 5 -> a = 0 -> 0 * 0.0001; "ok ." is 2 -> a = -0.6 -> -0.00006
    assert [r["length"] for r in again["rounds"][0]] == [2, 5]
    assert again["rounds"][0][1]["length_reward"] == 0.0
