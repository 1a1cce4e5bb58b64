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
TRAIN_MINIMAL = {"base_model": "b", "adapter": "a", "dataset": "d"}


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
        f"{path}: key wandb.mode: expected 'offline', 'online' or 'disabled', got \"cloud\"",
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


@pytest.mark.parametrize("override, message", [
    # TRL takes these without a word: the first fails steps later inside the optimizer, the second trains
    # towards the rejected replies
    ("dpo.learning_rate=fast", 'key dpo.learning_rate: expected a number, got "fast"'),
    ("dpo.beta=-0.1", "key dpo.beta: expected a value > 0, got -0.1"),
    ("dpo.beta=0", "key dpo.beta: expected a value > 0, got 0"),
    ("dpo.per_device_train_batch_size=2.5", "key dpo.per_device_train_batch_size: expected an integer, got 2.5"),
    ("dpo.gradient_accumulation_steps=0", "key dpo.gradient_accumulation_steps: expected a value >= 1, got 0"),
    ("dpo.gradient_checkpointing=1", "key dpo.gradient_checkpointing: expected true or false, got 1"),
    ("dpo.optim=5", "key dpo.optim: expected a string, got 5"),
])
def test_dpo_section_values_are_checked_against_trl_dpoconfig_types_and_ranges(tmp_path, override, message):
    path = write(tmp_path, {"base_model": "b", "adapter": "a", "dataset": "d"})
    with pytest.raises(PipelineError) as caught:
        load_config(TrainConfig, path, [override])
    assert str(caught.value) == f"{path}: {message}"


def test_dpo_section_takes_every_value_trl_takes(tmp_path):
    import dataclasses

    import trl

    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(trl.DPOConfig)
                if f.init and f.name not in ("output_dir", "report_to")
                and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)}
    defaults = {k: v for k, v in defaults.items() if json.loads(json.dumps(v, default=str)) == v}  # JSON-able ones
    assert {"beta", "learning_rate", "loss_type", "max_length"} <= set(defaults)
    path = write(tmp_path, {"base_model": "b", "adapter": "a", "dataset": "d",
                            "dpo": {**defaults, "loss_type": "ipo", "max_length": None, "num_train_epochs": 1}})
    load_config(TrainConfig, path)


@pytest.mark.parametrize("value", [1, 0, "true"])
def test_a_choice_key_takes_only_its_choices_by_type_too(tmp_path, value):
    path = write(tmp_path, {**MINIMAL, "use_unsloth": value})
    assert error_of(path) == f"{path}: key use_unsloth: expected 'auto' or true or false, got {json.dumps(value)}"


def test_a_missing_required_key_does_not_hide_the_other_problems(tmp_path):
    path = write(tmp_path, {"base_model": "b", "dataset": "d", "dpo": {"bta": 0.1}})
    with pytest.raises(PipelineError) as caught:
        load_config(TrainConfig, path)
    assert "key adapter: required key is missing" in str(caught.value)
    assert "key dpo.bta: unknown key (did you mean 'beta'?)" in str(caught.value)


def test_comment_keys_are_allowed_in_the_sections_and_left_out_of_what_the_libraries_receive(tmp_path):
    from emotion_dpo.dpo_train import build_dpo_config
    from emotion_dpo.generation import checked_generation_config

    train = write(tmp_path, {"base_model": "b", "adapter": "a", "dataset": "d", "output_dir": str(tmp_path / "out"),
                             "wandb": {"mode": "disabled"}, "dpo": {"_comment": "why beta 0.2", "beta": 0.2}})
    assert build_dpo_config(load_config(TrainConfig, train)).beta == 0.2
    generate = write(tmp_path, {**MINIMAL, "generation": {"_comment": "the reference's", "max_new_tokens": 4}}, "g.json")
    generation = load_config(GenerateConfig, generate).generation
    assert checked_generation_config(generation, str(generate)).max_new_tokens == 4


def test_evaluate_uses_the_held_out_test_split_unless_told_otherwise(tmp_path):
    path = write(tmp_path, {**MINIMAL, "dpo_adapter": "outputs/dpo/final_adapter"})
    assert load_config(EvaluateConfig, path).dataset_split == "test"
    assert load_config(GenerateConfig, write(tmp_path, MINIMAL, "g.json")).dataset_split == "train+validation"


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


# ---------------------------------------------------------------- issue 14: checks found missing by trying to break it


def test_an_unknown_top_level_key_does_not_hide_a_section_problem(tmp_path):
    path = write(tmp_path, MINIMAL)
    lines = error_of(path, ["max_retires=2", "generation.temperature=-1"]).splitlines()
    assert lines == [
        f"{path}: key max_retires: unknown key (did you mean 'max_retries'?)",
        f"{path}: key generation.temperature: expected a value > 0, got -1",
    ]


def test_a_key_failing_its_own_check_does_not_hide_a_cross_field_rule(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert error_of(path, ["seed=-1", "length_min=30", "length_max=10"]).splitlines() == [
        f"{path}: key seed: expected a value >= 0, got -1",
        f"{path}: key length_max: expected a value > length_min (30), got 10",
    ]


@pytest.mark.parametrize("cls, override, message", [
    (GenerateConfig, "temperature=2", "key temperature: unknown key (it belongs in section 'generation': "
                                      "generation.temperature)"),
    (TrainConfig, "beta=0.2", "key beta: unknown key (it belongs in section 'dpo': dpo.beta)"),
    (GenerateConfig, "wandb.top_k=3", "key wandb.top_k: unknown key (it belongs in section 'generation': "
                                      "generation.top_k)"),
    (GenerateConfig, "generation.n_candidates=3", "key generation.n_candidates: unknown key (it belongs at the top "
                                                  "level)"),
])
def test_a_misplaced_key_points_to_where_it_belongs(tmp_path, cls, override, message):
    path = write(tmp_path, TRAIN_MINIMAL if cls is TrainConfig else MINIMAL)
    with pytest.raises(PipelineError) as caught:
        load_config(cls, path, [override])
    assert str(caught.value) == f"{path}: {message}"


@pytest.mark.parametrize("cls, override, message", [
    (GenerateConfig, "target_score_range=NaN", "key target_score_range: expected a finite number, got NaN"),
    (GenerateConfig, "min_chosen_score=-Infinity", "key min_chosen_score: expected a finite number, got -Infinity"),
    (GenerateConfig, "reward_weights=[NaN, 0.25, 0.35]", "key reward_weights: expected a finite number, got NaN"),
    (GenerateConfig, "generation.top_p=NaN", "key generation.top_p: expected a finite number, got NaN"),
    (TrainConfig, "dpo.learning_rate=Infinity", "key dpo.learning_rate: expected a finite number, got Infinity"),
    (TrainConfig, "eval_fraction=NaN", "key eval_fraction: expected a finite number, got NaN"),
])
def test_nan_and_infinity_are_refused_from_set(tmp_path, cls, override, message):
    path = write(tmp_path, TRAIN_MINIMAL if cls is TrainConfig else MINIMAL)
    with pytest.raises(PipelineError) as caught:
        load_config(cls, path, [override])
    assert str(caught.value) == f"{path}: {message}"


def test_nan_and_infinity_are_refused_in_a_file(tmp_path):
    # Python's json reads these literals; a NaN weight gave NaN scores for a whole run, then a crash in the plot
    path = write(tmp_path, '{"base_model": "b", "adapter": "a", "dataset": "d", "emotion_classifier": "e", '
                           '"gibberish_detector": "g", "reward_weights": [0.4, NaN, 0.35], "reward_bias": Infinity}')
    assert error_of(path).splitlines() == [f"{path}: key reward_weights: expected a finite number, got NaN",
                                           f"{path}: key reward_bias: expected a finite number, got Infinity"]


@pytest.mark.parametrize("cls, overrides, message", [
    # each was accepted and gave 0 pairs (or every reply "cut off")
    (GenerateConfig, ["length_min=30", "length_max=10"], "key length_max: expected a value > length_min (30), got 10"),
    (GenerateConfig, ["length_min=10", "length_max=10"], "key length_max: expected a value > length_min (10), got 10"),
    (GenerateConfig, ["chosen_endings=[]"], "key chosen_endings: expected at least 1 item(s), got []"),
    (EvaluateConfig, ["complete_endings=[]"], "key complete_endings: expected at least 1 item(s), got []"),
    (GenerateConfig, ["length_min=0"], "key length_min: expected a value > 0, got 0"),
])
def test_settings_that_leave_no_pair_possible_are_refused(tmp_path, cls, overrides, message):
    path = write(tmp_path, {**MINIMAL, "dpo_adapter": "x"} if cls is EvaluateConfig else MINIMAL)
    with pytest.raises(PipelineError) as caught:
        load_config(cls, path, overrides)
    assert str(caught.value) == f"{path}: {message}"


@pytest.mark.parametrize("override, message", [
    # TRL checks the loss type only at the first training step, after the models load
    ('dpo.loss_type=sigmoidd', "key dpo.loss_type: expected one of TRL's loss types sigmoid, hinge, ipo, exo_pair, "
                               "nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, "
                               "discopop, sft, sigmoid_norm, got \"sigmoidd\" (did you mean 'sigmoid'?)"),
    ('dpo.loss_type=["sigmoid", "hing"]', "key dpo.loss_type: expected one of TRL's loss types"),
    ("dpo.save_steps=-1", "key dpo.save_steps: expected a value > 0, got -1"),
    ("dpo.save_steps=0", "key dpo.save_steps: expected a value > 0, got 0"),
])
def test_dpo_loss_type_and_save_steps_are_checked(tmp_path, override, message):
    path = write(tmp_path, TRAIN_MINIMAL)
    with pytest.raises(PipelineError) as caught:
        load_config(TrainConfig, path, [override])
    assert str(caught.value).startswith(f"{path}: {message}")


def test_every_trl_loss_type_is_accepted(tmp_path):
    # the names TRL's DPOTrainer.loss dispatches on, copied from trl 1.14.2 trainer/dpo_trainer.py
    names = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
    assert load_config(TrainConfig, write(tmp_path, TRAIN_MINIMAL), [f"dpo.loss_type={json.dumps(names)}"]).dpo[
        "loss_type"] == names


@pytest.mark.parametrize("override, message", [
    ("seed=true", "key seed: expected an integer, got true"),
    ("reward_bias=false", "key reward_bias: expected a number, got false"),
    ('n_candidates="6"', 'key n_candidates: expected an integer, got "6"'),
    ('reward_bias="0.1"', 'key reward_bias: expected a number, got "0.1"'),
    ("generation.top_k=true", "key generation.top_k: expected an integer, got true"),
])
def test_no_bool_or_string_for_a_number(tmp_path, override, message):
    path = write(tmp_path, MINIMAL)
    assert error_of(path, [override]) == f"{path}: {message}"


def test_a_whole_number_is_taken_for_a_float(tmp_path):
    cfg = load_config(GenerateConfig, write(tmp_path, MINIMAL), ["reward_bias=1", "generation.temperature=3"])
    assert cfg.reward_bias == 1.0 and type(cfg.reward_bias) is float
    assert cfg.generation["temperature"] == 3.0 and type(cfg.generation["temperature"]) is float


def test_a_comment_in_generation_does_not_block_resuming_a_run(tmp_path):
    from emotion_dpo.generate import prepare_output_dir
    from emotion_dpo.dataset import settle
    from emotion_dpo.prompts import Prompt
    from emotion_dpo.selection import ScoredReply

    out = tmp_path / "run"
    path = write(tmp_path, {**MINIMAL, "output_dir": str(out)})
    cfg = load_config(GenerateConfig, path)
    prepare_output_dir(cfg, fresh=False).release()
    reply = ScoredReply("fine .", "neutral", 0.9, "clean", 0.9, 6.0, 0.0, 0.0, 9.0, 3.0)
    settled = settle(Prompt(0, 0, "happiness", [], "<s> hi", [1, 7]), [[reply, reply]], cfg, final=True, eos_token_id=2)
    (out / "journal.rank0.jsonl").write_text(json.dumps(settled) + "\n")  # one settled prompt: a run to keep
    commented = write(tmp_path, {**MINIMAL, "output_dir": str(out), "_comment": "top",
                                 "generation": {"_comment": "the reference's sampling"}}, "commented.json")
    prepare_output_dir(load_config(GenerateConfig, commented), fresh=False).release()  # no "another config"
    with pytest.raises(PipelineError, match="these keys differ:\n  n_candidates: 6 -> 3"):  # a real change still is
        prepare_output_dir(load_config(GenerateConfig, path, ["n_candidates=3"]), fresh=False)


def test_a_comment_in_dpo_is_no_config_change_on_resume(tmp_path):
    import warnings

    from emotion_dpo.config import save_config
    from emotion_dpo.dpo_train import CONFIG_NAME, check_config_changes

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    path = write(tmp_path, TRAIN_MINIMAL)
    save_config(load_config(TrainConfig, path), checkpoint, CONFIG_NAME)
    commented = load_config(TrainConfig, path, ['dpo._comment="why beta 0.1"'])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_config_changes(commented, checkpoint)
    with pytest.warns(UserWarning, match="dpo.beta: 0.1 -> 0.2"):
        check_config_changes(load_config(TrainConfig, path, ["dpo.beta=0.2"]), checkpoint)


def test_help_lists_every_key_with_its_help():
    import pydoc

    text = pydoc.render_doc(TrainConfig, renderer=pydoc.plaintext)
    for key, help_text in [("dpo", "passed to trl.DPOConfig as it is"), ("seed", "seed for sampling and data order"),
                           ("train_modules_to_save", "false: train the LoRA matrices only"),
                           ("wandb", "wandb settings"), ("base_model", "Hub id or local folder of the base LLM")]:
        assert f"{key}: " in text and help_text in text


# The reference's real run, hermeschen1116/emotion-chat-bot at commit 12285059f1013d43b0f2b619d637197b0c9dad3f:
# src/scripts/response_generator/arguments/best_of_n.json ("num_turns_history": 2, "target_score_range": 4,
# "n_best_of": 6, "min_new_tokens": 5, "max_new_tokens": 20, "repetition_penalty": 1.5), and
# src/scripts/response_generator/data_process_dpo.py: gen_kwargs ("top_k": 5, "top_p": 1.0, "temperature": 2.0:
# written in the code; best_of_n.json's "top_k": 0.0 is never read), `if fail_counter <= 30` (a prompt is given up
# after 1 + 30 rounds), emotion_labels; src/scripts/response_generator/fine_tune_dpo.py: DPOConfig(beta=0.1,
# num_train_epochs=3, gradient_checkpointing=True).
REFERENCE_PROMPTS = {"num_turns_history": 2}
REFERENCE_SELECTION = {"target_score_range": 4, "n_candidates": 6, "max_retries": 30}
REFERENCE_SAMPLING = {"top_k": 5, "top_p": 1.0, "temperature": 2.0, "repetition_penalty": 1.5, "min_new_tokens": 5,
                      "max_new_tokens": 20}
REFERENCE_LABELS = ["neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"]
REFERENCE_DPO = {"beta": 0.1, "num_train_epochs": 3, "gradient_checkpointing": True}


def shipped(name):
    return json.loads((ROOT / "args" / name).read_text())


def test_the_real_generate_config_has_the_reference_runs_settings():
    config = shipped("generate_preferences_arg.json")
    for key, value in {**REFERENCE_PROMPTS, **REFERENCE_SELECTION}.items():
        assert config[key] == value, key
    assert {k: config["generation"][k] for k in REFERENCE_SAMPLING} == REFERENCE_SAMPLING
    assert config["generation"]["do_sample"] is True  # the reference's "False" is a string; it needs N distinct replies
    assert config["emotion_labels"] == REFERENCE_LABELS


def test_the_real_evaluate_config_builds_prompts_and_samples_as_the_generate_config():
    config = shipped("evaluate_arg.json")
    for key, value in REFERENCE_PROMPTS.items():
        assert config[key] == value, key
    assert {k: config["generation"][k] for k in REFERENCE_SAMPLING} == REFERENCE_SAMPLING
    assert config["emotion_labels"] == REFERENCE_LABELS


def test_the_real_dpo_config_has_the_reference_runs_settings():
    config = shipped("dpo_arg.json")
    assert {k: config["dpo"][k] for k in REFERENCE_DPO} == REFERENCE_DPO


def test_the_defaults_are_the_reference_runs_settings(tmp_path):
    generate = load_config(GenerateConfig, write(tmp_path, MINIMAL))
    assert (generate.num_turns_history, generate.target_score_range, generate.n_candidates, generate.max_retries) == (
        2, 4, 6, 30)
    assert {k: generate.generation[k] for k in REFERENCE_SAMPLING} == REFERENCE_SAMPLING
    assert generate.emotion_labels == REFERENCE_LABELS
    train = load_config(TrainConfig, write(tmp_path, {"base_model": "b", "adapter": "a", "dataset": "d"}, "t.json"))
    assert {k: train.dpo[k] for k in REFERENCE_DPO} == REFERENCE_DPO


@pytest.mark.parametrize("labels", [["a", "A"], ["only"], ["a", " "]])
def test_emotion_labels_must_be_distinct_names(tmp_path, labels):
    path = write(tmp_path, {**MINIMAL, "emotion_labels": labels})
    assert error_of(path) == (f"{path}: key emotion_labels: expected distinct non-empty names (case-insensitively), "
                              f"one per classifier output, got {json.dumps(labels)}")


# ---------------------------------------------------------------- issue 22: every problem before anything loads, named


def test_the_dpo_section_is_built_as_trl_dpoconfig_and_every_problem_named_at_once(tmp_path):
    # each was reported only after the dataset loaded, as "key dpo: ...", one at a time; -5 read "must be an integer"
    path = write(tmp_path, TRAIN_MINIMAL)
    with pytest.raises(PipelineError) as caught:
        load_config(TrainConfig, path, ["dpo.optim=sgdx", "dpo.lr_scheduler_type=zigzag", "dpo.eval_strategy=sometimes",
                                        "dpo.warmup_steps=-5"])
    lines = {line.split(": ")[1]: line for line in str(caught.value).splitlines()}
    assert len(lines) == 4 and all(line.startswith(f"{path}: ") for line in lines.values())
    assert lines["key dpo.warmup_steps"] == f"{path}: key dpo.warmup_steps: expected a value >= 0, got -5"
    # TRL's own words (transformers' enums list the valid names)
    assert "sgdx is not a valid OptimizerNames" in lines["key dpo.optim"] and "'adamw_torch'" in lines["key dpo.optim"]
    assert "zigzag is not a valid SchedulerType" in lines["key dpo.lr_scheduler_type"]
    assert "sometimes is not a valid IntervalStrategy" in lines["key dpo.eval_strategy"]


def test_a_dpo_problem_between_keys_names_them_in_one_line(tmp_path):
    path = write(tmp_path, TRAIN_MINIMAL)
    with pytest.raises(PipelineError) as caught:  # TRL refuses this pair only when the trainer's arguments are built
        load_config(TrainConfig, path, ["dpo.load_best_model_at_end=true", "dpo.eval_strategy=no"])
    assert str(caught.value).startswith(f"{path}: key dpo.load_best_model_at_end: --load_best_model_at_end requires "
                                        "the save and eval strategy to match")
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("override, message", [
    ('generation.max_new_tokens="20"', 'key generation.max_new_tokens: expected an integer, got "20"'),
    ("generation.top_p=2.0", "key generation.top_p: expected a value <= 1, got 2.0"),
    ("generation.top_p=0", "key generation.top_p: expected a value > 0, got 0"),
    ("generation.top_k=-1", "key generation.top_k: expected a value >= 0, got -1"),
    ("generation.min_p=1.5", "key generation.min_p: expected a value <= 1, got 1.5"),
    ("generation.repetition_penalty=0", "key generation.repetition_penalty: expected a value > 0, got 0"),
    ("generation.max_new_tokens=0", "key generation.max_new_tokens: expected a value >= 1, got 0"),
    ('generation.do_sample="False"', 'key generation.do_sample: expected true or false, got "False"'),
])
def test_generation_types_then_ranges(tmp_path, override, message):
    # "20" gave "'<=' not supported between instances of 'str' and 'int'"; top_p 2.0 was accepted
    path = write(tmp_path, MINIMAL)
    assert error_of(path, [override]) == f"{path}: {message}"


def test_generation_problems_all_at_once_with_the_library_checking_the_rest(tmp_path):
    path = write(tmp_path, MINIMAL)
    lines = error_of(path, ['generation.max_new_tokens="20"', "generation.top_p=2.0",
                            "generation.do_sample=false"]).splitlines()
    assert lines[:2] == [f'{path}: key generation.max_new_tokens: expected an integer, got "20"',
                         f"{path}: key generation.top_p: expected a value <= 1, got 2.0"]
    # then transformers' own check (GenerationConfig.validate) of the keys that passed, a failed one at its default:
    # the reference's temperature and top_k sample, and sampling is off
    assert [line.split(": ")[1] for line in lines[2:]] == ["key generation.temperature", "key generation.top_k"]
    assert all("`do_sample` is not set to `True`" in line for line in lines[2:])


def test_a_key_given_twice_in_the_file_is_refused_with_its_dotted_key(tmp_path):
    path = write(tmp_path, '{"base_model": "b", "adapter": "a", "dataset": "d", "emotion_classifier": "e", '
                           '"gibberish_detector": "g", "seed": 1, "seed": 2, "generation": {"top_k": 1, "top_k": 2}}')
    assert error_of(path).splitlines() == [
        f"{path}: key seed: given more than once (JSON would keep only the last one)",
        f"{path}: key generation.top_k: given more than once (JSON would keep only the last one)"]


def test_a_key_given_twice_is_reported_together_with_the_files_other_problems(tmp_path):
    path = write(tmp_path, '{"base_model": "b", "adapter": "a", "dataset": "d", "emotion_classifier": "e", '
                           '"gibberish_detector": "g", "seed": 1, "seed": 2, "max_retires": 3, "n_candidates": "six"}')
    assert error_of(path).splitlines() == [
        f"{path}: key seed: given more than once (JSON would keep only the last one)",
        f"{path}: key max_retires: unknown key (did you mean 'max_retries'?)",
        f'{path}: key n_candidates: expected an integer, got "six"']


@pytest.mark.parametrize("cls", [GenerateConfig, TrainConfig, EvaluateConfig])
def test_an_empty_output_dir_is_refused(tmp_path, cls):
    path = write(tmp_path, {**MINIMAL, "dpo_adapter": "x"} if cls is EvaluateConfig else
                 TRAIN_MINIMAL if cls is TrainConfig else MINIMAL)
    with pytest.raises(PipelineError) as caught:  # it was taken as "." (the current folder)
        load_config(cls, path, ["output_dir="])
    assert str(caught.value) == f'{path}: key output_dir: expected at least 1 character(s), got ""'


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"base_model": "caf\xe9"}')
    assert error_of(path) == f"{path}: not UTF-8 text (byte 0xe9 at offset 19); save the file as UTF-8"


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": ' * 100_000 + "1" + "}" * 100_000])
def test_a_config_nested_100k_levels_deep_is_one_line(tmp_path, text):
    assert error_of(write(tmp_path, text)) == f"{tmp_path / 'cfg.json'}: nested too deeply to be a config"


def test_a_set_value_nested_100k_levels_deep_is_one_line(tmp_path):
    assert error_of(write(tmp_path, MINIMAL), ["seed=" + "[" * 100_000 + "]" * 100_000]) == (
        "--set seed: the value is nested too deeply to be a setting")


@pytest.mark.parametrize("script", ["generate_preferences.py", "evaluate.py"])
def test_the_scripts_say_one_line_for_a_file_that_is_not_utf8_or_too_deep(tmp_path, script):
    for name, content in [("latin1.json", b'{"base_model": "caf\xe9"}'),
                          ("deep.json", b"[" * 100_000 + b"]" * 100_000)]:
        path = tmp_path / name
        path.write_bytes(content)
        result = subprocess.run([sys.executable, str(ROOT / script), "--config", str(path)],
                                capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [f"error: {path}: " + (
            "not UTF-8 text (byte 0xe9 at offset 19); save the file as UTF-8" if name == "latin1.json"
            else "nested too deeply to be a config")]


# ---------------------------------------------------------------- issue 20: one home for the resume-safe keys


def test_the_pipeline_lets_a_finished_stage_differ_in_the_keys_its_script_resumes_with(tmp_path):
    """run_pipeline and each script read one list: a key a script takes on resume because it changes nothing the
    run makes is one the pipeline takes on a finished stage. The pipeline's DPO list lacked dpo.eval_strategy."""
    from emotion_dpo import pipeline

    minimal = {pipeline.GENERATE: MINIMAL, pipeline.DPO: TRAIN_MINIMAL,
               pipeline.EVALUATE: {**MINIMAL, "dpo_adapter": "x"}}
    changed_values = {"output_dir": "elsewhere", "wandb": {"mode": "disabled"}, "batch_prompts": 3,
                      "classifier_batch_size": 3, "push_to_hub": "me/data", "resume_from_checkpoint": True,
                      "dpo.logging_steps": 3, "dpo.save_steps": 7, "dpo.save_total_limit": 1,
                      "dpo.per_device_eval_batch_size": 1, "dpo.eval_strategy": "no"}
    for kind, data in minimal.items():
        cls = getattr(pipeline.config_module, kind.config_class)
        path = write(tmp_path, data, f"{kind.name}.json")
        saved = load_config(cls, path).model_dump()
        for key in cls.unchanged_results:
            new = load_config(cls, path, [f"{key}={json.dumps(changed_values[key])}"])
            stage = pipeline.Stage(kind, 1, tmp_path / kind.folder, str(path), [], new.model_dump())
            pipeline.refuse_changed(stage, saved, "finished")  # no error: the key changes nothing it made
    # the one key a script resumes with that a finished stage may not take: more prompts add to generate's journal,
    # while a finished stage's dataset holds the number it was run with
    assert GenerateConfig.resumable_changes - GenerateConfig.unchanged_results == {"num_prompts"}
    assert TrainConfig.resumable_changes == TrainConfig.unchanged_results
    assert "dpo.eval_strategy" in pipeline.DPO.unchanged_when_finished


@pytest.mark.parametrize("cls, key, base", [(GenerateConfig, "chosen_endings", MINIMAL),
                                            (EvaluateConfig, "complete_endings", {**MINIMAL, "dpo_adapter": "x"})])
def test_endings_are_single_characters_as_the_reference_compares_them(tmp_path, cls, key, base):
    # hermeschen1116/emotion-chat-bot@1228505, src/scripts/response_generator/data_process_dpo.py:
    # `chosen.strip(" ")[-1:] not in ["!", ".", "?"]`: a reply's last character; "..." could never match
    path = write(tmp_path, {**base, key: ["!", "...", "?!"]})
    with pytest.raises(PipelineError) as refused:
        load_config(cls, path)
    assert str(refused.value) == (f"{path}: key {key}: expected single characters (a reply's last character is "
                                  'compared), got ["...", "?!"]')
    assert getattr(load_config(cls, write(tmp_path, {**base, key: ["!", "."]})), key) == ["!", "."]
