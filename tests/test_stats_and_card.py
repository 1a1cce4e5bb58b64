"""generate_preferences' statistics by target emotion and by reward part, on a hand-made journal with hand-computed
values, and the dataset card written next to the data."""

import json
from pathlib import Path

import datasets
import pytest
from huggingface_hub import DatasetCard

from emotion_dpo.config import GenerateConfig, load_config
from emotion_dpo.stats import format_summary, format_tables, summarize
from conftest import REFERENCE_SELECTION

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = [0.4, 0.25, 0.35]


def reply(total, emotion, length, gibberish, text="a reply ."):
    return {"text": text, "emotion_label": "happiness", "emotion_confidence": 0.9, "gibberish_label": "clean",
            "gibberish_confidence": 0.9, "length": len(text), "emotion_reward": emotion, "length_reward": length,
            "gibberish_reward": gibberish, "total": total}


def record(index, target, rounds, chosen_at=None, rejected_at=None, reason=None):
    return {"index": index, "dialogue": index, "prompt": f"<s>[INST] prompt {index} [/INST]", "target_emotion": target,
            "status": "failed" if reason else "accepted", "reason": reason, "chosen_at": chosen_at,
            "rejected_at": rejected_at, "rounds": rounds}


FILLER = [reply(1, 0, 0, 0), reply(0, 0, 0, 0)]  # a failed round's candidates
JOURNAL = [
    record(0, "happiness", [[reply(20, 10, 40, 9), reply(5, 0, 10, 2)]], 0, 1),  # gap 15
    record(1, "happiness", [FILLER, FILLER, [reply(12, 8, 20, 6), reply(4, 8, 0, 1)]], 0, 1),  # gap 8, 3 rounds
    record(2, "happiness", [FILLER] * 4, reason="chosen is cut off"),
    record(3, "sadness", [FILLER, [reply(10, 0, 30, 9), reply(30, 9, 80, 8)]], 1, 0),  # chosen second: gap 20
    record(4, "sadness", [FILLER] * 2, reason="score range below target_score_range"),
    record(5, "happiness", [[reply(17, 9, 30, 9), reply(15, 0, 50, 0)]], 0, 1),  # gap 2
]


def test_statistics_by_target_emotion_on_a_hand_made_journal():
    by_emotion = summarize(JOURNAL, weights=WEIGHTS)["by_emotion"]
    assert list(by_emotion) == ["happiness", "sadness"]
    happiness, sadness = by_emotion["happiness"], by_emotion["sadness"]
    # happiness: prompts 0, 1, 2, 5; accepted 0, 1, 5; rounds 1, 3, 4, 1; gaps 15, 8, 2
    assert (happiness["prompts"], happiness["accepted"]) == (4, 3)
    assert happiness["acceptance_rate"] == 0.75
    assert happiness["mean_rounds"] == 2.25
    assert happiness["score_gap"]["median"] == 8
    assert happiness["score_gap"]["mean"] == pytest.approx(25 / 3)
    # sadness: prompts 3, 4; accepted 3 (rounds 2, gap 30 - 10); rounds 2, 2
    assert (sadness["prompts"], sadness["accepted"], sadness["acceptance_rate"], sadness["mean_rounds"]) == (2, 1, 0.5, 2)
    assert sadness["score_gap"] == {"median": 20, "mean": 20}


def test_reward_parts_of_chosen_and_rejected_on_a_hand_made_journal():
    summary = summarize(JOURNAL, weights=WEIGHTS)
    parts = summary["reward_parts"]
    # chosen of prompts 0, 1, 3, 5: emotion 10, 8, 9, 9; length 40, 20, 80, 30; gibberish 9, 6, 8, 9
    assert {k: parts["emotion_reward"]["chosen"][k] for k in ("median", "mean", "min", "max")} == \
        {"median": 9, "mean": 9, "min": 8, "max": 10}
    assert (parts["length_reward"]["chosen"]["median"], parts["length_reward"]["chosen"]["mean"]) == (35, 42.5)
    assert (parts["gibberish_reward"]["chosen"]["median"], parts["gibberish_reward"]["chosen"]["mean"]) == (8.5, 8)
    # rejected: emotion 0, 8, 0, 0; length 10, 0, 30, 50; gibberish 2, 1, 9, 0
    assert (parts["emotion_reward"]["rejected"]["median"], parts["emotion_reward"]["rejected"]["mean"]) == (0, 2)
    assert (parts["length_reward"]["rejected"]["median"], parts["length_reward"]["rejected"]["mean"]) == (20, 22.5)
    assert (parts["gibberish_reward"]["rejected"]["median"], parts["gibberish_reward"]["rejected"]["mean"]) == (1.5, 3)
    # weighted differences 0.4 de / 0.25 dl / 0.35 dg: prompt 0: 4 / 7.5 / 2.45; 1: 0 / 5 / 1.75;
    # 3: 3.6 / 12.5 / -0.35; 5: 3.6 / -5 / 3.15 -> length decides three pairs, emotion one
    assert summary["decided_by"] == {"emotion_reward": 1, "length_reward": 3, "gibberish_reward": 0}
    assert summary["failure_reasons"] == {"chosen is cut off": 1, "score range below target_score_range": 1}


def test_diversity_of_chosen_and_rejected_on_a_hand_made_journal():
    def pair(index, target, chosen, rejected):
        return record(index, target, [[reply(20, 10, 40, 9, chosen), reply(5, 0, 10, 2, rejected)]], 0, 1)

    journal = [pair(0, "happiness", "yay !", "qx qx"), pair(1, "happiness", "yay !", "oh no"),
               pair(2, "happiness", "yay !", "well , fine ."), pair(3, "sadness", "so sad .", "qx qx"),
               record(4, "sadness", [FILLER], reason="chosen is cut off")]
    d = summarize(journal, weights=WEIGHTS)["diversity"]
    chosen, rejected = d["chosen"], d["rejected"]
    # chosen: "yay !" to prompts 0, 1, 2 (canned), "so sad ." once; the failed prompt counts on neither side
    assert (chosen["replies"], chosen["distinct_replies"], chosen["canned_replies"]) == (4, 2, 3)
    assert (chosen["most_frequent_reply"], chosen["most_frequent_share"]) == ("yay !", 0.75)
    assert chosen["distinct_1"] == pytest.approx(5 / 9)  # yay ! yay ! yay ! so sad . -> yay ! so sad .
    # rejected: "qx qx" twice (2 prompts: not canned), "oh no", "well , fine ."
    assert (rejected["distinct_replies"], rejected["canned_replies"]) == (3, 0)
    assert rejected["length_words_mean"] == pytest.approx((2 + 2 + 4 + 2) / 4)
    assert chosen["by_group"]["happiness"]["most_frequent_share"] == 1.0


@pytest.fixture(scope="module")
def finalized(tmp_path_factory):
    from emotion_dpo.generate import finalize

    folder = tmp_path_factory.mktemp("card") / "run"
    folder.mkdir()
    cfg = load_config(GenerateConfig, ROOT / "args/demo/generate_preferences_arg.json", [
        f"output_dir={folder}", f"chat_template={ROOT / 'args/chat_template.json'}", "reward_weights=[0.5,0.2,0.3]",
        "min_chosen_score=7.5", "target_score_range=4.0", *REFERENCE_SELECTION])
    finalize(cfg, folder, records=JOURNAL)
    return folder, cfg


def test_the_statistics_files_hold_the_tables_and_plots(finalized):
    folder, _ = finalized
    written = json.loads((folder / "statistics.json").read_text())
    assert written["by_emotion"]["happiness"]["mean_rounds"] == 2.25
    assert written["decided_by"]["length_reward"] == 3
    text = (folder / "statistics.txt").read_text()
    assert "| happiness | 4 | 3 | 0.750 | 2.250 | 8.000 | 8.333 |" in text
    assert "| length_reward | chosen | 35.000 | 42.500 |" in text
    assert "| chosen | 1 of 4 | " in text  # every chosen reply of the hand-made journal is "a reply ."
    for plot in ("score_gap.png", "reward_parts.png"):
        assert (folder / plot).read_bytes()[:4] == b"\x89PNG"


def test_the_dataset_card_holds_the_config_and_the_statistics_written(finalized):
    folder, cfg = finalized
    card = DatasetCard.load(folder / "dataset" / "README.md")
    assert datasets.load_from_disk(str(folder / "dataset")).num_rows == 4  # the card does not disturb the data
    # metadata in the Hub's format
    assert card.data.task_categories == ["text-generation"] and card.data.size_categories == "n<1K"
    meta = card.data.to_dict()["emotion_dpo"]
    assert meta["reward_weights"] == [0.5, 0.2, 0.3] and meta["min_chosen_score"] == 7.5
    assert meta["base_model"] == "demo_world/base" and meta["accepted"] == 4
    # the resolved config: models, template, reward weights, thresholds
    text = card.text
    for value in ("demo_world/base", "demo_world/sft_adapter", "demo_world/emotion_classifier",
                  "demo_world/gibberish_detector", "[0.5, 0.2, 0.3]"):
        assert value in text, value
    assert json.loads((ROOT / "args/chat_template.json").read_text())["chat_template"] in text  # the template itself
    assert "0.5 x emotion + 0.2 x length + 0.3 x gibberish + 0.001" in text  # the rules paragraph
    assert "below 4.0 (target_score_range)" in text and "below 7.5 (min_chosen_score)" in text
    assert json.loads(text.split("```json\n")[1].split("```")[0]) == cfg.model_dump(mode="json")  # the whole of it
    # the statistics written next to the data, their tables, the plots, the failure reasons
    written = json.loads((folder / "statistics.json").read_text())
    assert f"median {written['score_gap']['median']:.3f}" in text
    assert "| happiness | 4 | 3 | 0.750 | 2.250 | 8.000 | 8.333 |" in text
    assert "| sadness | 2 | 1 | 0.500 | 2.000 | 20.000 | 20.000 |" in text
    assert "| length_reward | 3 (75.0 %) |" in text
    assert "![score gap](score_gap.png)" in text and (folder / "dataset" / "score_gap.png").exists()
    assert "![reward parts](reward_parts.png)" in text and (folder / "dataset" / "reward_parts.png").exists()
    assert "| chosen is cut off | 1 |" in text and "| score range below target_score_range | 1 |" in text


# ---------------------------------------------------------------- the figures of the same journal, by hand
# accepted gaps in journal order 15, 8, 20, 2; sorted 2, 8, 15, 20

def test_the_score_gap_figures_use_the_middle_mean_and_the_sample_sd():
    gap = summarize(JOURNAL, total_prompts=10)["score_gap"]
    assert gap["median"] == 11.5  # (8 + 15) / 2
    assert gap["mean"] == 11.25
    # deviations 3.75, -3.25, 8.75, -9.25: squares sum 186.75, / (4 - 1) = 62.25
    assert gap["sd"] == pytest.approx(62.25 ** 0.5)
    assert (gap["min"], gap["max"]) == (2, 20)


def test_an_sd_needs_two_values_and_two_are_enough():
    two = summarize(JOURNAL[:2])  # gaps 15 and 8: deviations 3.5, -3.5 -> 24.5 / 1
    assert two["score_gap"]["sd"] == pytest.approx(24.5 ** 0.5)
    assert two["reward_parts"]["emotion_reward"]["chosen"]["sd"] == pytest.approx(2 ** 0.5)  # 10, 8
    one = summarize(JOURNAL[:1])
    assert one["score_gap"]["sd"] is None and one["reward_parts"]["emotion_reward"]["chosen"]["sd"] is None


def test_reward_part_sds_are_sample_sds():
    parts = summarize(JOURNAL)["reward_parts"]
    # chosen emotion 10, 8, 9, 9: squares of deviations 1, 1, 0, 0 -> 2 / 3
    assert parts["emotion_reward"]["chosen"]["sd"] == pytest.approx((2 / 3) ** 0.5)
    # rejected length 10, 0, 30, 50 (mean 22.5): 156.25 + 506.25 + 56.25 + 756.25 = 1475 -> / 3
    assert parts["length_reward"]["rejected"]["sd"] == pytest.approx((1475 / 3) ** 0.5)


def test_a_reward_part_median_of_an_even_count_is_the_mean_of_the_middle_two():
    # chosen length 40, 20, 80, 30 -> sorted 20, 30, 40, 80 -> 35 (not 30, not 40)
    assert summarize(JOURNAL)["reward_parts"]["length_reward"]["chosen"]["median"] == 35


def test_prompts_total_acceptance_and_the_rounds_histogram_in_rounds_order():
    summary = summarize(JOURNAL, total_prompts=10)
    assert (summary["prompts_settled"], summary["prompts_total"], summary["accepted"], summary["failed"]) == (6, 10, 4, 2)
    assert summary["acceptance_rate"] == 4 / 6
    # rounds per record: 1, 3, 4, 2, 2, 1
    assert list(summary["rounds_per_prompt"]["histogram"].items()) == [("1", 2), ("2", 2), ("3", 1), ("4", 1)]
    assert summary["rounds_per_prompt"]["mean"] == 13 / 6
    assert summarize([])["acceptance_rate"] == 0.0


def test_failure_reasons_are_listed_most_frequent_first():
    journal = [record(0, "happiness", [FILLER], reason="chosen is cut off"),
               record(1, "happiness", [FILLER], reason="chosen is not clean"),
               record(2, "happiness", [FILLER], reason="chosen is not clean")]
    assert list(summarize(journal)["failure_reasons"].items()) == [("chosen is not clean", 2), ("chosen is cut off", 1)]


def test_the_summary_text_shows_acceptance_in_percent_and_each_failure_reason():
    text = format_summary(summarize(JOURNAL, total_prompts=10))
    assert "prompts settled     6 / 10" in text
    assert "accepted            4 (66.7 %)" in text
    assert "  failed: chosen is cut off: 1" in text and "  failed: score range below target_score_range: 1" in text


def test_which_part_decides_a_pair_follows_the_weights():
    # weights 0.1 / 0.1 / 1: weighted differences prompt 0: 1 / 3 / 7; 1: 0 / 2 / 5; 3: 0.9 / 5 / -1;
    # 5: 0.9 / -2 / 9 -> gibberish decides three pairs, length one
    assert summarize(JOURNAL, weights=[0.1, 0.1, 1.0])["decided_by"] == \
        {"emotion_reward": 0, "length_reward": 1, "gibberish_reward": 3}


def test_a_tie_between_parts_goes_to_the_first_in_reward_weights_order():
    tied = [record(0, "happiness", [[reply(20, 5, 5, 0), reply(10, 0, 0, 0)]], 0, 1)]  # 5 / 5 / 0
    assert summarize(tied, weights=[1, 1, 1])["decided_by"] == {"emotion_reward": 1, "length_reward": 0,
                                                               "gibberish_reward": 0}


def test_the_decided_by_table_gives_each_parts_share_in_percent():
    tables = format_tables(summarize(JOURNAL, weights=WEIGHTS))
    assert "| length_reward | 3 (75.0 %) |" in tables and "| emotion_reward | 1 (25.0 %) |" in tables
