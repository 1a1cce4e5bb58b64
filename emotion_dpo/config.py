"""Strict, typed configs loaded from JSON: defaults -> file -> `--set key=value` overrides.

Every problem (unknown key, wrong type, out-of-range value, broken cross-field rule) is collected and
reported at once, naming the file and the key, before any model or dataset is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from .errors import PipelineError

_MISSING = dataclasses.MISSING


def option(default=_MISSING, help: str = "", *, low=None, high=None, factory=None):
    """A config field with its help text and an inclusive numeric range."""
    meta = {"help": help, "low": low, "high": high}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(kw_only=True)
class WandbConfig:
    project: str = option("emotion-dpo", "wandb project")
    group: str | None = option(None, "wandb group (e.g. one experiment's runs)")
    job_type: str | None = option(None, "wandb job_type; defaults to the script's stage")
    notes: str | None = option(None, "wandb notes")
    mode: Literal["offline", "online", "disabled"] = option(
        "offline", "offline needs no account; sync later with `wandb sync`"
    )


def closest(name: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(type_name(a) for a in typing.get_args(tp)))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):  # transformers' OptimizerNames etc. are named by strings
        return "a string"
    if origin is dict:
        return "an object"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def check_type(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:  # by type too: 1 == True, but `"use_unsloth": 1` is no choice the key offers
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(check_type(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _build(cls, data: dict, where: str, problems: list[str]):
    """Build dataclass `cls` from `data`, appending every problem found to `problems`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields and not key.startswith("_"):  # "_comment" keys are allowed
            problems.append(f"{where}{key}: unknown key{closest(key, fields)}")
    values = {}
    for name, field in fields.items():
        key = f"{where}{name}"
        if name not in data:
            if field.default is _MISSING and field.default_factory is _MISSING:
                problems.append(f"{key}: required key is missing ({field.metadata.get('help', '')})")
            continue
        value, tp = data[name], hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{key}: expected an object, got {json.dumps(value)}")
                continue
            values[name] = _build(tp, value, f"{key}.", problems)
            continue
        if not check_type(value, tp):
            problems.append(f"{key}: expected {type_name(tp)}, got {json.dumps(value)}")
            continue
        if typing.get_origin(tp) is None and tp is dict and field.default_factory is not _MISSING:
            value = {**field.default_factory(), **value}  # a section's keys override its defaults one by one
        if tp is float or tp == float | None:
            value = float(value) if value is not None else None
        low, high = field.metadata.get("low"), field.metadata.get("high")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if low is not None and value < low:
                problems.append(f"{key}: expected a value >= {low}, got {value}")
                continue
            if high is not None and value > high:
                problems.append(f"{key}: expected a value <= {high}, got {value}")
                continue
        values[name] = value
    missing = [name for name, field in fields.items()
               if name not in data and field.default is _MISSING and field.default_factory is _MISSING]
    try:  # missing required keys (already reported) get placeholders, so check() still reports the rest at once
        obj = cls(**values, **dict.fromkeys(missing))
    except TypeError:
        return None
    check = getattr(obj, "check", None)
    if check is not None and not any(p.startswith(where) for p in problems if where):
        problems.extend(f"{where}{p}" for p in check())
    return None if missing else obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`dpo.beta=0.2` -> (["dpo", "beta"], 0.2); values are JSON, else plain strings."""
    if "=" not in text:
        raise PipelineError(f"--set {text}: expected KEY=VALUE, e.g. --set num_prompts=64")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: is a folder, expected a JSON config file") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object at the top level")
    return data


def load_config(cls, path: str | Path, overrides: typing.Sequence[str] = ()):
    """Load `cls` from the JSON file at `path` with `--set` overrides; raise one PipelineError listing all problems."""
    data = read_json(path)
    for text in overrides:
        keys, value = parse_override(text)
        target = data
        for k in keys[:-1]:
            target = target.setdefault(k, {})
            if not isinstance(target, dict):
                raise PipelineError(f"--set {text}: '{k}' is not a section")
        target[keys[-1]] = value
    problems: list[str] = []
    config = _build(cls, data, "", problems)
    if problems:
        raise PipelineError("\n".join(f"{path}: key {p}" for p in problems))
    config.source = str(path)
    return config


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, folder: str | Path, name: str = "config.json") -> Path:
    from .files import write_text_atomic  # whole or not at all: a torn config.json would block every later start

    return write_text_atomic(Path(folder) / name, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}: {json.dumps(a) if a is not _MISSING else '(absent)'} -> "
                        f"{json.dumps(b) if b is not _MISSING else '(absent)'}")
    return keys


def differing_keys_except(old: dict, new: dict, allowed: typing.Iterable[str]) -> list[str]:
    """differing_keys, less those at or under an allowed key ("wandb" covers "wandb.mode"; "dpo.save_steps")."""
    return [k for k in differing_keys(old, new)
            if not any(k.startswith(f"{key}:") or k.startswith(f"{key}.") for key in allowed)]


def check_section_keys(section: dict, valid: typing.Iterable[str], where: str) -> list[str]:
    """Unknown keys of a section that a library class (GenerationConfig, DPOConfig) will receive."""
    valid = set(valid)
    return [f"{where}.{k}: unknown key{closest(k, valid)}" for k in section if k not in valid and not k.startswith("_")]


def without_comments(section: dict) -> dict:
    """A section as the library receives it: "_comment" keys (allowed everywhere) left out."""
    return {k: v for k, v in section.items() if not k.startswith("_")}


def check_section_types(section: dict, config_class, where: str) -> list[str]:
    """Values of a section against the type hints of the dataclass that will receive it: TRL takes
    `learning_rate: "fast"` without a word and fails steps later, deep in the optimizer."""
    hints = typing.get_type_hints(config_class)
    problems = []
    for key, value in section.items():
        tp = hints.get(key)
        if tp is None:
            continue  # unknown keys are check_section_keys' report
        ok = check_type(value, tp)
        if not ok and typing.get_origin(tp) is list:  # HF configs take one item for a list ("loss_type": "ipo")
            ok = check_type(value, typing.get_args(tp)[0])
        if not ok:
            problems.append(f"{where}.{key}: expected {type_name(tp)}, got {json.dumps(value)}")
    return problems


# ---------------------------------------------------------------- the scripts' configs

UseUnsloth = Literal["auto", True, False]


@dataclasses.dataclass(kw_only=True)
class GeneratorSource:
    """Where the response generator comes from: a (4-bit) base model plus the SFT LoRA adapter."""

    base_model: str = option(help="Hub id or local folder of the base LLM, e.g. unsloth/llama-2-7b-bnb-4bit")
    adapter: str = option(help="Hub id or local folder of the SFT LoRA adapter")
    chat_template: str = option("args/chat_template.json", "the chat template file shared by every script")
    load_in_4bit: bool = option(True, "load the base in 4-bit NF4 (bitsandbytes) to fit a 24 GB GPU")
    use_unsloth: UseUnsloth = option(
        "auto", '"auto": unsloth where it imports and a GPU is present; true: required; false: never'
    )
    seed: int = option(42, "seed for sampling and data order", low=0)
    wandb: WandbConfig = option(factory=WandbConfig, help="wandb settings")


@dataclasses.dataclass(kw_only=True)
class PromptSource:
    dataset: str = option(help="Hub id, local save_to_disk folder, or JSONL of dialogues (column 'prompt')")
    dataset_split: str = option("train+validation", "split expression, e.g. train+validation")
    system_prompt: str = option("", "system prompt prepended to every dialogue window")
    num_turns_history: int = option(1, "user/assistant turn pairs of history before the target pair", low=0)
    all_windows: bool = option(False, "yield every window of each dialogue, not only its last one")
    num_prompts: int | None = option(None, "use the first N prompts (null: all)", low=1)


@dataclasses.dataclass(kw_only=True)
class RewardConfig:
    emotion_classifier: str = option(help="Hub id or folder of the emotion text classifier")
    gibberish_detector: str = option(help="Hub id or folder of the gibberish detector")
    reward_weights: list[float] = option(
        factory=lambda: [0.4, 0.25, 0.35], help="weights of [emotion, length, gibberish] rewards"
    )
    reward_bias: float = option(0.001, "added to the weighted sum")
    length_unit: Literal["characters", "words", "tokens"] = option("characters", "unit of reply length")
    length_min: float = option(5, "length the reward measures 'too short' against", low=0)
    length_max: float = option(20, "length the reward measures 'too long' against", low=0)
    classifier_batch_size: int = option(64, "texts per classifier call", low=1)

    def check(self) -> list[str]:
        problems = []
        if len(self.reward_weights) != 3:
            problems.append(
                f"reward_weights: expected 3 numbers [emotion, length, gibberish], got {len(self.reward_weights)}"
            )
        if self.length_min <= 0 or self.length_max <= 0:
            problems.append("length_min/length_max: must be > 0 (they divide)")
        return problems


@dataclasses.dataclass(kw_only=True)
class SelectionConfig:
    target_score_range: float = option(5.0, "a round fails if best - worst total is below this", low=0)
    min_chosen_score: float = option(8.0, "a round fails if the best total is below this")
    min_chosen_gibberish_confidence: float = option(0.8, "chosen must be 'clean' with at least this", low=0, high=1)
    chosen_endings: list[str] = option(factory=lambda: ["!", ".", "?"], help="chosen must end in one of these")
    max_retries: int = option(30, "failed rounds regenerated before a prompt is given up", low=0)


# The reference project's sampling settings.
REFERENCE_GENERATION = {"do_sample": True, "min_new_tokens": 5, "max_new_tokens": 20, "repetition_penalty": 1.5,
                        "top_k": 5, "top_p": 1.0, "temperature": 2.0}


@dataclasses.dataclass(kw_only=True)
class GenerateConfig(GeneratorSource, PromptSource, RewardConfig, SelectionConfig):
    output_dir: str = option("outputs/preferences", "run folder: journal, dataset, statistics")
    n_candidates: int = option(6, "replies sampled per prompt per round", low=2)
    batch_prompts: int = option(16, "prompts per generate call (x n_candidates sequences)", low=1)
    generation: dict = option(
        factory=lambda: dict(REFERENCE_GENERATION),
        help="passed to transformers.GenerationConfig as it is",
    )
    push_to_hub: str | None = option(None, "Hub dataset id to push the final dataset to (null: don't)")

    def check(self) -> list[str]:
        from transformers import GenerationConfig

        problems = RewardConfig.check(self)
        problems += check_section_keys(self.generation, GenerationConfig().to_dict(), "generation")
        return problems


DPO_DEFAULTS = {
    # The reference's values ...
    "beta": 0.1, "num_train_epochs": 3, "gradient_checkpointing": True,
    # ... and settings that fit a 7B 4-bit model with two adapters on one 24 GB GPU.
    "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "gradient_accumulation_steps": 8,
    "learning_rate": 5e-6, "lr_scheduler_type": "cosine", "warmup_steps": 10, "max_length": 512,
    "logging_steps": 10, "save_steps": 100, "save_total_limit": 3, "eval_strategy": "epoch",
    "optim": "adamw_torch",
}


# (key, bound, strictly above): values of the dpo section that TRL accepts but that cannot train as meant
DPO_RANGES = [("beta", 0, True), ("learning_rate", 0, False), ("per_device_train_batch_size", 1, False),
              ("per_device_eval_batch_size", 1, False), ("gradient_accumulation_steps", 1, False),
              ("max_length", 1, False)]


@dataclasses.dataclass(kw_only=True)
class TrainConfig(GeneratorSource):
    dataset: str = option(help="preference data: Hub id, local save_to_disk folder, or JSONL "
                               "(columns prompt, chosen, rejected)")
    dataset_split: str = option("train", "split of a Hub dataset or DatasetDict folder")
    eval_fraction: float = option(0.05, "share of pairs held out for evaluation (0: none)", low=0, high=0.5)
    output_dir: str = option("outputs/dpo", "checkpoints, the final adapter, metrics")
    resume_from_checkpoint: bool | str | None = option(
        None, "true: the last checkpoint in output_dir; a path: that checkpoint"
    )
    train_modules_to_save: bool = option(
        True, "false: train the LoRA matrices only; the SFT adapter's modules_to_save (embedding and LM-head "
              "copies) stay as SFT left them and the reference shares them (no gradient, optimizer state or copy)"
    )
    dpo: dict = option(factory=lambda: dict(DPO_DEFAULTS), help="passed to trl.DPOConfig as it is")

    def check(self) -> list[str]:
        import trl

        valid = {f.name for f in dataclasses.fields(trl.DPOConfig) if f.init}
        problems = check_section_keys(self.dpo, valid, "dpo") + check_section_types(self.dpo, trl.DPOConfig, "dpo")
        for key, low, strict in DPO_RANGES:  # TRL checks none of these; a negative beta trains towards `rejected`
            value = self.dpo.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    value <= low if strict else value < low):
                problems.append(f"dpo.{key}: expected a value {'>' if strict else '>='} {low}, got {value}")
        if "output_dir" in self.dpo:
            problems.append("dpo.output_dir: set the top-level output_dir instead")
        if "report_to" in self.dpo:  # one switch for wandb: the wandb section
            problems.append('dpo.report_to: set wandb.mode instead ("disabled" turns wandb off)')
        return problems


@dataclasses.dataclass(kw_only=True)
class EvaluateConfig(GeneratorSource, PromptSource, RewardConfig):
    dpo_adapter: str = option(help="the DPO-trained adapter (fine_tune_dpo.py's output_dir/final_adapter)")
    # held-out prompts: generate_preferences' default (train+validation) would score the models on what DPO saw
    dataset_split: str = option("test", "split of held-out dialogues, never seen in SFT or DPO")
    include_base: bool = option(False, "also evaluate the base model with adapters disabled")
    output_dir: str = option("outputs/evaluation", "results.md, results.json, replies.jsonl, chart")
    batch_prompts: int = option(32, "prompts per generate call", low=1)
    generation: dict = option(
        factory=lambda: dict(REFERENCE_GENERATION),
        help="passed to transformers.GenerationConfig, identical for every model",
    )
    clean_confidence: float = option(0.8, "a reply is clean if the detector says 'clean' with this", low=0, high=1)
    complete_endings: list[str] = option(factory=lambda: ["!", ".", "?"], help="a reply ending otherwise is cut off")
    bootstrap_samples: int = option(2000, "resamples for the win-rate interval", low=100)

    def check(self) -> list[str]:
        from transformers import GenerationConfig

        problems = RewardConfig.check(self)
        problems += check_section_keys(self.generation, GenerationConfig().to_dict(), "generation")
        return problems
