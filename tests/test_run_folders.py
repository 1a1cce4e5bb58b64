"""Issue 32's failures (1: a run folder is a run folder; 2: a lock that holds), each reproduced as reported; on the
code before the fix each of these fails. The rules: every script marks the folder it makes with emotion_dpo_run.json
(which script, when); a non-empty folder without this script's marker (or the files an earlier version of it left)
is refused, naming what it holds, before anything is written; --fresh moves aside only this script's run; ".", "..",
"/", the home folder and the project's own folders are refused; so is a run folder inside another run's folder; a
leading ~ is the home folder; the run lock is the folder's own, so deleting .lock lets no second writer in."""

import json
import os
from pathlib import Path

import pytest

from emotion_dpo.config import EvaluateConfig, GenerateConfig, PipelineConfig, TrainConfig, load_config
from emotion_dpo.errors import PipelineError
from test_dpo import config as dpo_config
from test_faults import generate_config, preference_pairs, write_journal

ROOT = Path(__file__).resolve().parents[1]
MARKER = "emotion_dpo_run.json"
EVALUATE_CONFIG = ROOT / "args/demo/evaluate_arg.json"
PIPELINE_CONFIG = ROOT / "args/demo/pipeline_arg.json"
BAD_STAGE = "evaluate.clean_confidence=2"  # a pipeline that would get past the folder stops at its plan, runs nothing


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the run folder was checked")

    monkeypatch.setattr("emotion_dpo.models.load_generator", refuse)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def a_users_folder(folder: Path) -> Path:
    """A folder of someone's own: a project with its .git and a config.json of its own."""
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "config.json").write_text('{"theirs": true}\n')
    (folder / "notes.txt").write_text("precious\n")
    return folder


def start(script: str, output_dir: Path, demo_world, tmp_path, fresh: bool = False):
    """The script's claim on output_dir, as each script makes it (the lock it returns released)."""
    if script == "generate_preferences.py":
        from emotion_dpo.generate import prepare_output_dir

        prepare_output_dir(generate_config(demo_world, output_dir), fresh=fresh).release()
    elif script == "evaluate.py":
        from emotion_dpo.evaluation import evaluate

        w = demo_world
        evaluate(load_config(EvaluateConfig, EVALUATE_CONFIG, [
            f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dpo_adapter={w / 'sft_adapter'}",
            f"dataset={w / 'dialogues'}", f"emotion_classifier={w / 'emotion_classifier'}",
            f"gibberish_detector={w / 'gibberish_detector'}", f"chat_template={ROOT / 'args/chat_template.json'}",
            f"output_dir={output_dir}", "wandb.mode=disabled", "num_prompts=4"]), fresh=fresh)
    elif script == "fine_tune_dpo.py":
        from emotion_dpo.dpo_train import train

        cfg, _ = dpo_config(demo_world, preference_pairs(tmp_path / "pairs.jsonl", 8), output_dir)
        train(cfg, resume=True)
    else:
        from emotion_dpo.pipeline import run_pipeline

        run_pipeline(load_config(PipelineConfig, PIPELINE_CONFIG, [f"output_dir={output_dir}", BAD_STAGE]))


SCRIPTS = ["generate_preferences.py", "evaluate.py", "fine_tune_dpo.py", "run_pipeline.py"]


# ---------------------------------------------------------------- 1. a run folder is a run folder

def test_fresh_moves_aside_no_folder_that_is_not_a_run_of_the_script(demo_world, tmp_path):
    project = a_users_folder(tmp_path / "project")
    with pytest.raises(PipelineError, match=r"project: output_dir is not empty and holds no generate_preferences run "
                                            r"\(no emotion_dpo_run.json of generate_preferences.py\); it holds .git, "
                                            r"config.json, notes.txt; choose another output_dir"):
        start("generate_preferences.py", project, demo_world, tmp_path, fresh=True)
    assert listing(tmp_path) == ["project"]  # not moved aside
    assert listing(project) == [".git", "config.json", "notes.txt"]  # nothing written, no .lock


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_users_config_json_is_no_run_refused_before_anything_is_written(script, demo_world, tmp_path,
                                                                         no_model_loading):
    folder = a_users_folder(tmp_path / "mine")
    with pytest.raises(PipelineError, match=r"mine: output_dir is not empty and holds no .*; it holds .git, "
                                            "config.json, notes.txt"):
        start(script, folder, demo_world, tmp_path)
    assert listing(folder) == [".git", "config.json", "notes.txt"]  # no .lock, no marker
    assert (folder / "config.json").read_text() == '{"theirs": true}\n'


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_folder_another_script_made_is_refused_naming_that_script(script, demo_world, tmp_path, no_model_loading):
    other = "evaluate.py" if script != "evaluate.py" else "generate_preferences.py"
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"script": other, "made": "2024-01-01T00:00:00"}))
    (folder / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match=f"run: output_dir is a run folder of {other}, not of {script}"):
        start(script, folder, demo_world, tmp_path, fresh=script in ("generate_preferences.py", "evaluate.py"))
    assert listing(folder) == ["config.json", MARKER]


@pytest.mark.parametrize("place", [".", "..", "/", "~", "project", "project/tests"])
def test_the_current_folder_and_above_the_home_folder_and_the_projects_folders_are_refused(place, demo_world,
                                                                                          tmp_path, monkeypatch):
    home = a_users_folder(tmp_path / "home")
    work = a_users_folder(tmp_path / "up" / "work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    output_dir = {"project": ROOT, "project/tests": ROOT / "tests"}.get(place, place)
    fresh = place not in ("/", "project", "project/tests")  # (never moving this machine's / or this project aside)
    with pytest.raises(PipelineError, match=r": output_dir (is the|lies in the project's own folder).*; a run folder "
                                            r"must be a folder of its own"):
        start("generate_preferences.py", Path(output_dir), demo_world, tmp_path, fresh=fresh)
    assert listing(home) == listing(work) == [".git", "config.json", "notes.txt"]
    assert listing(tmp_path / "up") == ["work"] and (home / "config.json").read_text() == '{"theirs": true}\n'


def test_a_leading_tilde_is_the_home_folder_in_every_path_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    cfg = load_config(EvaluateConfig, EVALUATE_CONFIG, [
        "output_dir=~/tt", "dataset=~/dialogues.jsonl", "base_model=~/base", "adapter=~/sft", "dpo_adapter=~/dpo",
        "emotion_classifier=~/emotion", "gibberish_detector=~/gibberish", "chat_template=~/template.json",
        "well_formed_replies=~/well_formed.json", 'judges=[{"name": "j", "model": "~/judge"}]'])
    assert (cfg.output_dir, cfg.dataset, cfg.base_model, cfg.adapter, cfg.dpo_adapter) == (
        f"{home}/tt", f"{home}/dialogues.jsonl", f"{home}/base", f"{home}/sft", f"{home}/dpo")
    assert (cfg.emotion_classifier, cfg.gibberish_detector, cfg.chat_template, cfg.well_formed_replies) == (
        f"{home}/emotion", f"{home}/gibberish", f"{home}/template.json", f"{home}/well_formed.json")
    assert cfg.judges[0].model == f"{home}/judge"
    train = load_config(TrainConfig, ROOT / "args/demo/dpo_arg.json", [
        "output_dir=~/dpo", "resume_from_checkpoint=~/dpo/checkpoint-2", "reference_adapter=~/sft"])
    assert (train.output_dir, train.resume_from_checkpoint, train.reference_adapter) == (
        f"{home}/dpo", f"{home}/dpo/checkpoint-2", f"{home}/sft")
    generate = load_config(GenerateConfig, ROOT / "args/demo/generate_preferences_arg.json", ["output_dir=~/tt"])
    pipeline = load_config(PipelineConfig, PIPELINE_CONFIG, ["output_dir=~/run"])
    assert (generate.output_dir, pipeline.output_dir) == (f"{home}/tt", f"{home}/run")
    assert load_config(TrainConfig, ROOT / "args/demo/dpo_arg.json", ["dataset=hub-user/pairs"]).dataset == \
        "hub-user/pairs"  # a Hub id is left as it is


@pytest.mark.parametrize("legacy", [False, True])
def test_a_dpo_run_inside_a_generate_runs_dataset_is_refused(legacy, demo_world, tmp_path, settled_record,
                                                             no_model_loading):
    from emotion_dpo.generate import finalize, prepare_output_dir

    generated = tmp_path / "preferences"
    cfg = generate_config(demo_world, generated)
    prepare_output_dir(cfg, fresh=False).release()
    write_journal(generated, [settled_record(i) for i in range(2)])
    finalize(cfg, generated, total_prompts=2)  # dataset/ is the generate run's: its next --finalize replaces it
    if legacy:  # a run of a version before markers: its journal says what it is
        (generated / MARKER).unlink()
    with pytest.raises(PipelineError, match=r"dataset/dpo: output_dir lies inside .*preferences, a run folder of "
                                            r"generate_preferences.py, .*; choose an output_dir outside it"):
        start("fine_tune_dpo.py", generated / "dataset" / "dpo", demo_world, tmp_path)
    assert not (generated / "dataset" / "dpo").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_refused_start_leaves_no_lock_file_in_the_folder_it_refused(script, demo_world, tmp_path,
                                                                     no_model_loading):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(PipelineError):
        start(script, folder, demo_world, tmp_path)
    assert listing(folder) == ["thesis.tex"]


def test_an_earlier_versions_generate_run_is_resumed_and_moved_aside_by_fresh(demo_world, tmp_path, settled_record):
    earlier = tmp_path / "run"
    write_journal(earlier, [settled_record(0)])  # a journal, no marker: what earlier versions left
    start("generate_preferences.py", earlier, demo_world, tmp_path)
    assert json.loads((earlier / MARKER).read_text())["script"] == "generate_preferences.py"
    start("generate_preferences.py", earlier, demo_world, tmp_path, fresh=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert listing(aside) == ["config.json", MARKER, "journal.rank0.jsonl"]
    assert listing(earlier) == ["config.json", MARKER]


# ---------------------------------------------------------------- 2. a lock that holds

@pytest.mark.parametrize("script", SCRIPTS)
def test_a_second_writer_is_refused_after_the_lock_file_is_deleted(script, demo_world, tmp_path, no_model_loading):
    from emotion_dpo.files import FolderLock

    folder = tmp_path / "run"
    with FolderLock(folder, doing="training", create=True):
        (folder / ".lock").unlink()  # rm .lock while the first writer is alive
        with pytest.raises(PipelineError, match=f"{folder}: another process holds this folder's lock"):
            start(script, folder, demo_world, tmp_path)
        assert listing(folder) == []  # the refused one wrote nothing either


@pytest.mark.parametrize("files, script", [
    (["journal.rank0.jsonl"], "generate_preferences.py"),
    (["config.json", "checkpoint-4/"], "fine_tune_dpo.py"),
    (["config.json", "final_adapter/"], "fine_tune_dpo.py"),
    (["config.json", "start_adapter.json", "reference_logps/"], "fine_tune_dpo.py"),  # a start killed before step 1
    (["checkpoint-4/trainer_state.json"], "fine_tune_dpo.py"),  # a checkpoint copied in to resume from
    (["checkpoint-4/"], None),
    (["pipeline_config.json"], "run_pipeline.py"),
    (["iter-1/preferences.done.json"], "run_pipeline.py"),
    (["config.json"], None),  # anyone's
    (["config.json", "reference_logps/"], None),
])
def test_an_earlier_versions_run_folder_is_known_by_the_files_only_its_script_writes(files, script, tmp_path):
    from emotion_dpo.files import legacy_run_script

    for name in files:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if name.endswith("/") else path.write_text("{}")
    assert legacy_run_script(tmp_path) == script
