"""docs/configuration.md, generated from the config classes' own help texts (pydantic Field descriptions), so the
doc and the code cannot drift: `python -m emotion_dpo.config_docs` writes it, `--check` says whether the committed
file is current (tests/test_config_docs.py checks the same).

The sections a library receives are not ours to list in full: `generation` (transformers.GenerationConfig) lists
the keys typed here and those args/ sets; `dpo` (trl.DPOConfig) lists this project's defaults and the keys args/
sets, with TRL's own help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from . import config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
ARGS = ROOT / "args"

# Each script and the config class it loads.
SCRIPTS = {"generate_preferences.py": config.GenerateConfig, "fine_tune_dpo.py": config.TrainConfig,
           "evaluate.py": config.EvaluateConfig, "chat.py": config.EvaluateConfig,
           "run_pipeline.py": config.PipelineConfig}

# The classes whose own keys get a table, in the order of the doc, with a title.
GROUPS = [
    (config.GeneratorSource, "The generator, the seed, wandb"),
    (config.PromptSource, "Prompts"),
    (config.RewardConfig, "Rewards"),
    (config.SelectionConfig, "Selection (the rules: docs/selection.md)"),
    (config.GenerateConfig, "generate_preferences.py's own keys"),
    (config.TrainConfig, "fine_tune_dpo.py's own keys"),
    (config.EvaluateConfig, "evaluate.py's (and chat.py's) own keys"),
    (config.PipelineConfig, "run_pipeline.py"),
]
# Nested sections of our own: the section's key -> its class.
NESTED = {"wandb": config.WandbConfig, "launcher": config.LauncherConfig, "judges[]": config.JudgeConfig}

INTRO = """\
# Configuration

Every script reads a JSON file (`--config`, default under `args/`) and `--set KEY=VALUE` overrides (dotted for
sections: `--set dpo.beta=0.2`, `--set wandb.mode=disabled`; run_pipeline reaches a stage's keys the same way:
`--set generate.num_prompts=64`, `--set dpo.dpo.beta=0.2`). Defaults -> file -> `--set`.

This file is generated from the help texts in `emotion_dpo/config.py` by `python -m emotion_dpo.config_docs`; do not
edit it by hand (`tests/test_config_docs.py` fails when it differs from what the code generates, or when a key has
no help text). `python -c "from emotion_dpo.config import GenerateConfig; help(GenerateConfig)"` lists the same keys
in a terminal.

## Rules every config follows

Types are strict (no `true` for a number, no `"2"` for an integer; `2` is fine for a number), NaN and ±Infinity are
refused, and a key in the wrong place is pointed to its section (`key temperature: unknown key (it belongs in
section 'generation': generation.temperature)`). Unknown keys are errors; keys starting with `_` are comments,
anywhere (inside `generation` and `dpo` too), and are left out of the saved config, so adding one never blocks a
resume. Every problem of a file is reported at once, one line each with the file and the dotted key, before any
model or dataset loads. `generation`: types first, then ranges (`top_p` in (0, 1], `top_k` ≥ 0, `temperature` and
`repetition_penalty` > 0, `max_new_tokens` ≥ 1, `min_p` in [0, 1], ...; `transformers` checks these only inside
`generate` or not at all), then `transformers.GenerationConfig.validate` on the keys that passed, its complaints
split by key. `dpo`: `trl.DPOConfig`'s own fields and types, ranges TRL leaves unchecked (`beta` > 0, `save_steps`
> 0, `warmup_steps` ≥ 0, batch sizes ≥ 1, ...), TRL's loss types, and then a `trl.DPOConfig` is built from each key
alone and from the whole section, so TRL's own refusals (`dpo.optim=sgdx`, `dpo.lr_scheduler_type=zigzag`,
`dpo.eval_strategy=sometimes`, `load_best_model_at_end` with unmatched strategies) are named by their key, all at
once (bf16/fp16/tf32 depend on the device and are checked when training starts). `length_min` < `length_max`, and a
non-empty `chosen_endings` / `complete_endings` of single characters (an ending such as `"..."` could never match a
reply's last character) too. A key given twice in a file is refused, named (JSON would keep the last one silently);
an empty `output_dir` is refused (it meant the current folder); a file that is not UTF-8 or is nested too deeply to
be a config is one line. run_pipeline reports its own problems and every stage's, of every iteration, together. The
keys that may change when a run resumes, and those that may differ from a finished stage's (run_pipeline), live on
each config class (`unchanged_results`, `resumable_changes`): one list for the script and the pipeline.
`tests/test_config_fuzz.py` injects 2 to 4 problems at once into each of 40 configs (10 per script and
run_pipeline; 127 problems): each is named with its key, in one run, and nothing else is.
"""


def type_name(annotation) -> str:
    """A key's type as a reader writes it: `str | None`, `list[str]` (a path key is a str)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # e.g. config.PathKey: a str with ~ expanded
        return type_name(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return "list of sections"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if annotation is type(None):
        return "None"
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None")


def default_text(field) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return "see below"
    return f"`{json.dumps(default)}`"


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def own_keys(cls) -> list[str]:
    """The keys `cls` itself declares (an override of a base's key included), in declaration order."""
    return [name for name in vars(cls).get("__annotations__", {}) if name in cls.model_fields]


def scripts_of(cls) -> str:
    return ", ".join(name for name, script_cls in SCRIPTS.items() if issubclass(script_cls, cls))


def key_table(cls, prefix: str = "") -> list[str]:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name in own_keys(cls) if not prefix else cls.model_fields:
        field = cls.model_fields[name]
        library = name in config.SECTION_KEYS and cls is not config.PipelineConfig  # generation, dpo: tables below
        lines.append(f"| `{prefix}{name}` | {'section' if library else cell(type_name(field.annotation))} | "
                     f"{'its table' if library else cell(default_text(field))} | "
                     f"{cell(field.description)} |")
    return lines


def args_values(section: str) -> dict[str, list]:
    """Each key of `section` that a config under args/ sets -> the distinct values set, in file order."""
    values: dict[str, list] = {}
    for path in sorted(ARGS.rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for key, value in config.without_comments(data.get(section) or {}).items():
            if key != "config" and value not in values.setdefault(key, []):
                values[key].append(value)
    return values


def values_text(values: list) -> str:
    return ", ".join(f"`{json.dumps(v)}`" for v in values) if values else "-"


def generation_table() -> list[str]:
    typed = config.GenerationSettings.model_fields
    set_in_args = args_values("generation")
    lines = ["| key | type | default | set in args/ | description |", "| --- | --- | --- | --- | --- |"]
    for name in [*typed, *(k for k in set_in_args if k not in typed)]:
        field = typed.get(name)
        default = config.REFERENCE_GENERATION.get(name, field.default if field else None)
        lines.append(f"| `generation.{name}` | {cell(type_name(field.annotation)) if field else '-'} | "
                     f"{'`' + json.dumps(default) + '`' if default is not None else 'transformers'} | "
                     f"{cell(values_text(set_in_args.get(name, [])))} | "
                     f"{cell(field.description) if field else 'see transformers.GenerationConfig'} |")
    return lines


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def dpo_table() -> list[str]:
    import trl

    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(trl.DPOConfig)}
    set_in_args = args_values("dpo")
    keys = list(dict.fromkeys([*config.DPO_DEFAULTS, *config.DPO_BOUNDS, *set_in_args]))
    lines = ["| key | this project's default | set in args/ | checked here | TRL's help (first sentence) |",
             "| --- | --- | --- | --- | --- |"]
    bounds = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    for name in keys:
        default = config.DPO_DEFAULTS.get(name)
        checked = [f"{bounds[k]} {v}" for m in getattr(config.DPO_BOUNDS.get(name), "metadata", [])
                   for k in bounds if getattr(m, k, None) is not None for v in [getattr(m, k)]]
        ours = f"`{json.dumps(default)}`" if name in config.DPO_DEFAULTS else "TRL's"
        lines.append(f"| `dpo.{name}` | {ours} | {cell(values_text(set_in_args.get(name, [])))} | "
                     f"{cell(', '.join(checked) or '-')} | {cell(first_sentence(helps[name]))} |")
    return lines


def generate() -> str:
    out = [INTRO]
    for cls, title in GROUPS:
        out += [f"## {title}", "", f"Used by: {scripts_of(cls)}.", ""]
        doc = (vars(cls).get("__doc__") or "").split("\n\nKeys:")[0].strip()
        if doc and doc != cls.__name__:
            out += [" ".join(doc.split()), ""]
        out += key_table(cls) + [""]
        for key, nested in NESTED.items():
            if key.rstrip("[]") in own_keys(cls):
                out += [f"### `{key.rstrip('[]')}`", ""] + key_table(nested, f"{key}.") + [""]
        if "generation" in own_keys(cls) and cls is config.GenerateConfig:
            out += ["### `generation` (generate_preferences, evaluate, chat)", "",
                    "Passed to `transformers.GenerationConfig` as it is: any of its keys "
                    "(https://huggingface.co/docs/transformers/main_classes/text_generation#transformers.GenerationConfig)"
                    ". The keys below are typed and bounded here; the defaults are the reference project's sampling "
                    "settings, and a section given replaces none of the others.", ""] + generation_table() + [""]
        if cls is config.TrainConfig:
            out += ["### `dpo`", "",
                    "Passed to `trl.DPOConfig` as it is: any of its fields "
                    "(https://huggingface.co/docs/trl/dpo_trainer, TRL 1.14.2); unknown ones are errors. Listed: the "
                    "keys this project sets a default for or sets in args/. `dpo.output_dir` and `dpo.report_to` are "
                    "refused: set the top-level `output_dir` and `wandb.mode`. bf16/fp16/tf32 are chosen by device "
                    "unless set.", ""] + dpo_table() + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is not current")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = DOC.exists() and DOC.read_text(encoding="utf-8") == text
        print(f"{DOC.relative_to(ROOT)} is {'current' if current else 'stale: run python -m emotion_dpo.config_docs'}")
        return 0 if current else 1
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
