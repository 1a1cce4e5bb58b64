"""Strict, typed configs loaded from JSON: defaults -> file -> `--set key=value` overrides.

The configs are pydantic models: strict types (no `true` for a number, no `"2"` for an integer; a whole number
is fine for a float), no NaN or Infinity, no unknown key (keys starting with "_" are comments, dropped). The
`dpo` section is typed by trl.DPOConfig's own fields and then built as a DPOConfig key by key; `generation` is typed
and bounded here, then checked by transformers.GenerationConfig. Every problem is collected and reported at once,
naming the file and the dotted key, before any model or dataset is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model,
                      model_validator)
from pydantic_core import PydanticCustomError

from . import EMOTIONS
from .errors import PipelineError

STRICT = ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True, extra="forbid")
def expand_home(path: str) -> str:
    """A leading ~ or ~user is the home folder, for every path key, once, here: left as it is, the project would make
    a folder named "~" while `datasets` (fsspec) saves under the home folder. No Hub id starts with "~"."""
    return os.path.expanduser(path)


PathKey = Annotated[str, AfterValidator(expand_home)]  # a local path (or Hub id) a key names
Folder = Annotated[str, Field(min_length=1), AfterValidator(expand_home)]  # "" would silently mean the current folder


def without_comments(section: dict) -> dict:
    """A section as the library receives it: "_comment" keys (allowed everywhere) left out."""
    return {k: v for k, v in section.items() if not (isinstance(k, str) and k.startswith("_"))}


def closest(name: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def dumps(value) -> str:
    return json.dumps(value, default=str)


def number(value) -> str:
    """A number as the config wrote it: a float field's 1 reads 1.0 once loaded."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else dumps(value)


def _problem(key: str, value, text: str) -> dict:
    """A pydantic line error carrying our own message (a library's complaint, a cross-field rule)."""
    return {"type": PydanticCustomError("problem", "{text}", {"text": text}), "loc": (key,) if key else (),
            "input": value}


def _raise_if(errors: list, title: str) -> None:
    if errors:
        raise ValidationError.from_exception_data(title, errors)


class Section(BaseModel):
    """A config or one of its sections; see the module docstring for its rules."""

    model_config = STRICT
    _source: str = PrivateAttr("")
    # keys that change nothing a run makes (they may differ from a finished run's config), and those a resumed
    # run may change: the one home of both lists, read by the scripts' resume checks and by run_pipeline
    unchanged_results: ClassVar[frozenset[str]] = frozenset()
    resumable_changes: ClassVar[frozenset[str]] = frozenset()

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
        _raise_if([_problem(k, getattr(self, k), text) for k, text in self.rule_problems(vars(self))],
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
    def __pydantic_init_subclass__(cls, **kwargs):  # help(cls) lists every key with its type, default and help
        super().__pydantic_init_subclass__(**kwargs)
        def text(field) -> str:
            tp, default = field.annotation, field.get_default(call_default_factory=True)
            default = default.model_dump() if isinstance(default, BaseModel) else default
            return (f"{tp.__name__ if isinstance(tp, type) else str(tp).replace('typing.', '')}, "
                    f"{'required' if field.is_required() else f'default {dumps(default)}'}\n      {field.description}")

        lines = [f"  {name}: {text(field)}" for name, field in cls.model_fields.items()]
        cls.__doc__ = (cls.__dict__.get("__doc__") or cls.__name__).strip() + "\n\nKeys:\n" + "\n".join(lines)


class WandbConfig(Section):
    project: str = Field("emotion-dpo", description="wandb project")
    group: str | None = Field(None, description="wandb group (e.g. one experiment's runs)")
    job_type: str | None = Field(None, description="wandb job_type; defaults to the script's stage")
    notes: str | None = Field(None, description="wandb notes")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline needs no account; sync later with `wandb sync`")


# ---------------------------------------------------------------- sections passed to a library as they are


def library_problems(error: Exception, keys: typing.Iterable[str], default: str = "") -> list[tuple[str, str]]:
    """A library's complaint as (key, one line): a list of "- `key`: ..." lines split by key, else the first key
    it names, else `default`."""
    text = str(error)
    listed = re.findall(r"^- `(\w+)`: (.*)$", text, re.MULTILINE)
    named = [k for k in keys if re.search(rf"\b{re.escape(k)}\b", text)]
    return listed or [(named[0] if named else default, " ".join(text.split()))]


def _checked_section(name: str, section: dict, defaults: dict, typed: type[BaseModel], known: typing.Collection[str],
                     library_check) -> dict:
    """A section a library receives, over our defaults: unknown keys, types and ranges (`typed`), then the library's
    own checks (`library_check(values) -> [(key, text)]`) with a failed key at its default; all problems at once."""
    section = {**defaults, **without_comments(section)}
    errors = [{"type": "extra_forbidden", "loc": (k,), "input": v} for k, v in section.items() if k not in known]
    section = {k: v for k, v in section.items() if k in known}
    try:
        values = typed.model_validate(section).model_dump(exclude_unset=True)
    except ValidationError as error:
        errors += [{k: e[k] for k in ("type", "loc", "input", "ctx") if k in e} for e in error.errors()]
        failed = {e["loc"][0] for e in error.errors()}
        values = {k: defaults[k] if k in failed else v for k, v in section.items() if k not in failed or k in defaults}
    errors += [_problem(key, values.get(key), text) for key, text in library_check(values)]
    _raise_if(errors, name)
    return values


# The reference project's sampling settings.
REFERENCE_GENERATION = {"do_sample": True, "min_new_tokens": 5, "max_new_tokens": 20, "repetition_penalty": 1.5,
                        "top_k": 5, "top_p": 1.0, "temperature": 2.0}


class GenerationSettings(Section):
    """Types and ranges of the sampling keys; transformers checks them only inside `generate`, after the models
    load, or not at all (top_p 2.0). The processors take floats: a JSON 2 is read as 2.0."""

    model_config = ConfigDict(STRICT, extra="allow")  # the other GenerationConfig keys: checked by it
    # the reference passed "False", a string: only true or false is taken
    do_sample: bool = Field(True, description="sample (true) or decode greedily; best-of-N needs N different replies")
    max_new_tokens: int | None = Field(None, ge=1, description="the most tokens a reply may have; a reply that "
                                       "reaches it is cut off")
    min_new_tokens: int | None = Field(None, ge=0, description="EOS is suppressed before this many tokens")
    temperature: float | None = Field(None, gt=0, description="divides the logits before sampling (> 0)")
    top_k: int | None = Field(None, ge=0, description="sample among the k most likely tokens (0: no limit)")
    top_p: float | None = Field(None, gt=0, le=1, description="sample among the most likely tokens holding this "
                                "much probability, in (0, 1]")
    min_p: float | None = Field(None, ge=0, le=1, description="drop tokens below this share of the most likely "
                                "one's probability, in [0, 1]")
    typical_p: float | None = Field(None, gt=0, le=1, description="typical sampling's probability mass, in (0, 1]")
    repetition_penalty: float | None = Field(None, gt=0, description="penalty on tokens already in the sequence "
                                             "(> 0; 1: none)")
    num_beams: int | None = Field(None, ge=1, description="beams of beam search (1: none)")


@functools.cache
def generation_keys() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict())


def generation_problems(values: dict) -> list[tuple[str, str]]:
    from transformers import GenerationConfig

    try:
        GenerationConfig(**values).validate(strict=True)
    except (ValueError, TypeError) as e:
        return library_problems(e, values)
    return []


def _checked_generation(section: dict) -> dict:
    return {**REFERENCE_GENERATION, **without_comments(section), **_checked_section(
        "generation", section, REFERENCE_GENERATION, GenerationSettings, generation_keys(), generation_problems)}


DPO_DEFAULTS = {
    # The reference's values ...
    "beta": 0.1, "num_train_epochs": 3, "gradient_checkpointing": True,
    # ... and settings that fit a 7B 4-bit model with two adapters on one 24 GB GPU.
    "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "gradient_accumulation_steps": 8,
    "learning_rate": 5e-6, "lr_scheduler_type": "cosine", "warmup_steps": 10, "max_length": 512,
    "logging_steps": 10, "save_steps": 100, "save_total_limit": 3, "eval_strategy": "epoch",
    "optim": "adamw_torch",
}
# Values TRL accepts that cannot train as meant (a negative beta trains towards `rejected`)
DPO_BOUNDS = {"beta": Field(gt=0), "learning_rate": Field(ge=0), "warmup_steps": Field(ge=0),
              "per_device_train_batch_size": Field(ge=1), "per_device_eval_batch_size": Field(ge=1),
              "gradient_accumulation_steps": Field(ge=1), "max_length": Field(ge=1), "save_steps": Field(gt=0)}
# Set elsewhere: one output folder, one switch for wandb.
SET_ELSEWHERE = {"dpo.output_dir": "set the top-level output_dir instead",
                 "dpo.report_to": 'set wandb.mode instead ("disabled" turns wandb off)'}
# Chosen by device when training starts (dpo_train.build_dpo_config): checked there, not on the machine that loads
DEVICE_KEYS = {"bf16": False, "fp16": False, "bf16_full_eval": False, "fp16_full_eval": False, "tf32": None}


@functools.cache
def dpo_section_model() -> type[BaseModel]:
    """trl.DPOConfig's own fields and types (a list field takes one item, as TRL does), with DPO_BOUNDS."""
    import trl

    hints = typing.get_type_hints(trl.DPOConfig)
    fields = {}
    for f in dataclasses.fields(trl.DPOConfig):
        if f.init and f"dpo.{f.name}" not in SET_ELSEWHERE:
            hint = hints[f.name]
            hint = hint | typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
            fields[f.name] = (Annotated[hint, DPO_BOUNDS.get(f.name, Field())], None)
    return create_model("DpoSection", __config__=ConfigDict(STRICT, extra="allow"), **fields)


@functools.cache
def dpo_loss_types() -> tuple[str, ...]:
    """The loss types TRL accepts, as its DPOConfig lists them (it checks them only at the first training step)."""
    import trl

    field = next(f for f in dataclasses.fields(trl.DPOConfig) if f.name == "loss_type")
    return tuple(re.findall(r"`'(\w+)'`", field.metadata["help"]))


def dpo_problems(values: dict) -> list[tuple[str, str]]:
    """trl.DPOConfig built from each key alone (each problem named by its key), then from all of them."""
    import trl

    def built(settings: dict, key: str = "") -> list[tuple[str, str]]:
        with warnings.catch_warnings():  # its deprecation notes come again when training starts
            warnings.simplefilter("ignore")
            try:
                trl.DPOConfig(**{**settings, "output_dir": "unused", "report_to": "none", **DEVICE_KEYS})
            except (ValueError, TypeError, KeyError) as e:
                return library_problems(e, settings, key)
        return []

    from accelerate.state import AcceleratorState, PartialState

    started = bool(PartialState._shared_state)
    problems = [p for k, v in values.items() if k not in DEVICE_KEYS for p in built({k: v}, k)]
    for name in [values["loss_type"]] if isinstance(values.get("loss_type"), str) else values.get("loss_type", []):
        if name not in dpo_loss_types():
            problems.append(("loss_type", f"expected one of TRL's loss types {', '.join(dpo_loss_types())}, "
                                          f"got {dumps(name)}{closest(name, dpo_loss_types())}"))
    problems = problems or built(values)
    if not started:  # building a DPOConfig set up accelerate's process state as one process; under a launcher the
        AcceleratorState._reset_state(reset_partial_state=True)  # script sets it up itself (distributed.process_state)
    return problems


def _checked_dpo(section: dict) -> dict:
    _checked_section("dpo", section, DPO_DEFAULTS, dpo_section_model(), dpo_section_model().model_fields, dpo_problems)
    return {**DPO_DEFAULTS, **without_comments(section)}  # as written: the saved config compares with older runs


GenerationSection = Annotated[dict[str, Any], AfterValidator(_checked_generation)]
DpoSection = Annotated[dict[str, Any], AfterValidator(_checked_dpo)]
# The keys of the sections that a library receives, for "did you mean" and misplaced keys.
SECTION_KEYS = {"generation": generation_keys, "dpo": lambda: frozenset(dpo_section_model().model_fields)}


# ---------------------------------------------------------------- the scripts' configs


class GeneratorSource(Section):
    """Where the response generator comes from: a (4-bit) base model plus the SFT LoRA adapter."""

    base_model: PathKey = Field(description="Hub id or local folder of the base LLM, e.g. unsloth/llama-2-7b-bnb-4bit")
    adapter: PathKey = Field(description="Hub id or local folder of the SFT LoRA adapter")
    chat_template: PathKey = Field("args/chat_template.json",
                                   description="the chat template file shared by every script")
    load_in_4bit: bool = Field(True, description="load the base in 4-bit NF4 (bitsandbytes) to fit a 24 GB GPU")
    use_unsloth: Literal["auto"] | bool = Field(
        "auto", description='"auto": unsloth where it imports and a GPU is present; true: required; false: never')
    seed: int = Field(42, ge=0, description="seed for sampling and data order")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="wandb settings")


class PromptSource(Section):
    dataset: PathKey = Field(description="Hub id, local save_to_disk folder, or JSONL of dialogues (column 'prompt')")
    dataset_split: str = Field("train+validation", description="split expression, e.g. train+validation")
    system_prompt: str = Field("", description="system prompt prepended to every dialogue window")
    num_turns_history: int = Field(2, ge=0, description="user/assistant turn pairs of history before the target "
                                   "pair: windows of 2 + 2 x this many turns, the last full window of each dialogue, "
                                   "starting on a user turn")
    all_windows: bool = Field(False, description="yield every window of each dialogue, not only its last one")
    num_prompts: int | None = Field(None, ge=1, description="use the first N prompts (null: all)")
    skip_prompts: int = Field(0, ge=0, description="leave out the first N prompts, e.g. those an earlier iteration "
                              "used (run_pipeline's fresh prompts per iteration)")


class RewardConfig(Section):
    emotion_classifier: PathKey = Field(description="Hub id or folder of the emotion text classifier")
    emotion_labels: list[str] = Field(
        default_factory=lambda: list(EMOTIONS),
        description="the emotion classifier's outputs by position (its own id2label is not trusted, as in the reference)")
    gibberish_detector: PathKey = Field(description="Hub id or folder of the gibberish detector")
    reward_weights: list[float] = Field(default_factory=lambda: [0.4, 0.25, 0.35],
                                        description="weights of [emotion, length, gibberish] rewards")
    reward_bias: float = Field(0.001, description="added to the weighted sum")
    length_unit: Literal["characters", "words", "tokens"] = Field("characters", description="unit of reply length")
    length_min: float = Field(5, gt=0, description="length the reward measures 'too short' against (it divides)")
    length_max: float = Field(20, gt=0, description="length the reward measures 'too long' against, > length_min")
    length_rule: Literal["reference", "flat_above_max"] = Field(
        "reference", description="reference: the banded rule, rising to 2 x length_max and falling there to about 1 "
        "(the cliff); flat_above_max: the same up to length_max, then held at its value there")
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
    # diversity-aware selection (docs/selection.md, "Diversity-aware selection"); the defaults are the reference's rule
    chosen_text_cap: float | None = Field(
        None, gt=0, le=1, description="the largest share of a target emotion's chosen replies one text may take, "
        "counted in prompt order at finalize (null: no cap, the reference's rule)")
    chosen_text_cap_min: int = Field(2, ge=1, description="the cap never allows fewer copies of a text than this")
    min_distinct_passing: int = Field(
        1, ge=1, description="a prompt is sampled again (up to max_retries) until its rounds hold this many different "
        "texts that pass the chosen rules; above 1, each prompt chooses over all its rounds (1: the reference's rule)")
    chosen_rule: Literal["best", "rarest"] = Field(
        "best", description="among a prompt's passing replies: best (the highest total, the reference's) or rarest "
        "(DivPO: the text with the fewest copies among the run's candidates for the emotion, then the highest total)")
    rejected_rule: Literal["worst", "most_common"] = Field(
        "worst", description="worst (the lowest total, the reference's) or most_common (DivPO: the most copied text "
        "among the replies that do not pass and score target_score_range below the chosen)")

    @staticmethod
    def rules(values: dict) -> list[tuple[str, str]]:
        return single_characters("chosen_endings", values)


class GenerateConfig(GeneratorSource, PromptSource, RewardConfig, SelectionConfig):
    unchanged_results: ClassVar = frozenset({"output_dir", "wandb", "batch_prompts", "classifier_batch_size",
                                             "push_to_hub"})
    # more prompts only add to the journal; a finished run's dataset holds its own number of them
    resumable_changes: ClassVar = unchanged_results | {"num_prompts"}
    output_dir: Folder = Field("outputs/preferences", description="run folder: journal, dataset, statistics")
    n_candidates: int = Field(6, ge=2, description="replies sampled per prompt per round")
    batch_prompts: int = Field(16, ge=1, description="prompts per generate call (x n_candidates sequences)")
    generation: GenerationSection = Field(default_factory=lambda: dict(REFERENCE_GENERATION),
                                          description="passed to transformers.GenerationConfig as it is")
    push_to_hub: str | None = Field(None, description="Hub dataset id to push the final dataset to (null: don't)")


class TrainConfig(GeneratorSource):
    unchanged_results: ClassVar = frozenset({"resume_from_checkpoint", "output_dir", "wandb", "dpo.logging_steps",
                                             "dpo.save_steps", "dpo.save_total_limit", "dpo.per_device_eval_batch_size",
                                             "dpo.eval_strategy"})
    resumable_changes: ClassVar = unchanged_results
    dataset: PathKey = Field(description="preference data: Hub id, local save_to_disk folder, or JSONL (columns "
                                         "prompt, chosen, rejected; other columns are reported and kept out of training)")
    dataset_split: str = Field("train", description="split of a Hub dataset or DatasetDict folder")
    earlier_datasets: list[PathKey] = Field(default_factory=list, description="more preference data trained on with "
                                        "`dataset`, in the same format (run_pipeline's accumulate_pairs sets it)")
    eval_fraction: float = Field(0.05, ge=0, le=0.5, description="share of pairs held out for an evaluation loss (0: "
                                  "none; with fewer than 10 pairs none is held out, and the run says so)")
    allow_unmarked_prompts: bool = Field(
        False, description="true: train on prompts that lack the chat template's markers (e.g. decoded with the "
        "special tokens stripped, as Shotaro30678/rlhf-RG-trl-style-v3), with a warning; false: refuse them")
    output_dir: Folder = Field("outputs/dpo", description="checkpoints, the final adapter, metrics")
    resume_from_checkpoint: bool | PathKey | None = Field(
        None, description="true: the last checkpoint in output_dir; a path: that checkpoint")
    train_modules_to_save: bool = Field(
        True, description="false: train the LoRA matrices only; the SFT adapter's modules_to_save (embedding and "
        "LM-head copies) stay as SFT left them and the reference shares them (no gradient, optimizer state or copy)")
    prefix_sharing: bool = Field(
        True, description="true: one row per pair, [prompt, chosen, rejected] with a block mask, for the policy and the "
        "reference (the prompt runs once, not twice); false: TRL's two rows per pair")
    pack_pairs_tokens: int = Field(
        0, ge=0, description="with prefix_sharing: pack consecutive pairs into one row up to this many tokens "
        "(0: one pair per row)")
    reference_adapter: PathKey | None = Field(
        None, description="adapter the frozen reference is loaded from (e.g. the SFT adapter as an anchor while "
        "training on from a later iteration's adapter); null: a copy of `adapter`, TRL's default")
    dpo: DpoSection = Field(default_factory=lambda: dict(DPO_DEFAULTS), description="passed to trl.DPOConfig as it is "
                            "(any of its fields; unknown ones are errors); bf16/fp16 are chosen by device unless set; "
                            "report_to follows wandb.mode")


class JudgeConfig(Section):
    name: str = Field(description="the judge's name in the results")
    model: PathKey = Field(description="Hub id or folder of an emotion classifier training never saw")
    label_map: dict[str, str] = Field(default_factory=dict, description="the judge's label -> an emotion_labels "
                                      "entry, for labels named otherwise (e.g. {\"joy\": \"happiness\"})")


class EvaluateConfig(GeneratorSource, PromptSource, RewardConfig):
    unchanged_results: ClassVar = frozenset({"output_dir", "wandb", "batch_prompts", "classifier_batch_size"})
    resumable_changes: ClassVar = unchanged_results
    dpo_adapter: PathKey = Field(description="the DPO-trained adapter (fine_tune_dpo.py's output_dir/final_adapter)")
    # held-out prompts: generate_preferences' default (train+validation) would score the models on what DPO saw
    dataset_split: str = Field("test", description="split of held-out dialogues, never seen in SFT or DPO")
    include_base: bool = Field(False, description="also evaluate the base model with adapters disabled")
    output_dir: Folder = Field("outputs/evaluation", description="results.md, results.json, replies.jsonl, chart")
    batch_prompts: int = Field(32, ge=1, description="prompts per generate call")
    generation: GenerationSection = Field(
        default_factory=lambda: dict(REFERENCE_GENERATION),
        description="passed to transformers.GenerationConfig, identical for every model")
    clean_confidence: float = Field(0.8, ge=0, le=1,
                                    description="a reply is clean if the detector says 'clean' with this")
    complete_endings: list[str] = Field(default_factory=lambda: ["!", ".", "?"], min_length=1,
                                        description="a reply ending otherwise is cut off")
    bootstrap_samples: int = Field(2000, ge=100, description="resamples of prompts for every 95 % interval")
    replies_per_prompt: int = Field(1, ge=1, description="replies drawn per prompt and model: more draws, narrower "
                                                         "intervals (each figure's interval is over prompts)")
    judges: list[JudgeConfig] = Field(default_factory=list, description="held-out emotion classifiers: accuracy, "
                                      "F1, agreement with the training classifier and a win rate under each")
    well_formed_replies: PathKey | None = Field(
        None, description="JSON {emotion: [every well-formed reply]} of a finite language (the demo world's): the "
        "diversity ceiling of a model that always answers in the requested emotion, uniformly (null: none)")

    @staticmethod
    def rules(values: dict) -> list[tuple[str, str]]:
        return single_characters("complete_endings", values)


def single_characters(key: str, values: dict) -> list[tuple[str, str]]:
    """Endings are compared with a reply's last character (selection.ending_of, as the reference): a longer entry
    could never match, and every round would fail."""
    longer = [ending for ending in values.get(key, []) if len(ending) != 1]
    return [(key, f"expected single characters (a reply's last character is compared), got {json.dumps(longer)}")
            ] if longer else []


class LauncherConfig(Section):
    num_processes: int = Field(1, ge=1, description="processes per stage: above 1, each stage runs under `accelerate "
                                                    "launch --multi_gpu --num_processes N` (one per GPU; gloo on CPUs)")


class PipelineConfig(Section):
    """run_pipeline.py: the three scripts' configs, each named by its JSON file plus keys that override it."""

    generate: dict = Field(default_factory=lambda: {"config": "args/generate_preferences_arg.json"},
                           description='generate_preferences: {"config": its JSON file, any of its keys to override}')
    dpo: dict = Field(default_factory=lambda: {"config": "args/dpo_arg.json"},
                      description='fine_tune_dpo: {"config": its JSON file, any of its keys to override}')
    evaluate: dict = Field(default_factory=lambda: {"config": "args/evaluate_arg.json"},
                           description='evaluate: {"config": its JSON file, any of its keys to override}')
    iterations: int = Field(1, ge=1, description="rounds of generate -> DPO -> evaluate; round k >= 2 samples from "
                                                 "round k-1's adapter")
    fresh_prompts_per_iteration: bool = Field(True, description="each iteration generates from prompts the earlier "
                                                                "ones did not use (false: the same prompts again)")
    output_dir: Folder = Field("outputs/pipeline",
                               description="the run folder: iter-k/{preferences,dpo,evaluation}, iterations.*")
    launcher: LauncherConfig = Field(default_factory=LauncherConfig, description="how each stage is started")
    accumulate_pairs: bool = Field(False, description="iteration k trains on the pairs of iterations 1..k (false: "
                                                      "on its own iteration's pairs only)")
    dpo_reference: Literal["previous", "sft"] = Field(
        "previous", description="DPO's frozen reference in iteration k >= 2: the adapter it trains on from (previous: "
        "iteration k-1's) or the SFT adapter (sft: one anchor for every iteration)")

    @staticmethod
    def rules(values: dict) -> list[tuple[str, str]]:
        return [(name, "expected a \"config\" key naming the stage's JSON config file")
                for name in ("generate", "dpo", "evaluate")
                if name in values and not isinstance(values[name].get("config"), str)]

    @classmethod
    def stage_problems(cls, data: dict, source: str) -> list[str]:
        """The stages' problems (run_pipeline's plan) when the pipeline's own keys have some too: all in one run."""
        from .pipeline import plan

        stages = {k: v for k, v in data.items() if k in ("generate", "dpo", "evaluate")}
        if not all(isinstance(v, dict) and isinstance(v.get("config"), str) for v in stages.values()):
            return []  # a stage section without its file: named by `rules`
        config = cls.model_construct(**stages)
        config.source = source
        try:
            plan(config)
        except PipelineError as e:
            return str(e).splitlines()
        return []


# ---------------------------------------------------------------- loading, with pydantic's errors as short lines

# pydantic's error types -> what the key expected
EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
            "string_type": "a string", "bool_type": "true or false", "list_type": "a list", "dict_type": "an object", "model_type": "an object",
            "none_required": "null", "literal_error": "{expected}", "enum": "a string", "is_instance_of": "a string"}
BOUNDS = {"greater_than_equal": ("ge", ">="), "less_than_equal": ("le", "<="), "greater_than": ("gt", ">"),
          "less_than": ("lt", "<")}


def _sections_of(cls) -> dict[str, typing.Callable[[], typing.Iterable[str]]]:
    """Each section of a config class -> its keys (nested configs and the sections a library receives)."""
    return {name: (f.annotation.model_fields.keys if isinstance(f.annotation, type) and issubclass(
        f.annotation, BaseModel) else SECTION_KEYS[name]) for name, f in cls.model_fields.items()
        if name in SECTION_KEYS or isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


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


def problems_of(cls, error: ValidationError, data: dict) -> list[str]:
    """'dotted.key: what was expected' lines, in the order of the keys in the file (missing keys first); a key
    whose union branches all failed gets one line naming every type it takes."""
    sections, order = _sections_of(cls), {key: i for i, key in enumerate(data)}
    lines, expected = {}, {}
    for e in sorted(error.errors(), key=lambda e: order.get(e["loc"][0], -1) if e["loc"] else -1):
        kind, ctx, loc = e["type"], e.get("ctx") or {}, [p for p in e["loc"] if isinstance(p, str)]
        loc = loc[:2] if loc and loc[0] in sections else loc[:1]  # no union branch or list index
        key = ".".join(loc)
        if kind in EXPECTED:
            expected.setdefault(key, [e["input"], {}])[1][EXPECTED[kind].format(**ctx)] = None
            text = key  # filled in below, at the key's first place
        elif kind == "extra_forbidden":
            text = SET_ELSEWHERE.get(key) or _unknown_key(cls, tuple(loc))
        elif kind == "missing":
            text = f"required key is missing ({cls.model_fields[key].description})"
        elif kind in BOUNDS:
            text = f"expected a value {BOUNDS[kind][1]} {number(ctx[BOUNDS[kind][0]])}, got {dumps(e['input'])}"
        elif kind == "finite_number":
            text = f"expected a finite number, got {dumps(e['input'])}"
        elif kind == "too_short":
            text = f"expected at least {ctx['min_length']} item(s), got {dumps(e['input'])}"
        elif kind == "string_too_short":
            text = f"expected at least {ctx['min_length']} character(s), got {dumps(e['input'])}"
        else:
            text = e["msg"]
        lines.setdefault(f"{key}: {text}", key)
    lines = [f"{key}: expected {' or '.join(expected[key][1])}, got {dumps(expected[key][0])}"
             if line == f"{key}: {key}" else line for line, key in lines.items()]
    # the cross-field rules on the keys that passed their own checks: pydantic runs them only when every key does
    failed = {e["loc"][0] for e in error.errors() if e["loc"]}
    defaults = {name: field.get_default(call_default_factory=True) for name, field in cls.model_fields.items()
                if not field.is_required()}
    valid = {k: v for k, v in {**defaults, **data}.items() if k not in failed}
    return list(dict.fromkeys(lines + [f"{key}: {text}" for key, text in cls.rule_problems(valid)]))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`dpo.beta=0.2` -> (["dpo", "beta"], 0.2); values are JSON, else plain strings."""
    if "=" not in text:
        raise PipelineError(f"--set {text}: expected KEY=VALUE, e.g. --set num_prompts=64")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except RecursionError:
        raise PipelineError(f"--set {key}: the value is nested too deeply to be a setting") from None
    return key.strip().split("."), value


def read_json_and_repeats(path: str | Path) -> tuple[dict, list[str]]:
    """A JSON object from a file, and the dotted keys it gives more than once (JSON keeps the last one, silently)."""
    path, repeated = Path(path), {}  # id of an object -> its keys given twice

    def note_repeats(pairs):
        seen, obj = set(), dict(pairs)
        repeated[id(obj)] = [k for k, _ in pairs if k in seen or seen.add(k)]
        return obj

    def repeats(value, prefix=""):  # "section.key" of each key given twice
        yield from (prefix + k for k in repeated.get(id(value), ()))
        for k, v in value.items() if isinstance(value, dict) else ():
            yield from repeats(v, f"{prefix}{k}.")

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=note_repeats)
        repeated = list(dict.fromkeys(repeats(data)))
    except FileNotFoundError:
        raise PipelineError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: is a folder, expected a JSON config file") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                            "save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise PipelineError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object at the top level")
    return data, repeated


def load_config(cls, path: str | Path, overrides: typing.Sequence[str] = ()):
    """Load `cls` from the JSON file at `path` with `--set` overrides; raise one PipelineError listing all problems
    (a key given twice among them: it hides none of the others)."""
    path = expand_home(str(path))
    data, repeated = read_json_and_repeats(path)
    for text in overrides:
        keys, value = parse_override(text)
        target = data
        for k in keys[:-1]:
            target = target.setdefault(k, {})
            if not isinstance(target, dict):
                raise PipelineError(f"--set {text}: '{k}' is not a section")
        target[keys[-1]] = value
    problems = [f"{key}: given more than once (JSON would keep only the last one)" for key in repeated]
    try:
        config = cls.model_validate(data)
    except ValidationError as error:
        problems += problems_of(cls, error, data)
    except RecursionError:
        raise PipelineError(f"{path}: nested too deeply to be a config") from None
    if problems:
        more = cls.stage_problems(data, str(path)) if hasattr(cls, "stage_problems") else []
        raise PipelineError("\n".join([f"{path}: key {p}" for p in problems] + more))
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
