"""Diversity-aware selection (docs/selection.md, "Diversity-aware selection") on hand-made candidates: every
expected pair, cap and share below is worked out by hand from the rules, never by calling the code under test.

Settings: the demo's (target_score_range 5, min_chosen_score 8, clean confidence >= 0.8, endings ! . ?) with the
reference's selection rule (no diversity key) unless a test says otherwise. Only the totals and the chosen filters matter to these rules, so each candidate is given its
total directly; every candidate is on target, clean and complete unless its text says otherwise ("no" has no
ending).
"""

import json
import random
import warnings
from pathlib import Path

import pytest

from emotion_dpo.config import GenerateConfig, load_config, save_config
from conftest import REFERENCE_SELECTION

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "args/demo/generate_preferences_arg.json"


def config(folder=Path("unused"), overrides=()) -> GenerateConfig:
    return load_config(GenerateConfig, DEMO_CONFIG, [f"output_dir={folder}", "wandb.mode=disabled", *REFERENCE_SELECTION,
                                                     *overrides])


def cand(text, total, emotion="happiness"):
    return {"text": text, "emotion_label": emotion, "emotion_confidence": 1.0, "gibberish_label": "clean",
            "gibberish_confidence": 1.0, "length": len(text), "emotion_reward": 10.0, "length_reward": 0.0,
            "gibberish_reward": 10.0, "total": total}


def record(index, rounds, status="accepted", reason=None, chosen_at=0, rejected_at=None, target="happiness"):
    rejected_at = len(rounds[-1]) - 1 if rejected_at is None else rejected_at
    return {"index": index, "dialogue": index, "prompt": f"<prompt {index}>", "target_emotion": target,
            "status": status, "reason": reason, "chosen_at": chosen_at if status == "accepted" else None,
            "rejected_at": rejected_at if status == "accepted" else None, "rounds": rounds}


def scored(round_):
    from emotion_dpo.selection import ScoredReply

    return [ScoredReply(**c) for c in round_]


class Prompt:
    def __init__(self, index, target="happiness"):
        self.index, self.dialogue, self.text, self.ids, self.target_emotion = index, index, f"<p{index}>", [1], target


# ------------------------------------------------------------------ the rules as numbers

def test_the_cap_is_share_times_prompts_rounded_down_never_below_its_minimum():
    from emotion_dpo.selection import text_cap

    assert text_cap(0.1, 25, 2) == 2   # 2.5 -> 2
    assert text_cap(0.1, 35, 2) == 3   # 3.5 -> 3
    assert text_cap(0.1, 5, 2) == 2    # 0.5 -> 0, raised to the minimum
    assert text_cap(0.4, 5, 1) == 2
    assert text_cap(None, 35, 2) == float("inf")


def test_the_flat_length_rule_holds_the_value_at_length_max_where_the_reference_has_its_cliff():
    from emotion_dpo.rewards import flat_length_reward, length_reward

    # length_min 5, length_max 20. At 39: a = 34/5 = 6.8, b = 19/20 = 0.95, |a + b| x 10 = 77.5 (reference);
    # at 40: |b| = 1, so b x 0.9 = 0.9: the cliff. Flat: the value at 20, a = 3, b = 0 -> 30, from 20 on.
    assert length_reward(39, 5, 20) == pytest.approx(77.5)
    assert length_reward(40, 5, 20) == pytest.approx(0.9)
    assert flat_length_reward(39, 5, 20) == pytest.approx(30.0)
    assert flat_length_reward(40, 5, 20) == pytest.approx(30.0)
    assert flat_length_reward(120, 5, 20) == pytest.approx(30.0)
    assert flat_length_reward(15, 5, 20) == pytest.approx(17.5)  # below length_max: the reference's (a 2, b -0.25)


def test_the_length_rule_key_scores_a_long_reply_without_the_cliff():
    from emotion_dpo.selection import rescore

    (long_reply,) = scored([{**cand("x" * 45 + " !", 0.0), "length": 47}])
    # 47 characters, weights [0.4, 0.25, 0.35], bias 0.001, emotion 10, clean 10: 4 + 3.5 + 0.001 = 7.501 plus
    # 0.25 x length: reference b = 27/20 = 1.35 -> 1.215 -> 7.80475; flat: 30 -> 15.001
    assert rescore(long_reply, "happiness", config()).total == pytest.approx(7.80475)
    assert rescore(long_reply, "happiness", config(overrides=["length_rule=flat_above_max"])).total == \
        pytest.approx(15.001)


# ------------------------------------------------------------------ a prompt's pool, at generate time

ROUND_ONE_TEXT = [cand("a lovely day !", 15.0), cand("meh .", 2.0), cand("a lovely day !", 14.0)]
# round 2's own gap is 12 - 7.5 = 4.5, under target_score_range 5: it fails on its own; "no" has no ending
ROUND_NEW_TEXT = [cand("so glad today !", 12.0), cand("no", 9.0), cand("nice .", 7.5)]


def test_a_prompt_is_sampled_again_until_its_rounds_hold_min_distinct_passing_texts():
    from emotion_dpo.dataset import settle

    cfg = config(overrides=["min_distinct_passing=2"])
    # round 1: both passing candidates (15, 14; gap to 2 >= 5) are one text: not enough
    assert settle(Prompt(0), [scored(ROUND_ONE_TEXT)], cfg, final=False, eos_token_id=2) is None
    # round 2 adds "so glad today !" (12 >= 8, 12 - 2 = 10 >= 5: the gap counts to the pool's lowest, round 1's 2)
    settled = settle(Prompt(0), [scored(ROUND_ONE_TEXT), scored(ROUND_NEW_TEXT)], cfg, final=False, eos_token_id=2)
    assert settled["status"] == "accepted"
    # the prompt's own best anywhere in its pool: round 0's 15; rejected: the pool's lowest, round 0's 2
    assert (settled["chosen_round"], settled["chosen_at"], settled["rejected_round"], settled["rejected_at"]) == \
        (0, 0, 0, 1)


def test_a_gap_of_exactly_target_score_range_to_the_pools_lowest_passes():
    from emotion_dpo.selection import passing_in_pool

    # lowest 3.0; 8.0 is exactly target_score_range 5 above it (and exactly min_chosen_score 8): it passes
    rounds = [scored([cand("just enough !", 8.0), cand("low .", 3.0)])]
    assert passing_in_pool(rounds, "happiness", config()) == [(0, 0)]
    rounds = [scored([cand("not enough !", 7.99), cand("low .", 3.0)])]
    assert passing_in_pool(rounds, "happiness", config()) == []


def test_a_prompts_rounds_are_enough_once_they_hold_exactly_min_distinct_passing_texts():
    from emotion_dpo.selection import pool_settles

    one_text, two_texts = [scored(ROUND_ONE_TEXT)], [scored(ROUND_ONE_TEXT), scored(ROUND_NEW_TEXT)]
    assert pool_settles(one_text, "happiness", config(overrides=["min_distinct_passing=1"]))
    assert not pool_settles(one_text, "happiness", config(overrides=["min_distinct_passing=2"]))
    assert pool_settles(two_texts, "happiness", config(overrides=["min_distinct_passing=2"]))  # exactly 2
    assert not pool_settles(two_texts, "happiness", config(overrides=["min_distinct_passing=3"]))


def test_the_reference_rule_takes_the_last_round_alone():
    from emotion_dpo.dataset import settle

    # the last round alone: chosen 12, rejected 7.5, gap 4.5 < 5: sampled again, whatever round 1 held
    assert settle(Prompt(0), [scored(ROUND_ONE_TEXT), scored(ROUND_NEW_TEXT)], config(), final=False,
                  eos_token_id=2) is None
    passing_last = [cand("so glad today !", 12.0), cand("nope .", 6.0)]
    settled = settle(Prompt(0), [scored(ROUND_ONE_TEXT), scored(passing_last)], config(), final=False, eos_token_id=2)
    # gap 6 >= 5: accepted, positions in the last round and no round keys
    assert (settled["chosen_at"], settled["rejected_at"]) == (0, 1)
    assert "chosen_round" not in settled


def test_a_prompt_given_up_keeps_what_passes_and_fails_only_when_nothing_does():
    from emotion_dpo.dataset import settle

    cfg = config(overrides=["min_distinct_passing=3"])
    given_up = settle(Prompt(0), [scored(ROUND_ONE_TEXT)], cfg, final=True, eos_token_id=2)
    assert given_up["status"] == "accepted"  # one passing text of the 3 asked for: the retries ran out
    # round 2 fails on its own (gap 4.5) but passes in the pool (12 - 2): accepted, though its last round failed
    pooled = settle(Prompt(0), [scored(ROUND_ONE_TEXT), scored(ROUND_NEW_TEXT)], cfg, final=True, eos_token_id=2)
    assert (pooled["status"], pooled["reason"]) == ("accepted", None)
    low = [cand("fine .", 7.0), cand("no .", 1.0)]  # 7 < min_chosen_score 8
    failed = settle(Prompt(0), [scored(low)], cfg, final=True, eos_token_id=2)
    assert (failed["status"], failed["reason"]) == ("failed", "best score below min_chosen_score")


# ------------------------------------------------------------------ the run's pairs, at finalize time

def five_prompts_with_a_stock_reply(only_stock_at=()):
    """Prompt i: the stock reply (15), its own reply "other i !" (12) unless i is in only_stock_at, and "no ." (1)."""
    return [record(i, [[cand("stock reply !", 15.0)] + ([] if i in only_stock_at else [cand(f"other {i} !", 12.0)])
                       + [cand("no .", 1.0)]]) for i in range(5)]


def chosen_texts(records):
    from emotion_dpo.dataset import picked

    return [picked(r)[0]["text"] if r["status"] == "accepted" else None for r in records]


def test_the_cap_counts_in_prompt_order_and_moves_later_prompts_to_their_next_passing_text():
    from emotion_dpo.dataset import choose_pairs

    cfg = config(overrides=["chosen_text_cap=0.4", "chosen_text_cap_min=1"])
    # 5 prompts with a pair -> cap int(0.4 x 5) = 2: prompts 0 and 1 take the stock reply, 2-4 their own
    records, report = choose_pairs(five_prompts_with_a_stock_reply(), cfg)
    assert chosen_texts(records) == ["stock reply !", "stock reply !", "other 2 !", "other 3 !", "other 4 !"]
    assert report["happiness"] == {"prompts": 5, "cap": 2, "top_text_before": "stock reply !", "top_share_before": 1.0,
                                   "top_text_after": "stock reply !", "top_share_after": 0.4, "left_without_pair": 0}


def test_a_prompt_whose_passing_texts_are_all_at_the_cap_gets_no_pair():
    from emotion_dpo.dataset import choose_pairs

    cfg = config(overrides=["chosen_text_cap=0.4", "chosen_text_cap_min=1"])
    records, report = choose_pairs(five_prompts_with_a_stock_reply(only_stock_at={1, 4}), cfg)
    # prompts 0 and 1 take the stock reply (cap 2); prompt 4 has only the stock reply: no pair
    assert chosen_texts(records) == ["stock reply !", "stock reply !", "other 2 !", "other 3 !", None]
    assert (records[4]["status"], records[4]["reason"]) == ("failed", "every passing text is at chosen_text_cap")
    assert (report["happiness"]["left_without_pair"], report["happiness"]["top_share_after"]) == (1, 0.5)  # 2 of 4


def test_the_cap_is_a_share_of_the_prompts_with_a_pair_not_of_those_given_up():
    from emotion_dpo.dataset import choose_pairs

    given_up = [record(i, [[cand("no .", 1.0)]], status="failed", reason="best score below min_chosen_score")
                for i in range(5, 10)]
    cfg = config(overrides=["chosen_text_cap=0.4", "chosen_text_cap_min=1"])
    # 5 prompts with a pair (not 10): cap int(0.4 x 5) = 2, so prompts 2-4 take their own reply
    records, report = choose_pairs(five_prompts_with_a_stock_reply() + given_up, cfg)
    assert chosen_texts(records[:5]) == ["stock reply !", "stock reply !", "other 2 !", "other 3 !", "other 4 !"]
    assert report["happiness"]["cap"] == 2


def test_the_pairs_do_not_depend_on_the_order_the_journal_lists_the_prompts_in():
    from emotion_dpo.dataset import choose_pairs

    cfg = config(overrides=["chosen_text_cap=0.4", "chosen_text_cap_min=1"])
    shuffled = five_prompts_with_a_stock_reply()
    random.Random(3).shuffle(shuffled)  # as N processes' journals merge in any order
    records, _ = choose_pairs(shuffled, cfg)
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
    assert chosen_texts(records) == ["stock reply !", "stock reply !", "other 2 !", "other 3 !", "other 4 !"]


def test_the_rarest_rule_chooses_the_passing_text_with_fewest_copies_among_the_emotions_candidates():
    from emotion_dpo.dataset import choose_pairs

    S, L = cand("stock reply !", 15.0), cand("no .", 1.0)
    records = [record(0, [[S, cand("pretty day !", 11.0), L]]), record(1, [[S, {**S, "total": 14.0}, L]]),
               record(2, [[S, cand("sunny !", 10.0), L]])]
    # copies among the 9 happiness candidates: stock 4, "no ." 3, "pretty day !" 1, "sunny !" 1
    chosen, _ = choose_pairs(records, config(overrides=["chosen_rule=rarest"]))
    assert chosen_texts(chosen) == ["pretty day !", "stock reply !", "sunny !"]
    assert [r["chosen_at"] for r in chosen] == [1, 0, 1]  # prompt 1: its two copies tie on rarity; 15 beats 14
    assert [r["rejected_at"] for r in chosen] == [2, 2, 2]  # the lowest total: "no ."


def test_the_most_common_rejected_rule_takes_the_most_copied_failing_text_far_enough_below_the_chosen():
    from emotion_dpo.dataset import choose_pairs, picked

    M = "meh ."
    far = record(0, [[cand("yay !", 15.0), cand(M, 7.0), cand(M, 6.5), cand("no .", 1.0)]])
    # failing: "meh ." x2 (7, 6.5; 8 and 8.5 below 15), "no ." x1 (14 below): the most copied is "meh .", the
    # lowest of its copies 6.5 at position 2
    (kept,), _ = choose_pairs([far], config(overrides=["rejected_rule=most_common"]))
    assert (kept["rejected_round"], kept["rejected_at"]) == (0, 2)
    near = record(0, [[cand("yay !", 11.0), cand(M, 7.0), cand(M, 6.5), cand("no .", 1.0)]])
    # now "meh ." is 4 and 4.5 below the chosen 11, under target_score_range 5: "no ." (10 below) is rejected
    (kept,), _ = choose_pairs([near], config(overrides=["rejected_rule=most_common"]))
    assert picked(kept)[1]["text"] == "no ."


def test_with_the_reference_rule_the_pairs_are_the_records_own_and_before_equals_after():
    from emotion_dpo.dataset import choose_pairs

    journal = five_prompts_with_a_stock_reply()
    records, report = choose_pairs(journal, config())
    assert records == journal
    assert report["happiness"]["top_share_before"] == report["happiness"]["top_share_after"] == 1.0
    assert report["happiness"]["cap"] is None


# ------------------------------------------------------------------ the collapse ahead, on its thresholds

def cap_rows(prompts, share, left=0):
    return {"happiness": {"prompts": prompts, "cap": None, "top_text_before": "x", "top_share_before": share,
                          "top_text_after": "x", "top_share_after": share, "left_without_pair": left}}


def test_the_pairs_warning_uses_the_evaluations_collapse_rule_on_its_thresholds():
    from emotion_dpo.stats import chosen_text_warnings

    assert chosen_text_warnings(cap_rows(10, 0.3)) == []  # exactly 30 %: not more than TOP_SHARE_LIMIT
    assert chosen_text_warnings(cap_rows(10, 0.31)) == ["happiness: 31% of its 10 pairs choose 'x'"]
    assert chosen_text_warnings(cap_rows(9, 0.9)) == []  # 9 pairs: under MIN_GROUP 10
    assert chosen_text_warnings(cap_rows(11, 0.9, left=2)) == []  # 11 - 2 = 9 pairs


def write_run(folder: Path, records, overrides=()):
    folder.mkdir(parents=True)
    save_config(config(folder, overrides), folder, "config.json")
    (folder / "journal.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# Candidates whose stored totals are what rescoring gives them (--reselect scores again from the classifier outputs
# and the length), emotion and clean confidence 1.0, weights [0.4, 0.25, 0.35], bias 0.001, length 5 / 20:
#  "the stock reply !" (17): a = 2.4, b = -0.15 -> 22.5; 4 + 5.625 + 3.5 + 0.001 = 13.126
#  "other reply N !" (15): a = 2, b = -0.25 -> 17.5; 4 + 4.375 + 3.5 + 0.001 = 11.876
#  "no ." (4), neutral: a = -0.2 -> -0.00002; 0 - 0.000005 + 3.5 + 0.001 = 3.500995
STOCK = {**cand("the stock reply !", 13.126), "length_reward": 22.5}
NO = {**cand("no .", 3.500995, emotion="neutral"), "emotion_reward": 0.0, "length_reward": -0.00002}


def ten_stock_prompts():
    return [record(i, [[STOCK, {**cand(f"other reply {i} !", 11.876), "length_reward": 17.5}, NO]]) for i in range(10)]


def test_finalize_warns_of_a_collapse_in_the_pairs_and_reports_the_share_before_and_after(tmp_path):
    from emotion_dpo.generate import finalize

    run = tmp_path / "run"
    write_run(run, ten_stock_prompts())
    with pytest.warns(UserWarning, match=r"happiness: 100% of its 10 pairs choose 'the stock reply !'"):
        finalize(config(run), run, total_prompts=10)
    stats = json.loads((run / "statistics.json").read_text())
    assert stats["collapse_ahead"] == ["happiness: 100% of its 10 pairs choose 'the stock reply !'"]
    card = (run / "dataset/README.md").read_text()
    assert "top chosen text before the rule (share)" in card


def test_reselect_applies_the_cap_to_the_stored_candidates_without_generation(tmp_path):
    from emotion_dpo.generate import reselect_run

    run = tmp_path / "run"
    write_run(run, ten_stock_prompts())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no collapse ahead with the cap
        reselect_run(config(run, ["chosen_text_cap=0.1", "chosen_text_cap_min=2"]), str(tmp_path / "capped"))
    rows = [json.loads(line) for line in (tmp_path / "capped/preferences.jsonl").read_text().splitlines()]
    # 10 prompts -> cap max(2, int(0.1 x 10) = 1) = 2: prompts 0 and 1 take the stock reply, the rest their own
    assert [r["chosen"] for r in rows] == ["the stock reply !"] * 2 + [f"other reply {i} !" for i in range(2, 10)]
    stats = json.loads((tmp_path / "capped/statistics.json").read_text())
    assert stats["chosen_text"]["happiness"]["top_share_before"] == 1.0
    assert stats["chosen_text"]["happiness"]["top_share_after"] == 0.2
    assert stats["collapse_ahead"] == []


def test_the_chosen_lengths_are_counted_against_the_cliff():
    from emotion_dpo.stats import length_against_cliff

    # length_max 20: bins [0, 20) [20, 30) [30, 36) [36, 40) [40, inf); the cliff at 40
    profile = length_against_cliff([5, 19, 20, 35, 36, 39, 40, 80], 20)
    assert profile["cliff"] == 40
    assert [b["chosen"] for b in profile["bins"]] == [2, 1, 1, 2, 2]
    assert profile["bins"][3]["share"] == 0.25


# ------------------------------------------------------------------ the journal keeps the chosen round

def test_the_journal_takes_a_pair_from_an_earlier_round_and_names_a_round_out_of_range():
    from emotion_dpo.journal import record_problem

    two_rounds = record(0, [[cand("a !", 15.0), cand("b .", 1.0)], [cand("c !", 9.0)]], chosen_at=0, rejected_at=0)
    assert record_problem({**two_rounds, "chosen_round": 0, "rejected_round": 0}) is None
    assert record_problem({**two_rounds, "chosen_round": 0, "chosen_at": 1}) is None
    assert record_problem({**two_rounds, "chosen_round": 2}) == \
        "key 'chosen_round': expected the position of a round (0-1) or null, got 2"
    assert record_problem({**two_rounds, "rejected_round": 1, "rejected_at": 1}) == \
        "key 'rejected_at': expected the position of a reply of round 1 (0-0), got 1"


def test_the_card_says_which_diversity_rules_chose_the_pairs():
    from emotion_dpo.card import rules_paragraph

    text = rules_paragraph(config(overrides=["chosen_text_cap=0.1", "chosen_rule=\"rarest\"",
                                             "rejected_rule=\"most_common\""]))
    assert ("the chosen reply is the rarest text among the run's candidates for the emotion (DivPO) passing one, "
            "the rejected the most copied failing one (DivPO); one text may be at most 0.1 of an emotion's chosen "
            "replies (at least 2)") in text
    assert "Diversity-aware selection" not in rules_paragraph(config())
