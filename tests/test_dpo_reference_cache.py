"""The reference log-probs kept in the run folder (emotion_dpo/dpo_reference.py), model-free: a stand-in trainer
(TRL's args, an accelerator, a collator, how the base was loaded, a module holding base weights, a `default` and a
`ref` adapter and a modules_to_save layer) and a counting `compute`. Every input the key names changes it; nothing
else does; the file is read back only for exactly those inputs, that many pairs, numbers that match their checksum
and are finite, and the notice says why not. (tests/test_dpo_prefix.py runs the same cache through TRL's DPOTrainer
on the demo world.)

Expected values are written by hand from the rules: the key is the sha256 of the inputs as JSON with sorted keys,
the checksum the sha256 of {"ref_chosen_logps": [...], "ref_rejected_logps": [...]} the same way, a tensor's digest
"<dtype> <shape> <sha256 of its bytes>"."""

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from emotion_dpo.dpo_reference import REFERENCE_LOGPS, cached_reference_log_probs, reference_inputs
from emotion_dpo.errors import PipelineError


def sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def digest(tensor) -> str:
    flat = tensor.detach().contiguous().reshape(-1)
    return f"{flat.dtype} {list(tensor.shape)} " + hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def linear(at):
    layer = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():  # fixed weights, without touching the global random state
        layer.weight.copy_(torch.arange(4.0).reshape(2, 2) + at)
    return layer


class Model(torch.nn.Module):
    """Tensors named as PEFT names them: a base layer (`embed`), LoRA-like `q_proj.<adapter>.weight`, a
    modules_to_save layer (`lm_head.original_module` and `lm_head.modules_to_save.<adapter>`), PEFT's peft_config.
    Counts its state_dict calls."""

    def __init__(self, names=("default", "ref")):
        super().__init__()
        self.embed = linear(10)
        self.q_proj = torch.nn.ModuleDict({name: linear(at) for at, name in enumerate(names)})
        self.lm_head = torch.nn.ModuleDict({
            "original_module": linear(20),
            "modules_to_save": torch.nn.ModuleDict({name: linear(30 + at) for at, name in enumerate(names)})})
        self.peft_config = dict.fromkeys(names)
        self.state_dict_calls = 0

    def state_dict(self, *args, **kwargs):
        self.state_dict_calls += 1
        return super().state_dict(*args, **kwargs)


LOADED_AS = {"base_model": "demo/base", "load_in_4bit": False, "use_unsloth": False, "chat_template": "c" * 64}


def trainer_for(tmp_path, model=None, main=True, processes=1, device="cpu", pad_token_id=0, pad_to_multiple_of=None,
                pack_pairs_tokens=0, loaded_as=None, **args):
    settings = {"output_dir": str(tmp_path), "max_length": 512, "truncation_mode": "keep_end", "bf16": False,
                "fp16": False, "use_liger_kernel": False, "ld_alpha": None, "loss_type": ["sigmoid"]} | args
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, is_main_process=main, num_processes=processes,
                                  device=torch.device(device))
    return SimpleNamespace(args=SimpleNamespace(**settings), model=model or Model(), accelerator=accelerator,
                           data_collator=SimpleNamespace(pad_token_id=pad_token_id,
                                                         pad_to_multiple_of=pad_to_multiple_of),
                           pack_pairs_tokens=pack_pairs_tokens, base_loaded_as=dict(loaded_as or LOADED_AS))


IDS = {"prompt_ids": [[1, 2, 3], [1, 4]], "chosen_ids": [[5, 2], [6]], "rejected_ids": [[7], [8, 2]]}


def pairs(**change):
    return Dataset.from_dict(IDS | change)


def test_the_inputs_are_every_setting_by_name_and_the_large_ones_as_digests(tmp_path):
    model = Model()
    inputs = reference_inputs(trainer_for(tmp_path, model), pairs(), "shared", 4)
    ref = {"q_proj.weight": digest(model.q_proj["ref"].weight),
           "lm_head.modules_to_save.weight": digest(model.lm_head["modules_to_save"]["ref"].weight)}
    assert inputs == {
        "token_ids": sha(IDS), "max_length": 512, "truncation_mode": "keep_end", "pad_token_id": 0,
        "pad_to_multiple_of": None, "batch_size": 4, "num_processes": 1, "bf16": False, "fp16": False,
        "device": "cpu", "path": "shared", "pack_pairs_tokens": 0, "use_liger_kernel": False, "ld_alpha": None,
        "loss_type": ["sigmoid"], **LOADED_AS,
        "base_weights": sha({"embed.weight": digest(model.embed.weight)}),  # no adapter's, no original_module
        "reference_adapter": sha(ref)}


# ---------------------------------------------------------------- the file in the run folder

CHOSEN, REJECTED = [-1.5, -2.25], [-3.0, -4.75]  # binary fractions: exact through JSON


class Compute:
    """TRL's precompute as the trainer hands it over: the dataset with the two columns added; counts its calls."""

    def __init__(self, dataset, chosen=CHOSEN, rejected=REJECTED):
        self.dataset, self.calls, self.chosen, self.rejected = dataset, 0, chosen, rejected

    def __call__(self):
        self.calls += 1
        return self.dataset.add_column("ref_chosen_logps", self.chosen).add_column("ref_rejected_logps", self.rejected)


def cached(trainer, name="train", dataset=None, path_tag="shared", batch_size=4):
    compute = Compute(dataset or pairs())
    result = cached_reference_log_probs(trainer, dataset or pairs(), name, compute, path_tag, batch_size)
    return result, compute.calls


def file_of(tmp_path, name="train"):
    return tmp_path / REFERENCE_LOGPS / f"{name}.json"


def test_computed_once_written_to_the_run_folder_then_read_back(tmp_path):
    trainer = trainer_for(tmp_path)
    first, calls = cached(trainer)
    assert calls == 1 and first["ref_chosen_logps"] == CHOSEN
    assert trainer.reference_logps_files == {"train": (file_of(tmp_path), "computed by this run")}
    record = json.loads(file_of(tmp_path).read_text())
    assert (record["pairs"], record["ref_chosen_logps"], record["ref_rejected_logps"]) == (2, CHOSEN, REJECTED)
    assert record["key"] == sha(record["inputs"])
    assert record["inputs"]["token_ids"] == sha(IDS) and record["inputs"]["batch_size"] == 4
    assert record["sha256"] == sha({"ref_chosen_logps": CHOSEN, "ref_rejected_logps": REJECTED})
    again, calls = cached(trainer)
    assert calls == 0
    assert again["ref_chosen_logps"] == CHOSEN and again["ref_rejected_logps"] == REJECTED
    assert again["prompt_ids"] == IDS["prompt_ids"]
    assert trainer.reference_logps_files == {"train": (file_of(tmp_path), "read from the run folder")}


def test_read_back_the_notice_says_so_and_a_fresh_trainer_reads_it_too(tmp_path, capsys):
    cached(trainer_for(tmp_path))
    capsys.readouterr()
    assert cached(trainer_for(tmp_path))[1] == 0
    assert capsys.readouterr().out == (f"{file_of(tmp_path)}: the reference log-probs of 2 pairs, computed before; "
                                       "not computed again\n")


def test_the_training_and_the_held_out_split_keep_a_file_each_and_the_base_is_hashed_once(tmp_path):
    model = Model()
    trainer = trainer_for(tmp_path, model)
    held_out = pairs(prompt_ids=[[9, 9], [9]])
    assert cached(trainer, "train")[1] == 1 and cached(trainer, "eval", held_out)[1] == 1
    assert sorted(p.name for p in (tmp_path / REFERENCE_LOGPS).iterdir()) == ["eval.json", "train.json"]
    assert cached(trainer, "train")[1] == 0 and cached(trainer, "eval", held_out)[1] == 0
    assert model.state_dict_calls == 1  # the base's weights hashed once per trainer


def more_processes(trainer):
    trainer.accelerator.num_processes = 2


def on_cuda(trainer):
    trainer.accelerator.device = torch.device("cuda")


def base_in_4bit(trainer):
    trainer.base_loaded_as["load_in_4bit"] = True


def other_pad_token(trainer):
    trainer.data_collator.pad_token_id = 2


def padded_to_eight(trainer):
    trainer.data_collator.pad_to_multiple_of = 8


def packed(trainer):
    trainer.pack_pairs_tokens = 64


def base_changed(trainer):
    with torch.no_grad():
        trainer.model.embed.weight.add_(1.0)


def ref_changed(trainer):
    with torch.no_grad():
        trainer.model.q_proj["ref"].weight.add_(1.0)


def ref_modules_to_save_changed(trainer):
    with torch.no_grad():
        trainer.model.lm_head["modules_to_save"]["ref"].weight.mul_(2.0)


@pytest.mark.parametrize("settings, change, named", [
    ({"max_length": 500}, None, "max_length"), ({"truncation_mode": "keep_start"}, None, "truncation_mode"),
    ({"bf16": True}, None, "bf16"), ({"fp16": True}, None, "fp16"),
    ({"use_liger_kernel": True}, None, "use_liger_kernel"), ({"ld_alpha": 0.5}, None, "ld_alpha"),
    ({"loss_type": ["ipo"]}, None, "loss_type"), ({"loss_type": ["sigmoid", "sft"]}, None, "loss_type"),
    ({}, more_processes, "num_processes"), ({}, on_cuda, "device"), ({}, base_in_4bit, "load_in_4bit"),
    ({}, other_pad_token, "pad_token_id"), ({}, padded_to_eight, "pad_to_multiple_of"),
    ({}, packed, "pack_pairs_tokens"), ({}, base_changed, "base_weights"), ({}, ref_changed, "reference_adapter"),
    ({}, ref_modules_to_save_changed, "reference_adapter"),
])
def test_a_file_for_other_inputs_is_computed_again_naming_the_input(tmp_path, capsys, settings, change, named):
    cached(trainer_for(tmp_path))
    before = json.loads(file_of(tmp_path).read_text())["inputs"][named]
    trainer = trainer_for(tmp_path, **settings)
    if change:
        change(trainer)
    capsys.readouterr()
    assert cached(trainer)[1] == 1
    assert capsys.readouterr().out == (f"{file_of(tmp_path)}: computed for other inputs ({named}); computing the "
                                       "reference log-probs again\n")
    assert json.loads(file_of(tmp_path).read_text())["inputs"][named] != before
    assert trainer.reference_logps_files["train"][1] == "computed by this run"
    assert cached(trainer)[1] == 0  # the rewritten file is this run's


@pytest.mark.parametrize("path_tag, batch_size, named", [("plain", 4, "path"), ("shared", 8, "batch_size")])
def test_the_forward_path_and_the_batch_size_are_inputs(tmp_path, capsys, path_tag, batch_size, named):
    cached(trainer_for(tmp_path))
    capsys.readouterr()
    assert cached(trainer_for(tmp_path), path_tag=path_tag, batch_size=batch_size)[1] == 1
    assert f"computed for other inputs ({named})" in capsys.readouterr().out


@pytest.mark.parametrize("column", ["prompt_ids", "chosen_ids", "rejected_ids"])
def test_one_token_id_of_any_column_is_an_input(tmp_path, capsys, column):
    changed = [list(ids) for ids in IDS[column]]
    changed[1][0] += 1  # the second pair's first token of that column
    cached(trainer_for(tmp_path))
    capsys.readouterr()
    assert cached(trainer_for(tmp_path), dataset=pairs(**{column: changed}))[1] == 1
    assert "computed for other inputs (token_ids)" in capsys.readouterr().out


def test_the_trained_adapter_and_the_replaced_original_module_are_not_inputs(tmp_path):
    model = Model()
    cached(trainer_for(tmp_path, model))
    with torch.no_grad():  # the policy trains; resize_token_embeddings' random rows in the replaced layer
        model.q_proj["default"].weight.add_(1.0)
        model.lm_head["modules_to_save"]["default"].weight.add_(1.0)
        model.lm_head["original_module"].weight.add_(1.0)
    assert cached(trainer_for(tmp_path, model))[1] == 0


def test_without_a_ref_adapter_the_default_one_is_the_reference(tmp_path):
    model = Model(("default",))
    cached(trainer_for(tmp_path, model))
    with torch.no_grad():
        model.q_proj["default"].weight.mul_(2.0)
    assert cached(trainer_for(tmp_path, model))[1] == 1


def test_several_inputs_changed_are_named_in_order_and_one_only_in_the_old_record_too(tmp_path, capsys):
    cached(trainer_for(tmp_path))
    loaded_as = {k: v for k, v in LOADED_AS.items() if k != "use_unsloth"}
    capsys.readouterr()
    assert cached(trainer_for(tmp_path, ld_alpha=0.5, max_length=500, loaded_as=loaded_as))[1] == 1
    assert "computed for other inputs (ld_alpha, max_length, use_unsloth)" in capsys.readouterr().out


def rewrite(tmp_path, change, checksum=True):
    """The saved record with `change` applied, its checksum recomputed by the rule unless told not to."""
    path = file_of(tmp_path)
    record = json.loads(path.read_text())
    change(record)
    if checksum:
        record["sha256"] = sha({c: record[c] for c in ("ref_chosen_logps", "ref_rejected_logps")})
    path.write_text(json.dumps(record))


def refused(tmp_path, capsys, change, problem, checksum=True):
    trainer = trainer_for(tmp_path)
    cached(trainer)
    rewrite(tmp_path, change, checksum)
    capsys.readouterr()
    result, calls = cached(trainer)
    assert calls == 1 and result["ref_chosen_logps"] == CHOSEN
    assert capsys.readouterr().out == f"{file_of(tmp_path)}: {problem}; computing the reference log-probs again\n"
    record = json.loads(file_of(tmp_path).read_text())  # written again, whole
    assert (record["ref_chosen_logps"], record["ref_rejected_logps"]) == (CHOSEN, REJECTED)
    assert record["sha256"] == sha({"ref_chosen_logps": CHOSEN, "ref_rejected_logps": REJECTED})


def test_a_number_edited_past_its_checksum_is_refused(tmp_path, capsys):
    def edit(record):
        record["ref_rejected_logps"][1] += 65.0

    refused(tmp_path, capsys, edit, "its numbers do not match the checksum they were written with (edited or "
                                    "damaged)", checksum=False)


def test_a_file_without_a_checksum_is_refused(tmp_path, capsys):
    refused(tmp_path, capsys, lambda record: record.pop("sha256"), "its numbers do not match the checksum they were "
                                                                    "written with (edited or damaged)", checksum=False)


@pytest.mark.parametrize("column, at, value, shown", [("ref_rejected_logps", 1, float("nan"), "nan"),
                                                      ("ref_chosen_logps", 0, float("-inf"), "-inf"),
                                                      ("ref_chosen_logps", 1, float("inf"), "inf")])
def test_a_number_that_is_not_finite_is_refused_even_under_a_matching_checksum(tmp_path, capsys, column, at, value,
                                                                               shown):
    def spoil(record):
        record[column][at] = value

    refused(tmp_path, capsys, spoil, f"holds a number that is not finite (pair {at}, {column}: {shown})")


@pytest.mark.parametrize("value", [True, None, "-1.5"])
def test_a_value_that_is_not_a_number_is_refused(tmp_path, capsys, value):
    def spoil(record):
        record["ref_chosen_logps"][0] = value

    refused(tmp_path, capsys, spoil, "holds values that are not numbers")


@pytest.mark.parametrize("short", ["ref_chosen_logps", "ref_rejected_logps", "both"])
def test_a_file_with_fewer_values_than_pairs_is_refused(tmp_path, capsys, short):
    def cut(record):
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            if short in (column, "both"):
                record[column] = record[column][:1]
        record["pairs"] = 1

    refused(tmp_path, capsys, cut, "not 2 pairs of numbers")


def test_a_file_with_more_values_than_pairs_is_refused(tmp_path, capsys):
    def grow(record):
        record["ref_chosen_logps"].append(-1.0)
        record["ref_rejected_logps"].append(-1.0)

    refused(tmp_path, capsys, grow, "not 2 pairs of numbers")


def test_a_column_that_is_not_a_list_is_refused(tmp_path, capsys):
    def spoil(record):
        record["ref_chosen_logps"] = {"0": -1.5, "1": -2.25}

    refused(tmp_path, capsys, spoil, "not 2 pairs of numbers")


def test_a_file_without_its_key_is_refused(tmp_path, capsys):
    refused(tmp_path, capsys, lambda record: record.pop("key"), "computed for other inputs ()")


def test_a_file_for_other_inputs_whose_key_matches_its_own_inputs_is_refused(tmp_path, capsys):
    def other(record):  # a genuine file of a run with another max_length
        record["inputs"]["max_length"] = 500
        record["key"] = sha(record["inputs"])

    refused(tmp_path, capsys, other, "computed for other inputs (max_length)")


def test_a_file_of_other_inputs_that_did_not_record_them_is_refused(tmp_path, capsys):
    def older(record):
        record.pop("inputs")
        record["key"] = "0" * 64

    refused(tmp_path, capsys, older, "computed for other inputs (its inputs not recorded)")


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"train"'])
def test_a_file_that_is_not_a_json_object_is_refused(tmp_path, capsys, text):
    trainer = trainer_for(tmp_path)
    cached(trainer)
    file_of(tmp_path).write_text(text)
    capsys.readouterr()
    assert cached(trainer)[1] == 1
    assert capsys.readouterr().out == (f"{file_of(tmp_path)}: not a JSON object; computing the reference log-probs "
                                       "again\n")


def test_a_torn_file_is_computed_again(tmp_path, capsys):
    trainer = trainer_for(tmp_path)
    cached(trainer)
    path = file_of(tmp_path)
    path.write_text(path.read_text()[:20])  # cut mid-write: not JSON
    capsys.readouterr()
    assert cached(trainer)[1] == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: does not load (") and out.endswith("); computing the reference log-probs again\n")
    assert json.loads(path.read_text())["ref_chosen_logps"] == CHOSEN


@pytest.mark.parametrize("column, at, value, shown", [("ref_chosen_logps", 1, float("nan"), "nan"),
                                                      ("ref_rejected_logps", 0, float("-inf"), "-inf")])
def test_a_reference_pass_that_gives_a_number_not_finite_stops_the_run_and_writes_nothing(tmp_path, column, at,
                                                                                         value, shown):
    numbers = {"ref_chosen_logps": list(CHOSEN), "ref_rejected_logps": list(REJECTED)}
    numbers[column][at] = value
    compute = Compute(pairs(), numbers["ref_chosen_logps"], numbers["ref_rejected_logps"])
    with pytest.raises(PipelineError) as caught:
        cached_reference_log_probs(trainer_for(tmp_path), pairs(), "eval", compute, "shared", 4)
    assert str(caught.value) == (f"the reference pass gave a log-prob that is not finite (eval split, pair {at}, "
                                 f"{column}: {shown}); DPO would train against it; refusing to train")
    assert not (tmp_path / REFERENCE_LOGPS).exists()


def test_only_the_main_process_writes_the_file_or_prints(tmp_path, capsys):
    result, calls = cached(trainer_for(tmp_path, main=False))
    assert calls == 1 and result["ref_chosen_logps"] == CHOSEN
    assert not (tmp_path / REFERENCE_LOGPS).exists()
    cached(trainer_for(tmp_path))
    rewrite(tmp_path, lambda record: record.pop("key"))
    capsys.readouterr()
    assert cached(trainer_for(tmp_path, main=False))[1] == 1
    assert capsys.readouterr().out == ""
    assert "key" not in json.loads(file_of(tmp_path).read_text())  # left for the main process to rewrite
