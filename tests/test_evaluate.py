"""evaluate.py: metrics checked by hand, a model compared with itself, and bad input refused early."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from emotion_dpo.config import EvaluateConfig, load_config
from emotion_dpo.errors import PipelineError
from emotion_dpo.evaluation import evaluate, model_metrics, win_rate

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "args/demo/evaluate_arg.json"


def reply(text, emotion, gibberish="clean", gconf=0.9, total=10.0):
    return SimpleNamespace(text=text, emotion_label=emotion, gibberish_label=gibberish, gibberish_confidence=gconf,
                           length=len(text), total=total, emotion_reward=1.0, length_reward=2.0, gibberish_reward=3.0)


def test_metrics_on_hand_made_replies():
    targets = ["happiness", "happiness", "anger", "sadness"]
    replies = [reply("yay !", "happiness"), reply("oh no", "sadness", gconf=0.5),
               reply("grr !", "anger", gibberish="word salad"), reply("sigh .", "happiness")]
    m = model_metrics(targets, replies, clean_confidence=0.8, endings=["!", ".", "?"])
    assert m["emotion_accuracy"] == pytest.approx(2 / 4)
    # F1 by class: happiness P=1/2 R=1/2 -> 0.5; anger 1.0; sadness P=0 R=0 -> 0; macro over the 3 targets
    assert m["emotion_macro_f1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["per_emotion_accuracy"] == {"anger": 1.0, "happiness": 0.5, "sadness": 0.0}
    assert m["clean_rate"] == pytest.approx(2 / 4)  # "oh no" is clean but only 0.5 sure; "grr !" is word salad
    assert m["cutoff_rate"] == pytest.approx(1 / 4)  # "oh no"
    assert m["mean_length"] == pytest.approx((5 + 5 + 5 + 6) / 4)
    assert m["mean_total_reward"] == 10.0 and m["mean_gibberish_reward"] == 3.0


def test_win_rate_counts_ties_as_half():
    w = win_rate([3, 2, 1, 5], [1, 2, 3, 4], samples=500, seed=0)
    assert w["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert (w["wins"], w["ties"], w["losses"]) == (2, 1, 1)
    assert 0 <= w["ci95"][0] <= w["win_rate"] <= w["ci95"][1] <= 1


def demo_config(demo_world, output_dir, *extra):
    w = demo_world
    sets = [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dataset={w / 'dialogues'}",
            f"emotion_classifier={w / 'emotion_classifier'}", f"gibberish_detector={w / 'gibberish_detector'}",
            f"chat_template={ROOT / 'args/chat_template.json'}", f"output_dir={output_dir}", "wandb.mode=disabled",
            "include_base=false", "num_prompts=24", *extra]
    return load_config(EvaluateConfig, DEMO_CONFIG, sets)


def test_a_model_compared_with_itself_under_the_same_seed_ties(demo_world, tmp_path):
    cfg = demo_config(demo_world, tmp_path / "eval", f"dpo_adapter={demo_world / 'sft_adapter'}")
    results = evaluate(cfg)
    sft, dpo = results["models"]["SFT"], results["models"]["DPO"]
    assert sft == dpo
    w = results["dpo_vs_sft"]
    assert w["ci95"][0] <= 0.5 <= w["ci95"][1]
    assert w["win_rate"] == 0.5
    for name in ("results.md", "results.json", "replies.jsonl", "results.png", "config.json"):
        assert (tmp_path / "eval" / name).exists(), name
    rows = [json.loads(line) for line in (tmp_path / "eval" / "replies.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["SFT"]["text"] == r["DPO"]["text"] for r in rows)


def test_a_missing_adapter_path_is_a_clear_error(demo_world, tmp_path):
    cfg = demo_config(demo_world, tmp_path / "eval", "dpo_adapter=outputs/no/such/final_adapter")
    with pytest.raises(PipelineError, match="key dpo_adapter: adapter folder outputs/no/such/final_adapter does not exist"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()


def test_a_test_split_with_no_usable_prompts_is_a_clear_error(demo_world, tmp_path):
    cfg = demo_config(demo_world, tmp_path / "eval", f"dpo_adapter={demo_world / 'sft_adapter'}", "num_turns_history=9")
    with pytest.raises(PipelineError, match="split 'test' has no dialogue with the 20 turns"):
        evaluate(cfg)
