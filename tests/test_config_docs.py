"""docs/configuration.md against the config classes (model-free): the committed file is what
`python -m emotion_dpo.config_docs` generates from the help texts, every key of every config class has a help text,
and every key (dotted for sections) has its row; each script's --help points there."""

import json
import re
import subprocess
import sys

import pytest

from emotion_dpo import config, config_docs


def config_classes(cls=config.Section):
    for sub in cls.__subclasses__():
        yield sub
        yield from config_classes(sub)


def documented_rows(text: str) -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE))


@pytest.fixture(scope="module")
def generated():
    return config_docs.generate()


def test_the_committed_doc_is_the_generated_one(generated):
    committed = config_docs.DOC.read_text(encoding="utf-8")
    assert committed == generated, "docs/configuration.md is stale: run python -m emotion_dpo.config_docs"


def test_every_key_of_every_config_class_has_a_help_text():
    missing = [f"{cls.__name__}.{name}" for cls in dict.fromkeys(config_classes())
               for name, field in cls.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"config keys without a description (Field(description=...)): {missing}"


def test_a_key_without_a_help_text_fails_the_check(monkeypatch):
    field = config.SelectionConfig.model_fields["max_retries"]
    monkeypatch.setattr(field, "description", "")
    with pytest.raises(AssertionError, match="SelectionConfig.max_retries"):
        test_every_key_of_every_config_class_has_a_help_text()


def test_every_key_has_its_row(generated):
    rows = documented_rows(generated)
    expected = set()
    for cls in config_docs.SCRIPTS.values():
        for name, field in cls.model_fields.items():
            expected.add(name)
    for section, nested in config_docs.NESTED.items():
        expected |= {f"{section}.{name}" for name in nested.model_fields}
    expected |= {f"generation.{k}" for k in config.GenerationSettings.model_fields}
    expected |= {f"generation.{k}" for k in config_docs.args_values("generation")}
    expected |= {f"dpo.{k}" for k in [*config.DPO_DEFAULTS, *config_docs.args_values("dpo")]}
    assert not expected - rows, f"keys without a row in docs/configuration.md: {sorted(expected - rows)}"


def test_every_key_set_in_args_is_documented(generated):
    rows = documented_rows(generated)
    missing = []
    for path in sorted(config_docs.ARGS.rglob("*.json")):
        if path.name == "chat_template.json":
            continue
        data = config.without_comments(json.loads(path.read_text(encoding="utf-8")))
        if "generate" in data:  # a pipeline config: its stage sections name files and override their keys
            continue
        for key, value in data.items():
            if key in ("generation", "dpo"):
                missing += [f"{path.name}: {key}.{k}" for k in config.without_comments(value)
                            if f"{key}.{k}" not in rows]
            elif key not in rows:
                missing.append(f"{path.name}: {key}")
    assert not missing, missing


@pytest.mark.parametrize("script", ["generate_preferences.py", "fine_tune_dpo.py", "evaluate.py", "run_pipeline.py",
                                    "chat.py"])
def test_each_script_help_points_to_the_keys(script):
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120,
                         cwd=config_docs.ROOT)
    assert out.returncode == 0, out.stderr
    assert "docs/configuration.md" in out.stdout
