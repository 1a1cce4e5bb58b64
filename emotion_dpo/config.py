"""Strict, typed configs loaded from JSON: defaults -> file -> `--set key=value` overrides.

The configs are pydantic models: strict types (no `true` for a number, no `"2"` for an integer; a whole number
is fine for a float), no NaN or Infinity, no unknown key (keys starting with "_" are comments, dropped).
Every problem (unknown key, wrong type, out-of-range value, broken cross-field rule) is collected and
reported at once, naming the file and the dotted key, before any model or dataset is touched.
"""

from __future__ import annotations

import difflib
import enum
import functools
import inspect
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, TypeAdapter,
                      ValidationError, model_validator)
from pydantic_core import PydanticCustomError, PydanticUndefined

from . import EMOTIONS
from .errors import PipelineError

STRICT = ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)


def without_comments(section: dict) -> dict:
    """A section as the library receives it: "_comment" keys (allowed everywhere) left out."""
    return {k: v for k, v in section.items() if not (isinstance(k, str) and k.startswith("_"))}


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
    if origin is dict or tp is dict or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return "an object"
    if tp is type(None):
        return "null"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def dumps(value) -> str:
    return json.dumps(value, default=str)


def number(value) -> str:
    """A number as the config wrote it: a float field's 1 reads 1.0 once loaded."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else dumps(value)


def is_finite(value) -> bool:
    """No NaN or ±Infinity anywhere in a JSON value (Python's json reads them, and they pass every comparison)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(is_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(is_finite(v) for v in value)
    return True


@functools.cache
def _adapter(tp) -> TypeAdapter:
    return TypeAdapter(tp, config=STRICT)


def value_problem(value, tp) -> str | None:
    """Why `value` is no `tp` under the configs' strict rule, or None. HF configs take one item for a list."""
    if not is_finite(value):
        return f"expected a finite number, got {dumps(value)}"
    for kind in (tp, *([typing.get_args(tp)[0]] if typing.get_origin(tp) is list else [])):
        try:
            _adapter(kind).validate_python(value)
            return None
        except ValidationError:
            pass
    return f"expected {type_name(tp)}, got {dumps(value)}"


def _problem(loc: tuple, value, text: str) -> dict:
    """A pydantic line error carrying our own message (section and cross-field checks)."""
    return {"type": PydanticCustomError("problem", "{text}", {"text": text}), "loc": loc, "input": value}


def _raise_if(errors: list[dict], title: str) -> None:
    if errors:
        raise ValidationError.from_exception_data(title, errors)


def choice(*values):
    """Literal[values], by type too: 1 == True, but `"use_unsloth": 1` is no choice the key offers."""
    def exact(value):
        if not any(value == v and type(value) is type(v) for v in values):
            raise ValueError("not one of the choices")
        return value
    return Annotated[Literal[values], BeforeValidator(exact)]


def option(default=PydanticUndefined, help: str = "", *, low=None, high=None, factory=None):
    """A key in one line, as declared before the configs moved onto pydantic: a Field with its help and inclusive
    range (`Field(..., description=..., ge=..., le=...)` is the same)."""
    if factory is not None:
        return Field(default_factory=factory, description=help, ge=low, le=high)
    return Field(default, description=help, ge=low, le=high)


class Section(BaseModel):
    """A config or one of its sections; see the module docstring for its rules."""

    model_config = ConfigDict(STRICT, extra="forbid")
    _source: str = PrivateAttr("")

    @model_validator(mode="before")
    @classmethod
    def _drop_comments(cls, data):
        return without_comments(data) if isinstance(data, dict) else data

    @classmethod
    def rule_problems(cls, values: dict) -> list[tuple[str, str]]:
        """(key, problem) of the cross-field rules: each class's `rules(values)`, a pure function of valid values
        (a key that failed its own check is absent, and the rules that read it are skipped)."""
        return [p for klass in reversed(cls.__mro__) if "rules" in vars(klass) for p in vars(klass)["rules"](values)]

    @model_validator(mode="after")
    def _cross_field_rules(self):
        _raise_if([_problem((k,), getattr(self, k), text) for k, text in self.rule_problems(vars(self))],
                  type(self).__name__)
        return self

    @property
    def source(self) -> str:
        """The config file it was loaded from (named in every later error)."""
        return self._source

    @source.setter
    def source(self, path: str) -> None:
        self._source = path

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs):  # help(cls) lists every key with its help
        super().__pydantic_init_subclass__(**kwargs)
        lines = []
        for name, field in cls.model_fields.items():
            default = ("required" if field.is_required()
                       else f"default {dumps(_plain(field.get_default(call_default_factory=True)))}")
            lines.append(f"  {name}: {type_name(field.annotation)}, {default}\n      {field.description}")
        cls.__doc__ = inspect.cleandoc(cls.__dict__.get("__doc__") or cls.__name__) + "\n\nKeys:\n" + "\n".join(lines)


def _plain(value):
    return value.model_dump() if isinstance(value, BaseModel) else value


class WandbConfig(Section):
    project: str = Field("emotion-dpo", description="wandb project")
    group: str | None = Field(None, description="wandb group (e.g. one experiment's runs)")
    job_type: str | None = Field(None, description="wandb job_type; defaults to the script's stage")
    notes: str | None = Field(None, description="wandb notes")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline needs no account; sync later with `wandb sync`")


# ---------------------------------------------------------------- sections passed to a library as they are

# The reference project's sampling settings.
REFERENCE_GENERATION = {"do_sample": True, "min_new_tokens": 5, "max_new_tokens": 20, "repetition_penalty": 1.5,
                        "top_k": 5, "top_p": 1.0, "temperature": 2.0}
# GenerationConfig keeps these as given; generate's logits processors take floats (int 2 fails) and ints only.
GENERATION_NUMBERS = {"temperature": float, "top_p": float, "repetition_penalty": float, "min_p": float,
                      "typical_p": float, "top_k": int,
                      # the reference's code passed do_sample "False", a string, truthy: only true or false is taken
                      "do_sample": bool}


@functools.cache
def generation_keys() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict())


def generation_config(settings: dict):
    """(transformers.GenerationConfig or None, [(dotted key, problem)]) for a `generation` section.

    `validate()` leaves temperature, top_k, top_p, repetition_penalty, min_p and typical_p to the logits
    processors that `generate` builds, after the models have loaded (a negative temperature passed it); they are
    built here under generate's own conditions, so a bad value fails at once, named."""
    from transformers import GenerationConfig
    from transformers.generation import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                         TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

    settings, problems = without_comments(settings), []
    for key, kind in GENERATION_NUMBERS.items():
        if settings.get(key) is not None:
            if problem := value_problem(settings[key], kind):
                problems.append((f"generation.{key}", problem))
            else:
                settings[key] = kind(settings[key])  # "temperature": 2 in JSON is 2.0
    if problems:
        return None, problems
    try:
        config = GenerationConfig(**settings)
        config.validate(strict=True)
    except (ValueError, TypeError) as e:
        return None, [("generation", str(e))]
    sampling = config.do_sample
    processors = [  # (key, processor, whether generate builds it)
        ("repetition_penalty", RepetitionPenaltyLogitsProcessor, config.repetition_penalty not in (None, 1.0)),
        ("temperature", TemperatureLogitsWarper, sampling and config.temperature not in (None, 1.0)),
        ("top_k", TopKLogitsWarper, sampling and config.top_k not in (None, 0)),
        ("top_p", TopPLogitsWarper, sampling and config.top_p is not None and config.top_p < 1.0),
        ("min_p", MinPLogitsWarper, sampling and config.min_p is not None),
        ("typical_p", TypicalLogitsWarper, sampling and config.typical_p is not None and config.typical_p < 1.0),
    ]
    for key, processor, built in processors:
        try:
            if built:
                processor(getattr(config, key))
        except (ValueError, TypeError) as e:
            problems.append((f"generation.{key}", str(e)))
    return (None if problems else config), problems


def _checked_generation(section: dict) -> dict:
    """The generation section over the reference's settings, key by key; checked against GenerationConfig."""
    section = {**REFERENCE_GENERATION, **without_comments(section)}
    errors = [{"type": "extra_forbidden", "loc": (k,), "input": v} for k, v in section.items()
              if k not in generation_keys()]
    errors += [_problem((k,), v, f"expected a finite number, got {dumps(v)}")
               for k, v in section.items() if not is_finite(v)]
    if not errors:
        _, problems = generation_config(section)
        errors = [_problem(tuple(key.split(".")[1:]), section.get(key.split(".")[-1]), text) for key, text in problems]
    _raise_if(errors, "generation")
    return {k: GENERATION_NUMBERS[k](v) if k in GENERATION_NUMBERS and v is not None else v for k, v in section.items()}


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
              ("max_length", 1, False), ("save_steps", 0, True)]
# Set elsewhere: one output folder, one switch for wandb.
DPO_SET_ELSEWHERE = {"output_dir": "set the top-level output_dir instead",
                     "report_to": 'set wandb.mode instead ("disabled" turns wandb off)'}


@functools.cache
def dpo_fields() -> dict[str, Any]:
    """trl.DPOConfig's keys and their types."""
    import dataclasses

    import trl

    hints = typing.get_type_hints(trl.DPOConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(trl.DPOConfig) if f.init}


@functools.cache
def dpo_loss_types() -> tuple[str, ...]:
    """The loss types TRL accepts, as its DPOConfig lists them (it checks them only at the first training step)."""
    import dataclasses

    import trl

    field = next(f for f in dataclasses.fields(trl.DPOConfig) if f.name == "loss_type")
    return tuple(re.findall(r"`'(\w+)'`", field.metadata["help"]))


def _dpo_value_problem(key: str, value) -> str | None:
    if key in DPO_SET_ELSEWHERE:
        return DPO_SET_ELSEWHERE[key]
    if problem := value_problem(value, dpo_fields()[key]):
        return problem
    for name, bound, strict in DPO_RANGES:  # TRL checks none of these; a negative beta trains towards `rejected`
        if key == name and isinstance(value, (int, float)) and (value <= bound if strict else value < bound):
            return f"expected a value {'>' if strict else '>='} {bound}, got {dumps(value)}"
    if key == "loss_type":
        for name in [value] if isinstance(value, str) else value:
            if name not in dpo_loss_types():
                return (f"expected one of TRL's loss types {', '.join(dpo_loss_types())}, got {dumps(name)}"
                        + closest(name, dpo_loss_types()))
    return None


def _checked_dpo(section: dict) -> dict:
    """The dpo section over DPO_DEFAULTS, key by key; checked against trl.DPOConfig's keys, types and sane ranges."""
    section = {**DPO_DEFAULTS, **without_comments(section)}
    errors = []
    for key, value in section.items():
        if key not in dpo_fields():
            errors.append({"type": "extra_forbidden", "loc": (key,), "input": value})
        elif problem := _dpo_value_problem(key, value):
            errors.append(_problem((key,), value, problem))
    _raise_if(errors, "dpo")
    return section


GenerationSection = Annotated[dict[str, Any], AfterValidator(_checked_generation)]
DpoSection = Annotated[dict[str, Any], AfterValidator(_checked_dpo)]
# The keys of the sections that a library receives, for "did you mean" and misplaced keys.
SECTION_KEYS = {"generation": generation_keys, "dpo": lambda: frozenset(dpo_fields())}


# ---------------------------------------------------------------- the scripts' configs


class GeneratorSource(Section):
    """Where the response generator comes from: a (4-bit) base model plus the SFT LoRA adapter."""

    base_model: str = Field(description="Hub id or local folder of the base LLM, e.g. unsloth/llama-2-7b-bnb-4bit")
    adapter: str = Field(description="Hub id or local folder of the SFT LoRA adapter")
    chat_template: str = Field("args/chat_template.json", description="the chat template file shared by every script")
    load_in_4bit: bool = Field(True, description="load the base in 4-bit NF4 (bitsandbytes) to fit a 24 GB GPU")
    use_unsloth: choice("auto", True, False) = Field(
        "auto", description='"auto": unsloth where it imports and a GPU is present; true: required; false: never')
    seed: int = Field(42, ge=0, description="seed for sampling and data order")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="wandb settings")


class PromptSource(Section):
    dataset: str = Field(description="Hub id, local save_to_disk folder, or JSONL of dialogues (column 'prompt')")
    dataset_split: str = Field("train+validation", description="split expression, e.g. train+validation")
    system_prompt: str = Field("", description="system prompt prepended to every dialogue window")
    num_turns_history: int = Field(2, ge=0, description="user/assistant turn pairs of history before the target pair")
    all_windows: bool = Field(False, description="yield every window of each dialogue, not only its last one")
    num_prompts: int | None = Field(None, ge=1, description="use the first N prompts (null: all)")
    skip_prompts: int = Field(0, ge=0, description="leave out the first N prompts, e.g. those an earlier iteration used")


class RewardConfig(Section):
    emotion_classifier: str = Field(description="Hub id or folder of the emotion text classifier")
    emotion_labels: list[str] = Field(
        default_factory=lambda: list(EMOTIONS),
        description="the emotion classifier's outputs by position (its own id2label is not trusted, as in the reference)")
    gibberish_detector: str = Field(description="Hub id or folder of the gibberish detector")
    reward_weights: list[float] = Field(default_factory=lambda: [0.4, 0.25, 0.35],
                                        description="weights of [emotion, length, gibberish] rewards")
    reward_bias: float = Field(0.001, description="added to the weighted sum")
    length_unit: Literal["characters", "words", "tokens"] = Field("characters", description="unit of reply length")
    length_min: float = Field(5, gt=0, description="length the reward measures 'too short' against (it divides)")
    length_max: float = Field(20, gt=0, description="length the reward measures 'too long' against, > length_min")
    classifier_batch_size: int = Field(64, ge=1, description="texts per classifier call")

    @staticmethod
    def rules(values: dict) -> list[tuple[str, str]]:
        problems = []
        if "reward_weights" in values and len(values["reward_weights"]) != 3:
            problems.append(("reward_weights", f"expected 3 numbers [emotion, length, gibberish], "
                                               f"got {len(values['reward_weights'])}"))
        if {"length_min", "length_max"} <= values.keys() and values["length_min"] >= values["length_max"]:
            # no reply is neither too short nor too long: every round fails, 0 pairs
            problems.append(("length_max", f"expected a value > length_min ({number(values['length_min'])}), "
                                           f"got {number(values['length_max'])}"))
        if "emotion_labels" in values:
            folded = [label.lower() for label in values["emotion_labels"]]
            if len(folded) < 2 or len(set(folded)) != len(folded) or not all(label.strip() for label in folded):
                problems.append(("emotion_labels", "expected distinct non-empty names (case-insensitively), one per "
                                                   f"classifier output, got {json.dumps(values['emotion_labels'])}"))
        return problems


class SelectionConfig(Section):
    target_score_range: float = Field(4.0, ge=0, description="a round fails if best - worst total is below this")
    min_chosen_score: float = Field(8.0, description="a round fails if the best total is below this")
    min_chosen_gibberish_confidence: float = Field(0.8, ge=0, le=1,
                                                   description="chosen must be 'clean' with at least this")
    chosen_endings: list[str] = Field(default_factory=lambda: ["!", ".", "?"], min_length=1,
                                      description="chosen must end in one of these")
    max_retries: int = Field(30, ge=0, description="failed rounds regenerated before a prompt is given up")


class GenerateConfig(GeneratorSource, PromptSource, RewardConfig, SelectionConfig):
    output_dir: str = Field("outputs/preferences", description="run folder: journal, dataset, statistics")
    n_candidates: int = Field(6, ge=2, description="replies sampled per prompt per round")
    batch_prompts: int = Field(16, ge=1, description="prompts per generate call (x n_candidates sequences)")
    generation: GenerationSection = Field(default_factory=lambda: dict(REFERENCE_GENERATION),
                                          description="passed to transformers.GenerationConfig as it is")
    push_to_hub: str | None = Field(None, description="Hub dataset id to push the final dataset to (null: don't)")


class TrainConfig(GeneratorSource):
    dataset: str = Field(description="preference data: Hub id, local save_to_disk folder, or JSONL "
                                     "(columns prompt, chosen, rejected)")
    dataset_split: str = Field("train", description="split of a Hub dataset or DatasetDict folder")
    eval_fraction: float = Field(0.05, ge=0, le=0.5, description="share of pairs held out for evaluation (0: none)")
    allow_unmarked_prompts: bool = Field(
        False, description="true: train on prompts that lack the chat template's markers (e.g. decoded with the "
        "special tokens stripped, as Shotaro30678/rlhf-RG-trl-style-v3), with a warning; false: refuse them")
    output_dir: str = Field("outputs/dpo", description="checkpoints, the final adapter, metrics")
    resume_from_checkpoint: bool | str | None = Field(
        None, description="true: the last checkpoint in output_dir; a path: that checkpoint")
    train_modules_to_save: bool = Field(
        True, description="false: train the LoRA matrices only; the SFT adapter's modules_to_save (embedding and "
        "LM-head copies) stay as SFT left them and the reference shares them (no gradient, optimizer state or copy)")
    reference_adapter: str | None = Field(
        None, description="adapter the frozen reference is loaded from (e.g. the SFT adapter as an anchor while "
        "training on from a later iteration's adapter); null: a copy of `adapter`, TRL's default")
    dpo: DpoSection = Field(default_factory=lambda: dict(DPO_DEFAULTS), description="passed to trl.DPOConfig as it is")


class JudgeConfig(Section):
    name: str = Field(description="the judge's name in the results")
    model: str = Field(description="Hub id or folder of an emotion classifier training never saw")
    label_map: dict[str, str] = Field(default_factory=dict, description="the judge's label -> an emotion_labels "
                                      "entry, for labels named otherwise (e.g. {\"joy\": \"happiness\"})")


class EvaluateConfig(GeneratorSource, PromptSource, RewardConfig):
    dpo_adapter: str = Field(description="the DPO-trained adapter (fine_tune_dpo.py's output_dir/final_adapter)")
    # held-out prompts: generate_preferences' default (train+validation) would score the models on what DPO saw
    dataset_split: str = Field("test", description="split of held-out dialogues, never seen in SFT or DPO")
    include_base: bool = Field(False, description="also evaluate the base model with adapters disabled")
    output_dir: str = Field("outputs/evaluation", description="results.md, results.json, replies.jsonl, chart")
    batch_prompts: int = Field(32, ge=1, description="prompts per generate call")
    generation: GenerationSection = Field(
        default_factory=lambda: dict(REFERENCE_GENERATION),
        description="passed to transformers.GenerationConfig, identical for every model")
    clean_confidence: float = Field(0.8, ge=0, le=1,
                                    description="a reply is clean if the detector says 'clean' with this")
    complete_endings: list[str] = Field(default_factory=lambda: ["!", ".", "?"], min_length=1,
                                        description="a reply ending otherwise is cut off")
    bootstrap_samples: int = Field(2000, ge=100, description="resamples for the win-rate interval")
    judges: list[JudgeConfig] = Field(default_factory=list, description="held-out emotion classifiers: accuracy, "
                                      "F1, agreement with the training classifier and a win rate under each")
    well_formed_replies: str | None = Field(
        None, description="JSON {emotion: [every well-formed reply]} of a finite language (the demo world's): the "
        "diversity ceiling of a model that always answers in the requested emotion, uniformly (null: none)")


def stage_section(script_config: str) -> dict:
    return {"config": script_config}


class PipelineConfig(Section):
    """run_pipeline.py: the three scripts' configs, each named by its JSON file plus keys that override it."""

    generate: dict = option(factory=lambda: stage_section("args/generate_preferences_arg.json"),
                            help='generate_preferences: {"config": its JSON file, any of its keys to override}')
    dpo: dict = option(factory=lambda: stage_section("args/dpo_arg.json"),
                       help='fine_tune_dpo: {"config": its JSON file, any of its keys to override}')
    evaluate: dict = option(factory=lambda: stage_section("args/evaluate_arg.json"),
                            help='evaluate: {"config": its JSON file, any of its keys to override}')
    iterations: int = option(1, "rounds of generate -> DPO -> evaluate; round k >= 2 samples from round k-1's "
                                "adapter", low=1)
    fresh_prompts_per_iteration: bool = option(True, "each iteration generates from prompts the earlier ones did "
                                                     "not use (false: the same prompts again)")
    output_dir: str = option("outputs/pipeline", "the run folder: iter-k/{preferences,dpo,evaluation}, iterations.*")
    dpo_reference: choice("previous", "sft") = option(
        "previous", "DPO's frozen reference in iteration k >= 2: the adapter it trains on from (previous: iteration "
                    "k-1's) or the SFT adapter (sft: one anchor for every iteration)")

    @staticmethod
    def rules(values: dict) -> list[tuple[str, str]]:
        return [(name, "expected a \"config\" key naming the stage's JSON config file")
                for name in ("generate", "dpo", "evaluate")
                if name in values and not isinstance(values[name].get("config"), str)]


# ---------------------------------------------------------------- loading, with pydantic's errors as short lines


def _sections_of(cls) -> dict[str, typing.Callable[[], typing.Iterable[str]]]:
    """Each section of a config class -> its keys (nested configs and the sections a library receives)."""
    sections = {}
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            sections[name] = field.annotation.model_fields.keys
        elif name in SECTION_KEYS:
            sections[name] = SECTION_KEYS[name]
    return sections


def _unknown_key(cls, loc: tuple) -> str:
    """'unknown key', with where it belongs (a key of another section) or the closest valid key."""
    *where, key = loc
    sections = _sections_of(cls)
    if where and key in cls.model_fields:
        return "unknown key (it belongs at the top level)"
    for name, keys in sections.items():
        if [name] != where and key in keys():
            return f"unknown key (it belongs in section '{name}': {name}.{key})"
    return f"unknown key{closest(key, sections[where[0]]() if where else cls.model_fields)}"


def _field_path(cls, loc: tuple):
    """The field names along `loc` (union branches and list indexes left out) and the last one's FieldInfo."""
    path, field, current = [], None, cls
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields):
            break
        path.append(part)
        field = current.model_fields[part]
        current = field.annotation
    return path, field


def _lookup(data, path: list[str]):
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


RANGES = {"greater_than_equal": ("ge", ">="), "less_than_equal": ("le", "<="), "greater_than": ("gt", ">"),
          "less_than": ("lt", "<")}


def _message(cls, error: dict, data: dict) -> tuple[str, str]:
    """(dotted key, what was expected) for one pydantic error."""
    kind, loc, ctx = error["type"], error["loc"], error.get("ctx", {})
    if kind == "problem":
        return ".".join(map(str, loc)), error["msg"]
    if kind == "extra_forbidden":
        return ".".join(map(str, loc)), _unknown_key(cls, loc)
    path, field = _field_path(cls, loc)
    key = ".".join(path)
    if kind == "missing":
        return key, f"required key is missing ({field.description})"
    if kind in RANGES:
        name, sign = RANGES[kind]
        return key, f"expected a value {sign} {number(ctx[name])}, got {dumps(error['input'])}"
    if kind == "finite_number":
        return key, f"expected a finite number, got {dumps(error['input'])}"
    if kind == "too_short":
        return key, f"expected at least {ctx['min_length']} item(s), got {dumps(error['input'])}"
    return key, f"expected {type_name(field.annotation)}, got {dumps(_lookup(data, path))}"


def problems_of(cls, error: ValidationError, data: dict) -> list[str]:
    """'dotted.key: what was expected' lines, in the order of the keys in the file (missing keys first)."""
    order = {key: i for i, key in enumerate(data)}
    lines = {}
    for e in sorted(error.errors(), key=lambda e: order.get(e["loc"][0], -1) if e["loc"] else -1):
        key, text = _message(cls, e, data)
        lines[f"{key}: {text}"] = None  # a union's branches each report the same line once
    # the cross-field rules on the keys that passed their own checks: pydantic runs them only when every key does
    failed = {e["loc"][0] for e in error.errors() if e["loc"]}
    defaults = {name: field.get_default(call_default_factory=True) for name, field in cls.model_fields.items()
                if not field.is_required()}
    valid = {k: v for k, v in {**defaults, **data}.items() if k not in failed}
    lines.update(dict.fromkeys(f"{key}: {text}" for key, text in cls.rule_problems(valid)))
    return list(lines)


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
    try:
        config = cls.model_validate(data)
    except ValidationError as error:
        raise PipelineError("\n".join(f"{path}: key {p}" for p in problems_of(cls, error, data))) from None
    config.source = str(path)
    return config


def to_dict(config) -> dict:
    return config.model_dump()


def save_config(config, folder: str | Path, name: str = "config.json") -> Path:
    from .files import write_text_atomic  # whole or not at all: a torn config.json would block every later start

    return write_text_atomic(Path(folder) / name, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


_ABSENT = object()


def differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs; "_comment" keys are no setting."""
    keys = []
    for k in sorted((set(old) | set(new)) - {k for k in {*old, *new} if k.startswith("_")}):
        a, b = old.get(k, _ABSENT), new.get(k, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}: {json.dumps(a) if a is not _ABSENT else '(absent)'} -> "
                        f"{json.dumps(b) if b is not _ABSENT else '(absent)'}")
    return keys


def differing_keys_except(old: dict, new: dict, allowed: typing.Iterable[str]) -> list[str]:
    """differing_keys, less those at or under an allowed key ("wandb" covers "wandb.mode"; "dpo.save_steps")."""
    return [k for k in differing_keys(old, new)
            if not any(k.startswith(f"{key}:") or k.startswith(f"{key}.") for key in allowed)]
