"""Every kind of bad config fails at once with a message naming the file and the key, before any model loads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emotion_dpo.config import EvaluateConfig, GenerateConfig, TrainConfig, load_config
from emotion_dpo.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"base_model": "b", "adapter": "a", "dataset": "d", "emotion_classifier": "e", "gibberish_detector": "g"}


def write(tmp_path, data, name="cfg.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def error_of(path, overrides=()):
    with pytest.raises(PipelineError) as caught:
        load_config(GenerateConfig, path, overrides)
    return str(caught.value)


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    path = write(tmp_path, {**MINIMAL, "max_retires": 3})
    assert error_of(path) == f"{path}: key max_retires: unknown key (did you mean 'max_retries'?)"


def test_wrong_type(tmp_path):
    path = write(tmp_path, {**MINIMAL, "n_candidates": "six"})
    assert error_of(path) == f'{path}: key n_candidates: expected an integer, got "six"'


def test_out_of_range_value(tmp_path):
    path = write(tmp_path, {**MINIMAL, "min_chosen_gibberish_confidence": 1.5})
    assert error_of(path) == f"{path}: key min_chosen_gibberish_confidence: expected a value <= 1, got 1.5"


def test_wrong_number_of_reward_weights(tmp_path):
    path = write(tmp_path, {**MINIMAL, "reward_weights": [0.5, 0.5]})
    assert "key reward_weights: expected 3 numbers [emotion, length, gibberish], got 2" in error_of(path)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, {k: v for k, v in MINIMAL.items() if k != "adapter"})
    assert f"{path}: key adapter: required key is missing" in error_of(path)


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.json") == f"{tmp_path / 'nope.json'}: config file not found"


def test_malformed_json(tmp_path):
    path = write(tmp_path, '{"base_model": "b",\n  "adapter": }')
    assert error_of(path).startswith(f"{path}: not valid JSON (Expecting value at line 2, column 14")


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, {**MINIMAL, "bogus": 1, "seed": -1, "wandb": {"mode": "cloud"},
                            "generation": {"temprature": 1.0}})
    lines = error_of(path).splitlines()
    assert lines == [
        f"{path}: key bogus: unknown key",
        f"{path}: key seed: expected a value >= 0, got -1",
        f"{path}: key wandb.mode: expected one of 'offline', 'online', 'disabled', got \"cloud\"",
        f"{path}: key generation.temprature: unknown key (did you mean 'temperature'?)",
    ]


def test_set_overrides_one_key_and_keeps_the_section_defaults(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(GenerateConfig, path, ["num_prompts=64", "generation.top_k=7", "wandb.mode=disabled"])
    assert cfg.num_prompts == 64 and cfg.wandb.mode == "disabled"
    assert cfg.generation["top_k"] == 7 and cfg.generation["temperature"] == 2.0


def test_bad_override_is_checked_like_the_file(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert error_of(path, ["num_prompts=0"]) == f"{path}: key num_prompts: expected a value >= 1, got 0"


def test_dpo_section_keys_are_trl_dpoconfig_fields(tmp_path):
    path = write(tmp_path, {"base_model": "b", "adapter": "a", "dataset": "d", "dpo": {"betta": 0.2}})
    with pytest.raises(PipelineError, match=r"key dpo.betta: unknown key \(did you mean 'beta'\?\)"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize("path, cls", [
    ("args/generate_preferences_arg.json", GenerateConfig), ("args/demo/generate_preferences_arg.json", GenerateConfig),
    ("args/dpo_arg.json", TrainConfig), ("args/demo/dpo_arg.json", TrainConfig),
    ("args/evaluate_arg.json", EvaluateConfig), ("args/demo/evaluate_arg.json", EvaluateConfig),
])
def test_shipped_configs_load(path, cls):
    load_config(cls, ROOT / path)


@pytest.mark.parametrize("script", ["generate_preferences.py", "fine_tune_dpo.py", "evaluate.py"])
def test_scripts_reject_a_bad_config_before_loading_anything(tmp_path, script):
    path = write(tmp_path, {**MINIMAL, "bogus_key": 1})
    result = subprocess.run([sys.executable, str(ROOT / script), "--config", str(path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert f"{path}: key bogus_key: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
