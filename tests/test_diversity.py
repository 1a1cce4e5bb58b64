"""Degeneration figures and the collapse warning, on a hand-made replies file (tests/data/hand_replies.jsonl, in
evaluate's replies.jsonl format), every expected value counted by hand."""

import math
from pathlib import Path

import pytest

from emotion_dpo.diversity import ceiling, collapse_warnings, diversity, replies_file_reports

HAND = Path(__file__).parent / "data" / "hand_replies.jsonl"


def test_sft_figures_counted_by_hand():
    sft = replies_file_reports(HAND)["SFT"]
    # 8 replies; "the store closes ." twice, the rest once: 7 different texts
    assert sft["replies"] == 8 and sft["distinct_replies"] == 7
    # words 5+7+4+4+4+5+3+5 = 37; different: you made my day ! great , i love it the store closes . okay bus get out
    # enough = 19
    assert sft["distinct_1"] == pytest.approx(19 / 37)
    # word pairs 4+6+3+3+3+4+2+4 = 29; different: 4 (t0) + 2 (t1: "great ,", ", you") + 3 + 3 + 0 + 4 + 2 + 2 = 20
    assert sft["distinct_2"] == pytest.approx(20 / 29)
    assert sft["canned_replies"] == 0 and sft["canned_share"] == 0  # no text reached 3 different prompts
    assert (sft["most_frequent_reply"], sft["most_frequent_count"]) == ("the store closes .", 2)
    assert sft["most_frequent_share"] == pytest.approx(2 / 8)
    assert sft["length_words_mean"] == pytest.approx(37 / 8)
    # squared deviations from 4.625: .140625 + 5.640625 + 3 x .390625 + .140625 + 2.640625 + .140625 = 9.875
    assert sft["length_words_sd"] == pytest.approx(math.sqrt(9.875 / 7))
    happiness = sft["by_group"]["happiness"]
    assert (happiness["replies"], happiness["distinct_replies"]) == (3, 3)
    assert happiness["length_words_mean"] == pytest.approx((5 + 7 + 4) / 3)


def test_collapsed_figures_counted_by_hand():
    dpo = replies_file_reports(HAND)["DPO"]
    assert dpo["distinct_replies"] == 3
    # "you made my day !" to prompts 0-2, "the store closes ." to 3, 4, 5, 7: both canned, 7 of 8 replies
    assert dpo["canned_replies"] == 7 and dpo["canned_share"] == pytest.approx(7 / 8)
    assert (dpo["most_frequent_reply"], dpo["most_frequent_share"]) == ("the store closes .", 4 / 8)
    assert dpo["distinct_1"] == pytest.approx(11 / 34)  # 3 x 5 + 4 x 4 + 3 words; 11 different
    assert dpo["distinct_2"] == pytest.approx(9 / 26)  # 3 x 4 + 4 x 3 + 2 pairs; 4 + 3 + 2 different
    anger = dpo["by_group"]["anger"]
    assert anger["distinct_replies"] == 2 and anger["canned_replies"] == 0  # within anger: 2 prompts, 2 texts
    assert dpo["by_group"]["neutral"]["most_frequent_share"] == 1.0


def test_a_reply_repeated_to_one_prompt_is_not_canned():
    figures = diversity(["hi .", "hi .", "hi .", "bye ."], prompts=[0, 0, 1, 2])  # "hi ." reached 2 prompts
    assert figures["canned_replies"] == 0 and figures["distinct_replies"] == 2


def test_collapse_warning_fires_on_the_collapsed_file_and_not_on_sft():
    reports = replies_file_reports(HAND)
    reasons = collapse_warnings(reports["DPO"], reports["SFT"])
    assert any(r.startswith("distinct replies 3 < 0.5 x SFT's 7") for r in reasons)
    assert any(r.startswith("canned share 0.875 > 2 x SFT's 0.000") for r in reasons)
    assert collapse_warnings(reports["SFT"], reports["SFT"]) == []


def test_collapse_warning_names_an_emotion_whose_prompts_share_one_reply():
    sft = diversity(["hello ."] * 3 + [f"reply {i} ." for i in range(9)])  # canned share 3/12: 4/12 is not twice it
    texts = ["you made my day !"] * 4 + [f"reply {i} ." for i in range(8)]  # 4 of 12 = 33 % > 30 %
    model = {**diversity(texts), "by_group": {"happiness": diversity(texts)}}
    assert collapse_warnings(model, sft) == ["happiness: 33% of its 12 prompts get 'you made my day !'"]
    texts[3] = "reply 99 ."  # 3 of 12 = 25 %: fine
    model = {**diversity(texts), "by_group": {"happiness": diversity(texts)}}
    assert collapse_warnings(model, sft) == []


def test_ceiling_of_a_finite_language():
    # one group of 2 prompts over 2 replies: both the same with probability 1/2 -> expected distinct 1.5, expected
    # top share 1/2 x 1 + 1/2 x 1/2 = 0.75
    c = ceiling({"happiness": 2}, {"happiness": ["a .", "b ."]}, draws=4000, seed=1)
    assert c["expected_distinct_replies"] == pytest.approx(1.5)
    assert c["by_group"]["happiness"]["expected_most_frequent_share"] == pytest.approx(0.75, abs=0.02)
    # the figure: 28 replies per emotion; 30 prompts keep 28 (1 - (27/28)^30) = 18.96 of them
    c = ceiling({"happiness": 30}, {"happiness": [str(i) for i in range(28)]}, draws=10)
    assert c["expected_distinct_replies"] == pytest.approx(28 * (1 - (27 / 28) ** 30))


def hand_results(dpo_model: str) -> dict:
    """evaluate's results.json for the hand-made file, with `dpo_model`'s replies as the DPO model's."""
    import json
    from types import SimpleNamespace

    from emotion_dpo.evaluation import diversity_figures

    rows = [json.loads(line) for line in HAND.read_text().splitlines()]
    prompts = [SimpleNamespace(index=r["index"], target_emotion=r["target_emotion"]) for r in rows]
    scored = {name: [SimpleNamespace(text=r[source]["text"]) for r in rows]
              for name, source in (("SFT", "SFT"), ("DPO", dpo_model))}
    figures = {"emotion_accuracy": 0.5, "emotion_macro_f1": 0.5, "clean_rate": 1.0, "cutoff_rate": 0.0,
               "mean_total_reward": 10.0}
    return {"setup": {"prompts": 8, "sources": {"SFT": "sft", "DPO": "dpo"}},
            "models": {"SFT": figures, "DPO": figures}, "dpo_vs_sft": {"win_rate": 0.5, "ci95": [0.4, 0.6]},
            "diversity": diversity_figures(prompts, scored)}


@pytest.mark.parametrize("dpo_model, flagged", [("DPO", True), ("SFT", False)])
def test_the_iterations_table_flags_a_collapsed_iteration_only(dpo_model, flagged):
    from emotion_dpo.pipeline import format_iterations, iteration_row

    results = hand_results(dpo_model)
    statistics = {"acceptance_rate": 1.0, "accepted": 8, "prompts_settled": 8, "score_gap": {"median": 5, "mean": 5}}
    table = {"sft": {"adapter": "sft", "prompts": 8, **results["models"]["SFT"],
                     **{k: v for k, v in iteration_row(1, hand_results("SFT"), statistics).items()
                        if k.startswith(("distinct", "canned", "most_frequent", "length", "worst"))}, "judges": {}},
             "iterations": [iteration_row(1, results, statistics)]}
    text = format_iterations(table)
    assert ("COLLAPSE WARNING, iteration 1: distinct replies 3 < 0.5 x SFT's 7" in text) is flagged
    assert ("No collapse warning" in text) is not flagged
    assert "| iteration 1 | " + ("3 (43%)" if flagged else "7 (100%)") in text


def test_several_draws_per_prompt_are_reported_on_the_scale_of_one_reply_per_prompt():
    from emotion_dpo.diversity import per_draw_report

    # 3 prompts (happiness, happiness, sadness), 2 draws each, laid out prompt by prompt:
    # draw 0: "yay !", "yay !", "oh ." -> 2 distinct; happiness top share 2/2 = 1.0
    # draw 1: "yay !", "fun !", "oh ." -> 3 distinct; happiness top share 1/2 = 0.5
    texts = ["yay !", "yay !", "yay !", "fun !", "oh .", "oh ."]
    groups = ["happiness"] * 4 + ["sadness"] * 2
    report = per_draw_report(texts, groups, [0, 0, 1, 1, 2, 2], draws=2)
    assert report["replies"] == 3
    assert report["distinct_replies"] == 2.5
    assert report["by_group"]["happiness"]["most_frequent_share"] == 0.75
    assert report["by_group"]["happiness"]["most_frequent_reply"] == "yay !"  # named over all draws: 3 of 4


# ---------------------------------------------------------------- the collapse warning's thresholds, each sat on

def unique(n: int, start: int = 0) -> list[str]:
    return [f"reply {i} ." for i in range(start, start + n)]


def test_exactly_half_of_sfts_distinct_replies_is_no_collapse_one_fewer_is():
    sft = diversity(unique(8))  # 8 distinct replies; the floor is 0.5 x 8 = 4
    half = diversity(unique(4) * 2)  # 4 distinct: not below 4
    assert half["distinct_replies"] == 4 and collapse_warnings(half, sft) == []
    below = diversity(unique(3) + unique(1) * 5)  # 3 + 0 new = 3 distinct (reply 0 given 6 times)
    assert below["distinct_replies"] == 3
    assert collapse_warnings(below, sft)[0] == "distinct replies 3 < 0.5 x SFT's 8"


def test_exactly_twice_sfts_canned_share_is_no_collapse_more_is():
    sft = diversity(["hello ."] * 3 + unique(9))  # "hello ." to 3 prompts: canned 3 of 12 = 0.25
    assert sft["canned_share"] == 0.25
    twice = diversity(["hello ."] * 6 + unique(6))  # 6 of 12 = 0.5 = 2 x 0.25 exactly (both binary fractions)
    assert twice["canned_share"] == 0.5 and collapse_warnings(twice, sft) == []
    more = diversity(["hello ."] * 7 + unique(5))  # 7 of 12 = 0.583 > 0.5; 6 distinct, not below 0.5 x 10
    assert collapse_warnings(more, sft) == ["canned share 0.583 > 2 x SFT's 0.250"]


def with_group(texts: list[str]) -> dict:
    return {**diversity(texts), "by_group": {"happiness": diversity(texts)}}


def test_one_reply_taking_exactly_30_percent_of_an_emotion_is_no_collapse_more_is():
    sft = {"distinct_replies": 2, "canned_share": 1.0}  # the first two rules cannot fire
    exactly = with_group(["you made my day !"] * 3 + unique(7))  # 3 of 10 = 0.3, not above 0.30
    assert exactly["by_group"]["happiness"]["most_frequent_share"] == 0.3 and collapse_warnings(exactly, sft) == []
    above = with_group(["you made my day !"] * 4 + unique(6))  # 4 of 10 = 40 %
    assert collapse_warnings(above, sft) == ["happiness: 40% of its 10 prompts get 'you made my day !'"]


def test_the_top_share_rule_starts_at_exactly_10_prompts_of_an_emotion():
    sft = {"distinct_replies": 2, "canned_share": 1.0}
    ten = with_group(["you made my day !"] * 4 + unique(6))  # 10 prompts, 40 %
    nine = with_group(["you made my day !"] * 4 + unique(5))  # 9 prompts, 4/9 = 44 %: too few prompts to judge
    assert collapse_warnings(ten, sft) == ["happiness: 40% of its 10 prompts get 'you made my day !'"]
    assert collapse_warnings(nine, sft) == []


def test_replies_are_compared_without_their_surrounding_spaces():
    figures = diversity([" hi .", "hi . ", "hi .", "bye ."])
    assert figures["distinct_replies"] == 2 and figures["canned_replies"] == 3  # "hi ." to 3 prompts
    assert figures["most_frequent_reply"] == "hi ."


def test_ceiling_with_more_prompts_than_replies():
    # one group of 3 prompts over 2 well-formed replies (listed with a repeat: still 2):
    # expected distinct 2 (1 - (1/2)^3) = 2 x 7/8 = 1.75.
    # the 8 equally likely draws: aaa and bbb put all 3 prompts on one reply (share 3/3), the other 6 split 2 + 1
    # (share 2/3): expected top share (2 x 1 + 6 x 2/3) / 8 = 6/8 = 0.75
    c = ceiling({"happiness": 3}, {"happiness": ["a .", "b .", "a ."]}, draws=4000, seed=2)
    assert c["prompts"] == 3
    assert c["expected_distinct_replies"] == pytest.approx(1.75)
    assert c["by_group"]["happiness"]["well_formed"] == 2 and c["by_group"]["happiness"]["prompts"] == 3
    # the shares are 1 or 2/3 (SD 0.144): 4000 draws put the mean within 0.0023 x 4 of 0.75
    assert c["by_group"]["happiness"]["expected_most_frequent_share"] == pytest.approx(0.75, abs=0.01)
    # two groups add up: 4 prompts over 2 replies keep 2 (1 - 1/16) = 1.875; the 16 draws: 2 all on one reply
    # (share 1), 8 split 3 + 1 (3/4), 6 split 2 + 2 (1/2): (2 + 6 + 3) / 16 = 11/16
    c = ceiling({"happiness": 3, "anger": 4}, {"happiness": ["a .", "b ."], "anger": ["c .", "d ."]}, draws=4000)
    assert c["prompts"] == 7 and c["expected_distinct_replies"] == pytest.approx(1.75 + 1.875)
    assert c["by_group"]["anger"]["expected_most_frequent_share"] == pytest.approx(11 / 16, abs=0.01)
