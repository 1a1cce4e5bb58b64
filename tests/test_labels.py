"""emotion_labels names the emotion classifier's outputs by position, as the reference does every time it loads
`Shotaro30678/emotion_text_classifier_on_dd_v1` (hermeschen1116/emotion-chat-bot at commit
12285059f1013d43b0f2b619d637197b0c9dad3f, src/scripts/response_generator/data_process_dpo.py: `emotion_labels`
and the sentiment pipeline's `model_kwargs` id2label/label2id); gibberish labels compare case-insensitively."""

import json
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emotion_dpo.config import GenerateConfig, load_config
from emotion_dpo.errors import PipelineError
from emotion_dpo.evaluation import model_metrics
from emotion_dpo.models import check_classifiers, load_classifier
from emotion_dpo.prompts import load_prompts
from emotion_dpo.selection import ScoredReply, chosen_failure

from test_generate_preferences import DEMO_CONFIG, demo_overrides

# data_process_dpo.py line 81, at the commit above
REFERENCE_LABELS = ["neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"]
TEXTS = ["i am so happy !", "ugh , that is gross .", "i am terrified of the exam .", "ok .", "why would you do that"]


def relabelled(demo_world, tmp_path, names, source="emotion_classifier"):
    """A copy of a demo classifier whose config names its outputs `names` (weights unchanged)."""
    folder = tmp_path / f"{source}-{names[0]}"
    shutil.copytree(demo_world / source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def predicted_positions(folder, texts):
    """The index of each text's highest logit, read from the model directly (no pipeline, no label names)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    return logits.argmax(-1).tolist()


GENERIC = [f"LABEL_{i}" for i in range(7)]


def test_a_classifier_saved_with_generic_labels_is_named_by_emotion_labels_silently(demo_world, tmp_path):
    folder = relabelled(demo_world, tmp_path, GENERIC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_classifiers(folder, str(demo_world / "gibberish_detector"), REFERENCE_LABELS)
        classify = load_classifier(folder, 8, REFERENCE_LABELS)
    expected = [REFERENCE_LABELS[i] for i in predicted_positions(folder, TEXTS)]
    assert [r["label"] for r in classify(TEXTS)] == expected


def test_the_scorer_reads_the_emotion_labels_names(demo_world, tmp_path):
    from emotion_dpo.template import load_chat_format
    from emotion_dpo.generation import Scorer
    from emotion_dpo.models import load_tokenizer

    folder = relabelled(demo_world, tmp_path, GENERIC)
    names = ["calm", "rage", "yuck", "dread", "joy", "gloom", "wow"]
    cfg = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, "unused", extra=[
        f"emotion_classifier={folder}", f"emotion_labels={json.dumps(names)}"]))
    scorer = Scorer(cfg, load_tokenizer(cfg.base_model, cfg.adapter, load_chat_format(cfg.chat_template)))
    expected = [names[i] for i in predicted_positions(folder, TEXTS)]
    assert [s.emotion_label for s in scorer.score([(text, []) for text in TEXTS], ["joy"] * len(TEXTS))] == expected


def test_a_classifier_whose_own_names_disagree_gets_a_warning_showing_both(demo_world, tmp_path):
    own = ["joy", "anger", "disgust", "fear", "neutral", "sadness", "surprise"]  # first and fifth swapped
    folder = relabelled(demo_world, tmp_path, own)
    with pytest.warns(UserWarning) as caught:
        check_classifiers(folder, str(demo_world / "gibberish_detector"), REFERENCE_LABELS)
    message = str(caught[0].message)
    assert "joy, anger, disgust, fear, neutral, sadness, surprise" in message
    assert "neutral, anger, disgust, fear, happiness, sadness, surprise" in message
    with pytest.warns(UserWarning):
        classify = load_classifier(folder, 8, REFERENCE_LABELS)
    assert [r["label"] for r in classify(TEXTS)] == [REFERENCE_LABELS[i] for i in predicted_positions(folder, TEXTS)]


def test_names_that_agree_but_for_case_give_no_warning(demo_world, tmp_path):
    folder = relabelled(demo_world, tmp_path, [label.capitalize() for label in REFERENCE_LABELS])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_classifiers(folder, str(demo_world / "gibberish_detector"), REFERENCE_LABELS)


def test_a_classifier_with_another_number_of_outputs_is_refused_before_generation(demo_world, tmp_path):
    four = str(demo_world / "gibberish_detector")  # 4 outputs where 7 emotions are named
    with pytest.raises(PipelineError, match=r"has 4 outputs .* but emotion_labels names 7"):
        check_classifiers(four, four, REFERENCE_LABELS)
    with pytest.raises(PipelineError, match=r"has 4 outputs"):
        load_classifier(four, 8, REFERENCE_LABELS)
    cfg = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, tmp_path / "out", extra=[
        f"emotion_classifier={four}"]))
    with pytest.raises(PipelineError, match=r"emotion classifier has 4 outputs"):
        load_prompts(cfg)  # what generate_preferences and evaluate call before any generator weights load


def test_the_datasets_emotions_must_be_among_the_emotion_labels(demo_world, tmp_path):
    names = ["calm", "anger", "disgust", "fear", "happiness", "sadness", "surprise"]
    cfg = load_config(GenerateConfig, DEMO_CONFIG, demo_overrides(demo_world, tmp_path / "out", extra=[
        f"emotion_labels={json.dumps(names)}"]))
    with pytest.raises(PipelineError, match=r"unknown emotion 'neutral' \(emotion_labels: calm, anger,"):
        load_prompts(cfg)


def reply(gibberish_label, emotion_label="Happiness"):
    return ScoredReply("what a lovely day !", emotion_label, 0.9, gibberish_label, 0.95, 19, 9.0, 1.0, 9.5, 8.0)


def test_gibberish_and_emotion_labels_compare_case_insensitively_everywhere(demo_world, tmp_path):
    # The design document writes `Clean`; the detector says `clean`.
    selection = SimpleNamespace(min_chosen_gibberish_confidence=0.8, chosen_endings=["!", ".", "?"])
    assert chosen_failure(reply("Clean"), "happiness", selection) is None
    assert chosen_failure(reply("Mild gibberish"), "happiness", selection) == "chosen is not clean"
    metrics = model_metrics(["happiness", "Happiness"], [reply("Clean"), reply("CLEAN")], 0.8, ["!"])
    assert metrics["clean_rate"] == 1.0 and metrics["emotion_accuracy"] == 1.0
    detector = relabelled(demo_world, tmp_path, ["Clean", "Mild gibberish", "Word salad", "Noise"],
                          "gibberish_detector")
    check_classifiers(str(demo_world / "emotion_classifier"), detector, REFERENCE_LABELS)
