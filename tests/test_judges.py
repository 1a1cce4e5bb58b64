"""Held-out judges: their own label names mapped onto emotion_labels, refused before anything runs when a label
maps to no emotion; their figures computed by hand."""

import math
from pathlib import Path

import pytest

from emotion_dpo import EMOTIONS
from emotion_dpo.config import EvaluateConfig, load_config
from emotion_dpo.errors import PipelineError
from emotion_dpo.judges import agreement, check_judges, emotion_probabilities, judge_figures, judge_label_mapping

ROOT = Path(__file__).resolve().parents[1]
# j-hartmann/emotion-english-distilroberta-base's labels, in its order (its config.json's id2label)
HARTMANN = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]


def test_a_judge_that_says_joy_is_mapped_onto_happiness():
    mapping = judge_label_mapping(HARTMANN, {"joy": "happiness"}, EMOTIONS, "judge")
    assert mapping == ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
    # its probabilities land on our names: output 3 (joy) is happiness
    rows = emotion_probabilities([[0.1, 0, 0, 0.7, 0.2, 0, 0]], mapping)
    assert rows == [{"anger": 0.1, "disgust": 0.0, "fear": 0.0, "happiness": 0.7, "neutral": 0.2, "sadness": 0.0,
                     "surprise": 0.0}]


def test_two_outputs_mapped_onto_one_emotion_add_up():
    rows = emotion_probabilities([[0.5, 0.25, 0.25]], judge_label_mapping(
        ["joy", "happy", "Neutral"], {"joy": "happiness", "happy": "happiness"}, EMOTIONS, "judge"))
    assert rows == [{"happiness": 0.75, "neutral": 0.25}]


def test_an_unmapped_judge_label_is_an_error_naming_it():
    with pytest.raises(PipelineError, match=r"judge: the judge's label 'joy' maps to no emotion_labels entry"):
        judge_label_mapping(HARTMANN, {}, EMOTIONS, "judge")
    with pytest.raises(PipelineError, match="label_map names glee, which the judge does not output"):
        judge_label_mapping(HARTMANN, {"glee": "happiness", "joy": "happiness"}, EMOTIONS, "judge")
    with pytest.raises(PipelineError, match="the judge's label 'joy' maps to no emotion_labels entry"):
        judge_label_mapping(HARTMANN, {"joy": "bliss"}, EMOTIONS, "judge")


def test_an_unmapped_judge_label_stops_evaluate_before_anything_runs(demo_world, tmp_path):
    from transformers import BertConfig

    from emotion_dpo.evaluation import evaluate

    judge = tmp_path / "judge"
    BertConfig(id2label=dict(enumerate(HARTMANN)), label2id={k: i for i, k in enumerate(HARTMANN)}).save_pretrained(judge)
    w = demo_world
    cfg = load_config(EvaluateConfig, ROOT / "args/demo/evaluate_arg.json", [
        f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dpo_adapter={w / 'sft_adapter'}",
        f"dataset={w / 'dialogues'}", f"emotion_classifier={w / 'emotion_classifier'}",
        f"gibberish_detector={w / 'gibberish_detector'}", f"chat_template={ROOT / 'args/chat_template.json'}",
        f"output_dir={tmp_path / 'eval'}", "wandb.mode=disabled", "well_formed_replies=null", "num_prompts=4",
        f'judges=[{{"name": "hartmann", "model": "{judge}"}}]'])
    with pytest.raises(PipelineError, match=r"key judges: hartmann .*the judge's label 'joy' maps to no emotion"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()  # nothing written, no model loaded


def test_judge_figures_by_hand():
    targets = ["happiness", "happiness", "anger", "neutral"]
    rows = [{"happiness": 0.9, "anger": 0.1}, {"happiness": 0.4, "anger": 0.6}, {"happiness": 0.2, "anger": 0.8},
            {"neutral": 0.3, "anger": 0.7}]
    f = judge_figures(targets, rows)  # predicted: happiness, anger, anger, anger
    assert f["emotion_accuracy"] == 0.5
    # F1: happiness P 1 R 1/2 -> 2/3; anger P 1/3 R 1 -> 1/2; neutral 0. macro (2/3 + 1/2 + 0) / 3;
    # weighted by prompts (2, 1, 1): (2 x 2/3 + 1/2) / 4
    assert f["emotion_macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 3)
    assert f["emotion_weighted_f1"] == pytest.approx((4 / 3 + 1 / 2) / 4)
    assert f["target_confidence"] == [0.9, 0.4, 0.8, 0.3]


def test_cohens_kappa_by_hand():
    a = ["happiness", "happiness", "anger", "anger"]
    b = ["happiness", "anger", "anger", "anger"]
    # observed agreement 3/4; chance: P(happiness) 1/2 x 1/4 + P(anger) 1/2 x 3/4 = 1/2 -> (3/4 - 1/2) / (1/2)
    assert agreement(a, b) == pytest.approx(0.5)
    assert agreement(a, a) == 1.0
    assert not math.isnan(agreement(["anger"] * 3, ["anger"] * 3))


def test_the_label_map_and_the_judges_labels_are_read_case_insensitively():
    # label_map spelled otherwise than the judge's id2label, the emotion otherwise than emotion_labels
    mapping = judge_label_mapping(["JOY", "Neutral"], {"joy": "Happiness"}, EMOTIONS, "judge")
    assert mapping == ["happiness", "neutral"]
    mapping = judge_label_mapping(HARTMANN, {"Joy": "happiness"}, EMOTIONS, "judge")  # no "label_map names Joy"
    assert mapping[3] == "happiness"


def test_two_judges_named_alike_are_refused():
    from types import SimpleNamespace

    judge = SimpleNamespace(name="hartmann", model="nowhere", label_map={})
    cfg = SimpleNamespace(source="evaluate_arg.json", judges=[judge, judge], emotion_labels=EMOTIONS)
    with pytest.raises(PipelineError, match="two judges are named alike"):
        check_judges(cfg)


def test_judge_f1_is_over_the_requested_emotions_only():
    # a guess of an emotion no prompt asked for (fear) lowers its prompt's F1 but adds no F1 row of its own
    targets = ["happiness", "happiness", "anger", "anger"]
    rows = [{"happiness": 0.9, "fear": 0.1}, {"happiness": 0.2, "fear": 0.8}, {"anger": 0.6, "fear": 0.4},
            {"anger": 0.7, "fear": 0.3}]
    f = judge_figures(targets, rows)  # predicted: happiness, fear, anger, anger
    # happiness P 1/1 R 1/2 -> 2/3; anger P 2/2 R 2/2 -> 1; (fear would be P 0 R 0: 0, were it counted)
    assert f["emotion_accuracy"] == 0.75
    assert f["emotion_macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert f["emotion_weighted_f1"] == pytest.approx((2 * 2 / 3 + 2 * 1) / 4)


def test_judge_figures_read_its_emotion_names_case_insensitively():
    targets = ["Happiness", "anger"]
    rows = [{"HAPPINESS": 0.9, "anger": 0.1}, {"happiness": 0.4, "Anger": 0.6}]  # both right
    f = judge_figures(targets, rows)
    assert f["emotion_accuracy"] == 1.0 and f["emotion_macro_f1"] == 1.0
    assert f["target_confidence"] == [0.9, 0.6] and f["mean_target_confidence"] == pytest.approx(0.75)


def test_agreement_reads_labels_case_insensitively():
    assert agreement(["Happiness", "anger", "anger"], ["happiness", "Anger", "anger"]) == 1.0
