"""Selection rules, chosen filters and the retry limit, on hand-made scored replies (no model)."""

import json
from types import SimpleNamespace

import pytest

from emotion_dpo.journal import Journal, read_journal
from emotion_dpo.generate import sample_pool
from emotion_dpo.dataset import preference_row, reselect
from emotion_dpo.prompts import Prompt
from emotion_dpo.selection import gives_up, is_cut_off, pick_pair, rescore, round_failure, score_reply

REWARDS = SimpleNamespace(reward_weights=[0.4, 0.25, 0.35], reward_bias=0.001, length_min=5, length_max=20)
SELECTION = SimpleNamespace(target_score_range=5.0, min_chosen_score=8.0, min_chosen_gibberish_confidence=0.8,
                            chosen_endings=["!", ".", "?"], max_retries=3)


def reply(text="that is so wonderful , i love it !", emotion="happiness", conf=0.9, gib="clean", gconf=0.95):
    return score_reply(text, emotion, conf, gib, gconf, len(text), "happiness", REWARDS, [len(text), 9])


GOOD = reply()  # 34 characters, happy, clean: total 0.4*9 + 0.25*|5.8+0.7|*10 + 0.35*9.5 + 0.001
SHORT = reply("ok .", emotion="neutral")  # 4 characters: tiny length reward, no emotion reward


def test_rescoring_keeps_the_ids_and_whether_generation_stopped_on_eos():
    cut = score_reply("ok .", "neutral", 0.9, "clean", 0.95, 4, "happiness", REWARDS, [13, 14], False)
    again = rescore(cut, "happiness", REWARDS)
    assert (again.token_ids, again.ended_on_eos) == ([13, 14], False)


def test_the_good_reply_scores_as_computed_by_hand():
    assert GOOD.total == pytest.approx(3.6 + 16.25 + 3.325 + 0.001)


def test_chosen_is_the_highest_total_and_rejected_the_lowest():
    assert pick_pair([SHORT, GOOD, reply(conf=0.5)]) == (1, 0)


def test_ties_go_to_the_first():
    assert pick_pair([GOOD, GOOD, SHORT, SHORT]) == (0, 2)


def test_a_good_round_passes():
    assert round_failure([GOOD, SHORT], "happiness", SELECTION) is None


def test_round_fails_when_best_and_worst_are_too_close():
    assert round_failure([GOOD, reply(conf=0.85)], "happiness", SELECTION) == "score range below target_score_range"


def test_round_fails_when_the_best_is_below_min_chosen_score():
    low = SimpleNamespace(**{**vars(SELECTION), "min_chosen_score": 30.0})
    assert round_failure([GOOD, SHORT], "happiness", low) == "best score below min_chosen_score"


@pytest.mark.parametrize(
    "chosen, reason",
    [
        (reply(emotion="sadness"), "chosen emotion is not the target"),
        (reply(gib="mild gibberish"), "chosen is not clean"),
        (reply(gconf=0.79), "chosen clean confidence too low"),
        (reply("that is so wonderful , i love it and"), "chosen is cut off"),
    ],
)
def test_each_chosen_filter_fails_the_round(chosen, reason):
    assert round_failure([chosen, SHORT], "happiness", SELECTION) == reason


@pytest.mark.parametrize("ending", ["!", ".", "?", "!  "])
def test_chosen_may_end_in_any_configured_ending_after_stripping_spaces(ending):
    assert round_failure([reply("that is so wonderful , i love it " + ending), SHORT], "happiness", SELECTION) is None


class ScriptedSampler:
    """Stands in for generate+score: hands out prepared rounds in order, one per prompt per call."""

    def __init__(self, rounds):
        self.rounds, self.batch_prompts, self.calls = list(rounds), 4, 0
        self.tokenizer = SimpleNamespace(eos_token_id=2)

    def sample(self, prompts):
        self.calls += 1
        return [self.rounds.pop(0) for _ in prompts]


def run_pool(tmp_path, sampler, prompts, batches=None, name="journal.rank0.jsonl"):
    journal = Journal(tmp_path / name)
    progress = SimpleNamespace(n=0, update=lambda k: None, set_postfix=lambda **k: None)
    cfg = SimpleNamespace(**vars(SELECTION), seed=100)
    sample_pool(cfg, batches or [(0, prompts)], sampler, journal, SimpleNamespace(log=lambda f: None), progress, {})
    journal.close()
    return read_journal(tmp_path / name)


def prompt(index=0):
    return Prompt(index, index, "happiness", [], f"<s> prompt {index}", [1, 50 + index])


class SeedRecordingSampler(ScriptedSampler):
    """Prompt 1 and prompt 6 pass on their second round, every other prompt on its first; records each call's
    torch seed and prompts."""

    def __init__(self):
        super().__init__([])
        self.batch_prompts, self.seen, self.log = 2, set(), []

    def sample(self, prompts):
        import torch

        self.log.append((torch.initial_seed(), [p.index for p in prompts]))
        rounds = [[reply(emotion="sadness"), SHORT] if p.index in (1, 6) and p.index not in self.seen else [SHORT, GOOD]
                  for p in prompts]
        self.seen |= {p.index for p in prompts}
        return rounds


def test_a_batch_and_its_retries_are_sampled_from_seed_plus_its_number_by_whichever_process_takes_it(tmp_path):
    """The same rounds from the same seeds with 1 process or 2 (issue 24): batches of 2 consecutive prompts, batch b
    from seed 100 + b, a retry in its own batch's stream, the batches dealt to the processes in turn."""
    from emotion_dpo.distributed import prompt_batches, shard

    prompts = [prompt(i) for i in range(7)]
    batches = prompt_batches(prompts, 2)
    assert [(n, [p.index for p in b]) for n, b in batches] == [(0, [0, 1]), (1, [2, 3]), (2, [4, 5]), (3, [6])]
    calls = {}
    for processes in (1, 2):
        calls[processes] = []
        for rank in range(processes):
            sampler = SeedRecordingSampler()
            run_pool(tmp_path, sampler, None, shard(batches, rank, processes), f"journal.{processes}.{rank}.jsonl")
            calls[processes] += sampler.log
    assert calls[1] == [(100, [0, 1]), (100, [1]), (101, [2, 3]), (102, [4, 5]), (103, [6]), (103, [6])]
    assert sorted(calls[2]) == sorted(calls[1])
    assert [call[0] for call in calls[2][:3]] == [100, 100, 102]  # process 0: batches 0 and 2


def test_a_prompt_is_given_up_after_exactly_one_plus_max_retries_rounds(tmp_path):
    failing = [reply(emotion="sadness"), SHORT]
    (record,) = run_pool(tmp_path, ScriptedSampler([failing] * 10), [prompt()])
    assert record["status"] == "failed"
    assert len(record["rounds"]) == 1 + SELECTION.max_retries
    assert record["reason"] == "chosen emotion is not the target"


def test_a_retried_prompt_is_accepted_with_the_round_that_passed(tmp_path):
    failing, passing = [reply(emotion="sadness"), SHORT], [SHORT, GOOD]
    (record,) = run_pool(tmp_path, ScriptedSampler([failing, failing, passing]), [prompt()])
    assert record["status"] == "accepted" and len(record["rounds"]) == 3
    row = preference_row(record)
    assert (row["chosen"], row["rejected"]) == (GOOD.text, SHORT.text)
    assert row["chosen_score"] == pytest.approx(GOOD.total)
    # the ids generation used: the prompt's context, each reply's generated ids and then EOS
    assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == ([1, 50], [34, 9, 2], [4, 9, 2])


def test_every_round_and_candidate_is_journaled_with_its_components(tmp_path):
    failing, passing = [reply(emotion="sadness"), SHORT], [SHORT, GOOD]
    (record,) = run_pool(tmp_path, ScriptedSampler([failing, passing]), [prompt()])
    stored = record["rounds"][0][0]
    assert set(stored) >= {"text", "emotion_label", "emotion_confidence", "gibberish_label",
                           "gibberish_confidence", "length", "emotion_reward", "length_reward",
                           "gibberish_reward", "total", "token_ids"}
    assert json.loads(json.dumps(record)) == record


def test_reselect_with_the_same_settings_reproduces_the_record(tmp_path):
    failing, passing = [reply(emotion="sadness"), SHORT], [SHORT, GOOD]
    (record,) = run_pool(tmp_path, ScriptedSampler([failing, passing]), [prompt()])
    assert reselect(record, REWARDS, SELECTION) == record


def test_reselect_with_other_weights_changes_the_pair_as_predicted(tmp_path):
    # The sad reply is 39 characters long, so the length reward makes it chosen, and the round fails.
    # Emotion only: the sad reply (0 emotion reward) can no longer be chosen over the happy one.
    rounds = [[reply(emotion="sadness", text="that is so wonderful , i love it , ok !"), reply(conf=0.6), SHORT]]
    (record,) = run_pool(tmp_path, ScriptedSampler(rounds + [rounds[0]] * 3), [prompt()])
    assert record["status"] == "failed"  # chosen was the sad, longer one
    emotion_only = SimpleNamespace(**{**vars(REWARDS), "reward_weights": [1.0, 0.0, 0.0]})
    lenient = SimpleNamespace(**{**vars(SELECTION), "min_chosen_score": 5.0})
    again = reselect(record, emotion_only, lenient)
    assert again["status"] == "accepted" and len(again["rounds"]) == 1
    row = preference_row(again)
    assert row["chosen_score"] == pytest.approx(6.001) and row["rejected"] == rounds[0][0].text  # first of the tied lowest


# ---------------------------------------------------------------- boundaries and order, worked out by hand
# GOOD totals 23.176 (above); SHORT ("ok .", 4 characters, neutral): 0 + 0.25 * (-0.2 * 0.0001) + 0.35 * 9.5 + 0.001
# = 3.325995; the gap GOOD - SHORT is 19.850005.

def at(**settings):
    return SimpleNamespace(**{**vars(SELECTION), **settings})


def test_a_gap_exactly_at_target_score_range_passes():
    gap = GOOD.total - SHORT.total
    assert round_failure([GOOD, SHORT], "happiness", at(target_score_range=gap)) is None
    assert round_failure([GOOD, SHORT], "happiness", at(target_score_range=gap + 1e-9)) == \
        "score range below target_score_range"


def test_a_best_score_exactly_at_min_chosen_score_passes():
    assert round_failure([GOOD, SHORT], "happiness", at(min_chosen_score=GOOD.total)) is None
    assert round_failure([GOOD, SHORT], "happiness", at(min_chosen_score=GOOD.total + 1e-9)) == \
        "best score below min_chosen_score"


def test_a_clean_confidence_exactly_at_the_minimum_passes():
    assert round_failure([reply(gconf=0.8), SHORT], "happiness", SELECTION) is None


def test_the_round_reports_the_first_failing_check_in_the_references_order():
    # score range, then best score, then emotion, clean label, clean confidence, ending
    everything_wrong = reply("so sad and", emotion="sadness", gib="noise", gconf=0.1)
    strict = at(target_score_range=100.0, min_chosen_score=100.0)
    assert round_failure([everything_wrong, SHORT], "happiness", strict) == "score range below target_score_range"
    assert round_failure([reply(emotion="sadness"), SHORT], "happiness", at(min_chosen_score=100.0)) == \
        "best score below min_chosen_score"  # before the chosen filters, though the chosen is not happy either
    assert round_failure([reply(emotion="sadness", gib="noise", gconf=0.1), SHORT], "happiness",
                         at(target_score_range=0.0, min_chosen_score=0.0)) == "chosen emotion is not the target"
    assert round_failure([reply(gib="noise", gconf=0.1), SHORT], "happiness", at(target_score_range=0.0,
                                                                                 min_chosen_score=0.0)) == \
        "chosen is not clean"


def test_labels_compare_case_insensitively_in_the_chosen_filters():
    assert round_failure([reply(emotion="Happiness", gib="Clean"), SHORT], "happiness", SELECTION) is None


def test_the_rejected_reply_is_the_first_of_the_lowest_anywhere_in_the_round():
    assert pick_pair([GOOD, reply(conf=0.5), SHORT, SHORT, reply(conf=0.6)]) == (0, 2)
    assert pick_pair([SHORT, GOOD, GOOD]) == (1, 0)


def test_the_gap_is_measured_to_the_lowest_reply_wherever_it_stands():
    middle = reply(conf=0.85)  # 0.2 below GOOD: too close to be the rejected one
    assert round_failure([middle, SHORT, GOOD], "happiness", SELECTION) is None


# chosen_endings are characters, as the reference compares them: hermeschen1116/emotion-chat-bot@1228505,
# src/scripts/response_generator/data_process_dpo.py: `chosen.strip(" ")[-1:] not in ["!", ".", "?"]`

@pytest.mark.parametrize("text, cut_off", [
    ("that is great !", False),
    ("that is great !  ", False),  # spaces around are not the ending
    ("that is great", True),
    ("that is great !\n", True),  # only spaces are stripped, as in the reference
    ("", True),  # an empty reply ends in nothing
])
def test_the_ending_is_the_last_character_once_spaces_are_stripped(text, cut_off):
    assert is_cut_off(text, ["!", ".", "?"]) is cut_off
    chosen = score_reply(text, "happiness", 0.9, "clean", 0.95, 15, "happiness", REWARDS, None)
    assert (round_failure([chosen, SHORT], "happiness", SELECTION) == "chosen is cut off") is cut_off


def test_a_prompt_is_given_up_once_one_plus_max_retries_rounds_failed():
    assert [gives_up(done, 2) for done in (1, 2, 3, 4)] == [False, False, True, True]
    assert gives_up(1, 0)


def test_rescoring_keeps_the_replys_token_ids():
    heavier = SimpleNamespace(**{**vars(REWARDS), "reward_weights": [1.0, 0.0, 0.0]})
    again = rescore(GOOD, "happiness", heavier)
    assert again.token_ids == [34, 9] and again.total == pytest.approx(9.001)
