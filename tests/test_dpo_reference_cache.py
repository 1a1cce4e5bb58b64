"""The reference log-probs kept in the run folder (emotion_dpo/dpo_reference.py), model-free: a stand-in trainer
(TRL's args, an accelerator, a module holding a `default` and a `ref` adapter) and a counting `compute`. The key
changes with every input it names and with nothing else; the file is read back only for exactly those inputs and
that many pairs. (tests/test_dpo_prefix.py runs the same cache through TRL's DPOTrainer on the demo world.)"""

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from emotion_dpo.dpo_reference import REFERENCE_LOGPS, cached_reference_log_probs, reference_key


class Adapters(torch.nn.Module):
    """Parameters named as PEFT names them (`<module>.<adapter>.weight`), and PEFT's peft_config."""

    def __init__(self, names=("default", "ref")):
        super().__init__()
        self.q_proj = torch.nn.ModuleDict({name: torch.nn.Linear(2, 2, bias=False) for name in names})
        with torch.no_grad():  # fixed weights, without touching the global random state
            for at, layer in enumerate(self.q_proj.values()):
                layer.weight.copy_(torch.arange(4.0).reshape(2, 2) + at)
        self.peft_config = dict.fromkeys(names)


def trainer_for(tmp_path, model=None, main=True, **args):
    settings = {"output_dir": str(tmp_path), "max_length": 512, "truncation_mode": "keep_end", "bf16": False,
                "fp16": False} | args
    return SimpleNamespace(args=SimpleNamespace(**settings), model=model or Adapters(),
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m, is_main_process=main))


def pairs(**change):
    columns = {"prompt_ids": [[1, 2, 3], [1, 4]], "chosen_ids": [[5, 2], [6]], "rejected_ids": [[7], [8, 2]]}
    return Dataset.from_dict(columns | change)


def test_the_key_is_the_same_for_the_same_inputs(tmp_path):
    assert reference_key(trainer_for(tmp_path), pairs(), "shared") == reference_key(trainer_for(tmp_path), pairs(),
                                                                                    "shared")


@pytest.mark.parametrize("setting", [{"max_length": 500}, {"truncation_mode": "keep_start"}, {"bf16": True},
                                     {"fp16": True}])
def test_the_key_changes_with_trls_truncation_rule_and_the_precision(tmp_path, setting):
    assert reference_key(trainer_for(tmp_path, **setting), pairs(), "shared") != reference_key(
        trainer_for(tmp_path), pairs(), "shared")


def test_the_key_changes_with_the_forward_path(tmp_path):
    assert reference_key(trainer_for(tmp_path), pairs(), "plain") != reference_key(trainer_for(tmp_path), pairs(),
                                                                                   "shared")


@pytest.mark.parametrize("column", ["prompt_ids", "chosen_ids", "rejected_ids"])
def test_the_key_changes_with_one_token_id_of_any_column(tmp_path, column):
    changed = [list(ids) for ids in pairs()[column]]
    changed[1][0] += 1  # the second pair's first token of that column
    assert reference_key(trainer_for(tmp_path), pairs(**{column: changed}), "shared") != reference_key(
        trainer_for(tmp_path), pairs(), "shared")


def test_the_key_follows_the_ref_adapters_tensors_not_the_trained_ones(tmp_path):
    model = Adapters()
    before = reference_key(trainer_for(tmp_path, model), pairs(), "shared")
    with torch.no_grad():
        model.q_proj["default"].weight.add_(1.0)  # the policy trains: the reference is unchanged
    assert reference_key(trainer_for(tmp_path, model), pairs(), "shared") == before
    with torch.no_grad():
        model.q_proj["ref"].weight.add_(1.0)
    assert reference_key(trainer_for(tmp_path, model), pairs(), "shared") != before


def test_without_a_ref_adapter_the_key_follows_the_default_one(tmp_path):
    model = Adapters(("default",))
    before = reference_key(trainer_for(tmp_path, model), pairs(), "shared")
    with torch.no_grad():
        model.q_proj["default"].weight.mul_(2.0)
    assert reference_key(trainer_for(tmp_path, model), pairs(), "shared") != before


# ---------------------------------------------------------------- the file in the run folder

CHOSEN, REJECTED = [-1.5, -2.25], [-3.0, -4.75]  # binary fractions: exact through JSON


class Compute:
    """TRL's precompute as the trainer hands it over: the dataset with the two columns added; counts its calls."""

    def __init__(self, dataset):
        self.dataset, self.calls = dataset, 0

    def __call__(self):
        self.calls += 1
        return self.dataset.add_column("ref_chosen_logps", CHOSEN).add_column("ref_rejected_logps", REJECTED)


def cached(trainer, name="train", dataset=None, path_tag="shared"):
    compute = Compute(dataset or pairs())
    result = cached_reference_log_probs(trainer, dataset or pairs(), name, compute, path_tag)
    return result, compute.calls


def test_computed_once_written_to_the_run_folder_then_read_back(tmp_path):
    trainer = trainer_for(tmp_path)
    first, calls = cached(trainer)
    assert calls == 1
    record = json.loads((tmp_path / REFERENCE_LOGPS / "train.json").read_text())
    assert (record["pairs"], record["ref_chosen_logps"], record["ref_rejected_logps"]) == (2, CHOSEN, REJECTED)
    assert record["key"] == reference_key(trainer, pairs(), "shared")
    again, calls = cached(trainer)
    assert calls == 0
    assert again["ref_chosen_logps"] == CHOSEN and again["ref_rejected_logps"] == REJECTED
    assert again["prompt_ids"] == pairs()["prompt_ids"]


def test_the_training_and_the_held_out_split_keep_a_file_each(tmp_path):
    trainer = trainer_for(tmp_path)
    held_out = pairs(prompt_ids=[[9, 9], [9]])
    assert cached(trainer, "train")[1] == 1 and cached(trainer, "eval", held_out)[1] == 1
    assert sorted(p.name for p in (tmp_path / REFERENCE_LOGPS).iterdir()) == ["eval.json", "train.json"]
    assert cached(trainer, "train")[1] == 0 and cached(trainer, "eval", held_out)[1] == 0


def test_a_file_for_other_inputs_is_computed_again_and_replaced(tmp_path):
    cached(trainer_for(tmp_path))
    _, calls = cached(trainer_for(tmp_path, max_length=500))
    assert calls == 1
    saved = json.loads((tmp_path / REFERENCE_LOGPS / "train.json").read_text())
    assert saved["key"] == reference_key(trainer_for(tmp_path, max_length=500), pairs(), "shared")


def test_a_file_with_fewer_values_than_pairs_is_computed_again(tmp_path):
    trainer = trainer_for(tmp_path)
    cached(trainer)
    path = tmp_path / REFERENCE_LOGPS / "train.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record | {"ref_rejected_logps": REJECTED[:1]}))  # same key, one value short
    assert cached(trainer)[1] == 1


def test_a_torn_file_is_computed_again(tmp_path):
    trainer = trainer_for(tmp_path)
    cached(trainer)
    path = tmp_path / REFERENCE_LOGPS / "train.json"
    path.write_text(path.read_text()[:20])  # cut mid-write: not JSON
    assert cached(trainer)[1] == 1
    assert json.loads(path.read_text())["ref_chosen_logps"] == CHOSEN


def test_only_the_main_process_writes_the_file(tmp_path):
    result, calls = cached(trainer_for(tmp_path, main=False))
    assert calls == 1 and result["ref_chosen_logps"] == CHOSEN
    assert not (tmp_path / REFERENCE_LOGPS).exists()
