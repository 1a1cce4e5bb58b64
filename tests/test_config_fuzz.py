"""Fuzzed broken configs: for each of 40 configs (10 per script: generate_preferences, fine_tune_dpo, evaluate and
run_pipeline), 2 to 4 problems drawn from a list and injected at once. Every injected problem is named with its key,
in one run, and nothing else is: no traceback, no problem that was not injected. The configs load in-process
through the entry points the scripts use (config.load_config; for run_pipeline also pipeline.plan); one per
script goes through the real script too."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emotion_dpo.config import EvaluateConfig, GenerateConfig, PipelineConfig, TrainConfig, load_config
from emotion_dpo.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"base_model": "b", "adapter": "a"}
SCORED = {"dataset": "d", "emotion_classifier": "e", "gibberish_detector": "g"}
VALID = {"generate": {**SHARED, **SCORED, "num_prompts": 8}, "dpo": {**SHARED, "dataset": "d"},
         "evaluate": {**SHARED, **SCORED, "dpo_adapter": "x"}}
CLASSES = {"generate": GenerateConfig, "dpo": TrainConfig, "evaluate": EvaluateConfig}
SCRIPTS = {"generate": "generate_preferences.py", "dpo": "fine_tune_dpo.py", "evaluate": "evaluate.py",
           "pipeline": "run_pipeline.py"}

# (dotted key, a value that is wrong there): each a problem on its own, none changing another key's check
SHARED_PROBLEMS = [("seed", -1), ("seed", True), ("use_unsloth", "yes"), ("load_in_4bit", "no"), ("output_dir", ""),
                   ("wandb.mode", "cloud"), ("wandb.projct", "x"), ("wandb.top_k", 3), ("chat_template", 5),
                   ("base_model", None), ("bogus", 1)]
GENERATION_PROBLEMS = [("generation.top_p", 2.0), ("generation.top_p", 0), ("generation.top_k", -1),
                       ("generation.max_new_tokens", "20"), ("generation.temperature", 0),
                       ("generation.do_sample", "False"), ("generation.temprature", 1.0),
                       ("generation.repetition_penalty", float("nan")), ("generation.min_p", 1.5),
                       ("generation.n_candidates", 3)]
PROMPT_PROBLEMS = [("num_turns_history", -1), ("skip_prompts", -1), ("num_prompts", 0), ("all_windows", "no"),
                   ("dataset_split", 3), ("reward_weights", [1, 2]), ("reward_bias", "0.1"), ("length_unit", "bytes"),
                   ("classifier_batch_size", 2.5), ("emotion_labels", ["a", "A"]), ("length_min", 0)]
PROBLEMS = {
    "generate": SHARED_PROBLEMS + GENERATION_PROBLEMS + PROMPT_PROBLEMS + [
        ("n_candidates", "six"), ("n_candidates", 1), ("max_retires", 3), ("temperature", 2.0),
        ("min_chosen_gibberish_confidence", 1.5), ("chosen_endings", []), ("target_score_range", float("inf")),
        ("batch_prompts", 0), ("push_to_hub", 1)],
    "dpo": SHARED_PROBLEMS + [
        ("dpo.optim", "sgdx"), ("dpo.lr_scheduler_type", "zigzag"), ("dpo.eval_strategy", "sometimes"),
        ("dpo.warmup_steps", -5), ("dpo.beta", 0), ("dpo.learning_rate", "fast"), ("dpo.betta", 0.1),
        ("dpo.loss_type", "sigmoidd"), ("dpo.save_steps", 0), ("dpo.output_dir", "x"), ("dpo.report_to", "wandb"),
        ("dpo.gradient_checkpointing", 1), ("dpo.per_device_train_batch_size", 0), ("dpo.max_length", 0),
        ("dpo.logging_strategy", "often"), ("eval_fraction", 0.9), ("train_modules_to_save", "yes"),
        ("resume_from_checkpoint", 3), ("beta", 0.1), ("allow_unmarked_prompts", 1), ("dataset", 7)],
    "evaluate": SHARED_PROBLEMS + GENERATION_PROBLEMS + PROMPT_PROBLEMS + [
        ("clean_confidence", 2), ("complete_endings", []), ("bootstrap_samples", 10), ("include_base", "no"),
        ("dpo_adapter", 5), ("batch_prompts", 0)],
}
# keys run_pipeline sets in the stages (refused there: PIPELINE_PROBLEMS) and num_prompts, which iteration 2 needs
PIPELINE_SET = ("output_dir", "dataset", "dpo_adapter", "adapter", "skip_prompts", "resume_from_checkpoint",
                "num_prompts")
PIPELINE_PROBLEMS = [("iterations", 0), ("iteratons", 2), ("output_dir", ""), ("fresh_prompts_per_iteration", "yes"),
                     ("generate.output_dir", "x"), ("dpo.dataset", "x"), ("evaluate.dpo_adapter", "x")]


def put(data: dict, dotted: str, value) -> None:
    *sections, key = dotted.split(".")
    for section in sections:
        data = data.setdefault(section, {})
    data[key] = value


def draw(rng, problems, k):
    """k problems on k different keys."""
    chosen = {}
    for key, value in rng.sample(problems, len(problems)):
        chosen.setdefault(key, value)
    return list(chosen.items())[:k]


def named(message: str, top: str) -> set[tuple]:
    """(stage or None, dotted key) of each line naming a key; run_pipeline's stage lines follow 'section X:'."""
    keys, section = set(), None
    for line in message.splitlines():
        if header := re.fullmatch(rf"{re.escape(top)}: section (\w+):", line):
            section = header[1]
        elif found := re.match(r"(.*?): key ([\w.]+): ", line):
            keys.add((None if found[1] == top else section, found[2]))
        else:
            raise AssertionError(f"a line that names no key: {line!r}")
    return keys


def broken(kind: str, seed: int, folder: Path) -> tuple[Path, set]:
    """A broken config of `kind` written under `folder`, and the (stage, key) of each problem injected into it."""
    rng = random.Random(f"{kind}-{seed}")
    if kind != "pipeline":
        data = json.loads(json.dumps(VALID[kind]))
        injected = draw(rng, PROBLEMS[kind], rng.randint(2, 4))
        for key, value in injected:
            put(data, key, value)
        path = folder / f"{kind}.json"
        path.write_text(json.dumps(data))
        return path, {(None, key) for key, _ in injected}
    stages = {name: folder / f"{name}.json" for name in VALID}
    for name, path in stages.items():
        path.write_text(json.dumps(VALID[name]))
    data = {name: {"config": str(path)} for name, path in stages.items()}
    data.update(iterations=2, output_dir=str(folder / "run"))
    expected = set()
    for key, value in draw(rng, PIPELINE_PROBLEMS, rng.randint(0, 2)):
        put(data, key, value)
        expected.add((None, key))
    for name in rng.sample(sorted(VALID), rng.randint(1, 3)):  # problems in one to three stages' sections
        problems = [p for p in PROBLEMS[name] if p[0] not in PIPELINE_SET]
        for key, value in draw(rng, problems, rng.randint(1, 2)):
            put(data[name], key, value)
            expected.add((name, key))
    path = folder / "pipeline.json"
    path.write_text(json.dumps(data))
    # a stage with a pipeline-set key is not resolved (the key is named); problems of its own file come next time
    return path, {e for e in expected if e[0] not in {k.split(".")[0] for s, k in expected if s is None}}


def load(kind: str, path: Path) -> None:
    if kind == "pipeline":
        from emotion_dpo.pipeline import plan

        plan(load_config(PipelineConfig, path))
    else:
        load_config(CLASSES[kind], path)


CASES = [(kind, seed) for kind in SCRIPTS for seed in range(10)]


@pytest.mark.parametrize("kind, seed", CASES)
def test_every_injected_problem_is_named_with_its_key_in_one_run(tmp_path, kind, seed):
    path, expected = broken(kind, seed, tmp_path)
    with pytest.raises(PipelineError) as caught:
        load(kind, path)
    assert named(str(caught.value), str(path)) == expected, str(caught.value)


@pytest.mark.parametrize("kind", list(SCRIPTS))
def test_the_scripts_report_them_so_too(tmp_path, kind):
    path, expected = broken(kind, 0, tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / SCRIPTS[kind]), "--config", str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().removeprefix("error: ")
    lines = [line for line in message.splitlines() if not line.startswith("[transformers]")]  # its logger's notes
    assert named("\n".join(lines), str(path)) == expected


def test_run_pipeline_names_the_problems_of_every_stage_and_its_own_together(tmp_path):
    # it named only its own problems, or only the first stage's
    stages = {name: tmp_path / f"{name}.json" for name in VALID}
    for name, path in stages.items():
        path.write_text(json.dumps(VALID[name]))
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"iterations": 0, "generate": {"config": str(stages["generate"]), "n_candidates": 1},
                                "dpo": {"config": str(stages["dpo"]), "dpo": {"optim": "sgdx"}},
                                "evaluate": {"config": str(stages["evaluate"]), "clean_confidence": 2}}))
    with pytest.raises(PipelineError) as caught:
        load("pipeline", path)
    assert named(str(caught.value), str(path)) == {(None, "iterations"), ("generate", "n_candidates"),
                                                   ("dpo", "dpo.optim"), ("evaluate", "clean_confidence")}
