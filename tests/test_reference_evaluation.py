"""args/evaluate_reference_arg.json samples as the reference's evaluation did: hermeschen1116/emotion-chat-bot at
commit 1228505, src/scripts/response_generator/evaluate_dpo.py, lines 141-152:

    generation_config = GenerationConfig(max_new_tokens=150, min_new_tokens=5, repetition_penalty=1.1, top_k=3,
        top_p=0.9, ..., temperature=1.0, do_sample=True, num_beams=1)

and reports weighted F1 (line 218: multiclass_f1_score(..., average="weighted")) on the test split (line 49)."""

from pathlib import Path

from emotion_dpo.config import EvaluateConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_evaluation_config_holds_evaluate_dpo_py_s_sampling_settings():
    cfg = load_config(EvaluateConfig, ROOT / "args/evaluate_reference_arg.json")
    assert cfg.generation == {"do_sample": True, "num_beams": 1, "min_new_tokens": 5, "max_new_tokens": 150,
                              "repetition_penalty": 1.1, "top_k": 3, "top_p": 0.9, "temperature": 1.0}
    assert cfg.dataset_split == "test"
    # otherwise the project's evaluation: the same models, classifiers and rewards
    same = load_config(EvaluateConfig, ROOT / "args/evaluate_arg.json")
    assert (cfg.base_model, cfg.adapter, cfg.emotion_classifier, cfg.emotion_labels) == \
        (same.base_model, same.adapter, same.emotion_classifier, same.emotion_labels)


def test_weighted_f1_is_reported_beside_accuracy():
    from types import SimpleNamespace

    from emotion_dpo.evaluation import METRIC_ROWS, model_metrics

    def reply(emotion):
        return SimpleNamespace(text="a .", emotion_label=emotion, gibberish_label="clean", gibberish_confidence=1.0,
                               length=3, total=1.0, emotion_reward=0, length_reward=0, gibberish_reward=0)

    targets = ["happiness", "happiness", "anger", "sadness"]
    m = model_metrics(targets, [reply("happiness"), reply("sadness"), reply("anger"), reply("happiness")], 0.8, ["."])
    # F1 happiness 1/2 (2 prompts), anger 1 (1), sadness 0 (1): weighted by prompts (2 x 1/2 + 1 + 0) / 4
    assert m["emotion_weighted_f1"] == 0.5
    assert ("emotion_weighted_f1", "emotion weighted F1") in METRIC_ROWS
