"""fine_tune_dpo: one base model, the SFT adapter trainable, TRL's frozen copy of it as the reference —
proven on the demo world, on the CPU."""

import dataclasses
import gc
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl

from emotion_dpo.config import TrainConfig, load_config
from emotion_dpo.dpo_data import load_preferences
from emotion_dpo.dpo_guard import REFERENCE_ADAPTER, START_ADAPTER
from emotion_dpo.dpo_train import FINAL_ADAPTER, build_dpo_config, make_trainer, train, trl_defaults_for_unset
from emotion_dpo.errors import PipelineError
from emotion_dpo.models import load_generator

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "args/demo/dpo_arg.json"
LN2 = math.log(2)


def config(demo_world, dataset, output_dir, *extra):
    w = demo_world
    sets = [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dataset={dataset}",
            f"chat_template={ROOT / 'args/chat_template.json'}", f"output_dir={output_dir}", "wandb.mode=disabled",
            'dpo.loss_type=["sigmoid"]', "dpo.logging_steps=1", "dpo.max_length=96", *extra]
    return load_config(TrainConfig, DEMO_CONFIG, sets), sets


def build_trainer(cfg):
    train_set, eval_set = load_preferences(cfg)
    model, tokenizer = load_generator(cfg, trainable=True)
    return make_trainer(cfg, model, tokenizer, build_dpo_config(cfg, eval_set is not None), train_set, eval_set)


def adapter_params(model, name):
    return {k: v.detach().clone() for k, v in model.named_parameters() if f".{name}." in k}


@pytest.fixture(scope="module")
def few_steps(demo_world, demo_preferences, tmp_path_factory):
    """A trainer before and after 4 optimizer steps of plain (sigmoid) DPO."""
    cfg, _ = config(demo_world, demo_preferences, tmp_path_factory.mktemp("few") / "dpo", "dpo.max_steps=4",
                    "dpo.per_device_train_batch_size=4", "eval_fraction=0.0")
    trainer = build_trainer(cfg)
    before = {"default": adapter_params(trainer.model, "default"), "ref": adapter_params(trainer.model, "ref")}
    trainer.train()
    return trainer, before, cfg


def test_a_exactly_one_base_model_with_a_trainable_and_a_frozen_reference_adapter(few_steps):
    trainer, _, _ = few_steps
    assert trainer.ref_model is None
    assert set(trainer.model.peft_config) == {"default", REFERENCE_ADAPTER}
    gc.collect()
    bases = [o for o in gc.get_objects() if type(o).__name__ == "LlamaForCausalLM"]
    assert len(bases) == 1
    trainable = {k for k, v in trainer.model.named_parameters() if v.requires_grad}
    assert trainable and all(".default." in k for k in trainable)


def test_b_the_reference_adapter_is_bitwise_unchanged_and_the_trainable_one_moved(few_steps):
    trainer, before, _ = few_steps
    after_ref = adapter_params(trainer.model, "ref")
    assert any("modules_to_save" in k for k in after_ref)  # embedding and LM head copies are covered too
    assert set(after_ref) == set(before["ref"])
    for name, value in after_ref.items():
        assert torch.equal(value, before["ref"][name]), name
    after_default = adapter_params(trainer.model, "default")
    changed = [k for k, v in after_default.items() if not torch.equal(v, before["default"][k])]
    assert any("lora_B" in k for k in changed) and any("modules_to_save" in k for k in changed)


def test_c_at_step_0_the_policy_equals_the_reference(few_steps):
    trainer, _, _ = few_steps
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-3)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-2)


def sequence_logp(model, prompt_ids, completion_ids):
    """Sum of log p(completion tokens | prompt), computed here independently of TRL, on the ids generation kept
    (the dataset's prompt_ids and chosen_ids / rejected_ids, which end in EOS)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    token_logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(token_logps[len(prompt_ids) - 1:].sum())


def test_c_precomputed_reference_log_probs_match_the_sft_adapter_loaded_on_its_own(demo_world, demo_preferences,
                                                                                   tmp_path):
    cfg, _ = config(demo_world, demo_preferences, tmp_path / "dpo", "dpo.precompute_ref_log_probs=true",
                    "eval_fraction=0.0")
    trainer = build_trainer(cfg)
    data = trainer.train_dataset
    assert "ref_chosen_logps" in data.column_names
    sft, tokenizer = load_generator(cfg)  # the original SFT adapter, on a base of its own
    raw, _ = load_preferences(cfg)
    for i in range(4):
        expected_chosen = sequence_logp(sft, raw[i]["prompt_ids"], raw[i]["chosen_ids"])
        expected_rejected = sequence_logp(sft, raw[i]["prompt_ids"], raw[i]["rejected_ids"])
        assert data[i]["ref_chosen_logps"] == pytest.approx(expected_chosen, rel=1e-4, abs=1e-4)
        assert data[i]["ref_rejected_logps"] == pytest.approx(expected_rejected, rel=1e-4, abs=1e-4)
    trainer.args.max_steps = 2
    trainer.train()  # precomputed reference log-probs train as well


def test_c_after_training_the_reference_is_still_the_sft_adapter_and_the_policy_moved(few_steps):
    """The log-probs TRL uses as the reference (adapter "ref", not precomputed) equal the SFT adapter's own."""
    trainer, _, cfg = few_steps
    raw, _ = load_preferences(cfg)
    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
    trainer.model.eval()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    sft, tokenizer = load_generator(cfg)  # the original SFT adapter, on a base of its own
    for i in range(3):
        assert float(ref_chosen[i]) == pytest.approx(
            sequence_logp(sft, raw[i]["prompt_ids"], raw[i]["chosen_ids"]), rel=1e-4, abs=1e-4)
        assert float(ref_rejected[i]) == pytest.approx(
            sequence_logp(sft, raw[i]["prompt_ids"], raw[i]["rejected_ids"]), rel=1e-4, abs=1e-4)
    policy_chosen = sequence_logp(trainer.model, raw[0]["prompt_ids"], raw[0]["chosen_ids"])
    assert policy_chosen != pytest.approx(float(ref_chosen[0]), abs=1e-3)  # "default" is the trained adapter


@pytest.fixture(scope="module")
def saved_run(demo_world, demo_preferences, tmp_path_factory):
    """fine_tune_dpo's train(): 6 steps with a checkpoint every 2, the final adapter saved, wandb offline."""
    out = tmp_path_factory.mktemp("saved") / "dpo"
    cfg, sets = config(demo_world, demo_preferences, out, "dpo.max_steps=6", "dpo.save_steps=2",
                       "dpo.save_total_limit=null", "dpo.per_device_train_batch_size=4", "eval_fraction=0.0",
                       "dpo.eval_strategy=no", "wandb.mode=offline")
    train(cfg)
    return out, sets


def test_d_the_saved_adapter_reloads_generates_and_has_no_reference_copy(saved_run, demo_world):
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = saved_run[0] / FINAL_ADAPTER
    assert not (final / REFERENCE_ADAPTER).exists()
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(".ref." in k or k.startswith("ref.") for k in keys)
    assert not any("original_module" in k or "modules_to_save" in k for k in keys)  # no redundant embedding copies
    tokenizer = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(demo_world / "base")
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, final)
    assert list(model.peft_config) == ["default"]
    trained = load_file(str(saved_run[0] / "checkpoint-6" / "adapter_model.safetensors"))
    for name, value in model.named_parameters():  # the reloaded adapter is the trained one, embeddings included
        key = name.replace(".modules_to_save.default", "").replace(".default", "")
        if ".default" in name:
            assert torch.equal(value, trained[key]), name
    batch = tokenizer(["<s>[INST] [EMOTION] neutral [/EMOTION] hello . [/INST] [EMOTION] happiness [/EMOTION]"],
                      return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > batch["input_ids"].shape[1]
    assert json.loads((final / "training_config.json").read_text())["output_dir"] == str(saved_run[0])


def test_the_run_folder_holds_checkpoints_metrics_and_an_offline_wandb_run(saved_run):
    out = saved_run[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    first = json.loads((out / "metrics.json").read_text())["train"][0]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert name in first, name
    (offline,) = (out / "wandb").glob("offline-run-*")  # one offline run, holding its logged data
    assert list(offline.glob("run-*.wandb")) and next(offline.glob("run-*.wandb")).stat().st_size > 0
    for checkpoint in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):  # the resolved config, in every checkpoint
        assert json.loads((out / checkpoint / "training_config.json").read_text())["dpo"]["save_steps"] == 2
        assert json.loads((out / checkpoint / "processes.json").read_text()) == {"num_processes": 1}  # for --resume


def test_e_resume_continues_at_the_right_step_with_the_same_optimizer_state(saved_run, demo_world, demo_preferences,
                                                                           tmp_path, recwarn):
    from safetensors.torch import load_file

    first, _ = saved_run
    resumed = tmp_path / "dpo"
    resumed.mkdir()
    # checkpoint-4, not the first one: PEFT writes later checkpoints with extra embedding copies.
    shutil.copytree(first / "checkpoint-4", resumed / "checkpoint-4")
    cfg, _ = config(demo_world, demo_preferences, resumed, "dpo.max_steps=6", "dpo.save_steps=2",
                    "dpo.save_total_limit=null", "dpo.per_device_train_batch_size=4", "eval_fraction=0.0",
                    "dpo.eval_strategy=no")
    train(cfg, resume=True)
    assert not [w for w in recwarn if "differs from the checkpoint" in str(w.message)]
    check = json.loads((resumed / "metrics.json").read_text())["reference_check"]
    assert check["equal_to"] == "the adapter the run started from (start_adapter.json)"  # not the trained default
    state = json.loads((resumed / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]
    # Same data order, same optimizer state: the resumed run ends where the uninterrupted one did.
    a = load_file(str(first / FINAL_ADAPTER / "adapter_model.safetensors"))
    b = load_file(str(resumed / FINAL_ADAPTER / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    opt_a = torch.load(first / "checkpoint-6" / "optimizer.pt", weights_only=False)["state"]
    opt_b = torch.load(resumed / "checkpoint-6" / "optimizer.pt", weights_only=False)["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        assert opt_a[k]["step"] == opt_b[k]["step"]
        torch.testing.assert_close(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"], rtol=1e-5, atol=1e-7)


def sha256_digest(tensor):
    """dtype, shape and sha256 of a tensor's bytes, written out here from hashlib and numpy."""
    import hashlib

    array = tensor.contiguous().numpy()
    return f"{tensor.dtype} {list(tensor.shape)} " + hashlib.sha256(array.tobytes()).hexdigest()


def test_the_reference_guard_is_recorded_and_the_start_adapter_is_the_sft_adapter(saved_run, demo_world):
    out, _ = saved_run
    check = json.loads((out / "metrics.json").read_text())["reference_check"]
    assert check["adapter"] == "ref" and check["frozen"] and check["equal_to"] == "the trainable adapter 'default'"
    first = check["first_batch"]
    assert first["pairs"] == 4 and first["max_abs_logratio"] <= first["tolerance"] == 1e-3
    assert first["max_abs_margin"] <= first["max_abs_logratio"]
    # The digests recorded at the start are those of the SFT adapter's own file (its LoRA matrices, by name).
    recorded = json.loads((out / START_ADAPTER).read_text())
    sft = saved_tensors(demo_world / "sft_adapter")
    lora = [k for k in sft if "lora_" in k]
    assert lora and all(recorded[k] == sha256_digest(sft[k]) for k in lora)
    assert len(recorded) == check["tensors"] == len(sft)  # and one per modules_to_save copy
    for checkpoint in out.glob("checkpoint-*"):  # carried by every checkpoint, for a resume elsewhere
        assert json.loads((checkpoint / START_ADAPTER).read_text()) == recorded


@pytest.mark.parametrize("part", ["lora_B", "modules_to_save"])
def test_the_reference_guard_refuses_a_perturbed_reference_weight(demo_world, demo_preferences, tmp_path,
                                                                  monkeypatch, part):
    import emotion_dpo.dpo_train as dpo

    built = dpo.make_trainer

    def perturbed(*args, **kwargs):
        trainer = built(*args, **kwargs)
        name = next(n for n, _ in trainer.model.named_parameters() if f"{part}.{REFERENCE_ADAPTER}" in n)
        with torch.no_grad():
            trainer.model.get_parameter(name).view(-1)[0] += 1e-3  # one number of one tensor
        return trainer

    monkeypatch.setattr(dpo, "make_trainer", perturbed)
    cfg, _ = config(demo_world, demo_preferences, tmp_path / "dpo", "dpo.max_steps=2", "eval_fraction=0.0")
    with pytest.raises(PipelineError, match=r"reference adapter 'ref' differs from the trainable adapter 'default' "
                                            r"in 1 of \d+ tensors \(first: .*" + part):
        train(cfg)
    assert not list((tmp_path / "dpo").glob("checkpoint-*")) and not (tmp_path / "dpo" / "metrics.json").exists()


def test_the_reference_guard_refuses_a_reference_pass_that_falls_back_to_the_base_model(
        demo_world, demo_preferences, tmp_path, monkeypatch):
    """The known silent failure: the weights are right, but the reference log-probs come from the bare base."""
    import trl.trainer.dpo_trainer as dpo_trainer

    from emotion_dpo.dpo_guard import check_reference_weights

    use_adapter = dpo_trainer.use_adapter
    monkeypatch.setattr(dpo_trainer, "use_adapter", lambda model, adapter_name: use_adapter(model, None))
    cfg, _ = config(demo_world, demo_preferences, tmp_path / "dpo", "dpo.max_steps=2", "eval_fraction=0.0")
    probe, _ = config(demo_world, demo_preferences, tmp_path / "probe", "dpo.max_steps=2", "eval_fraction=0.0")
    assert check_reference_weights(build_trainer(probe).model)["frozen"]  # the weights pass (in a folder of its own)
    with pytest.raises(PipelineError, match="on the first batch the policy and the reference disagree by up to"):
        train(cfg)
    assert not list((tmp_path / "dpo").glob("checkpoint-*"))


def test_e_resume_checks_the_reference_against_the_adapter_the_run_started_from(saved_run, demo_world,
                                                                                 demo_preferences, tmp_path):
    first, _ = saved_run
    resumed = tmp_path / "dpo"
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-4", resumed / "checkpoint-4")
    start = json.loads((resumed / "checkpoint-4" / START_ADAPTER).read_text())
    name = next(k for k in start if "lora_A" in k)
    start[name] = start[name][:-4] + "0000"  # as if the run had started from another adapter
    (resumed / "checkpoint-4" / START_ADAPTER).write_text(json.dumps(start))
    cfg, _ = config(demo_world, demo_preferences, resumed, "dpo.max_steps=6", "dpo.per_device_train_batch_size=4",
                    "eval_fraction=0.0", "dpo.eval_strategy=no")
    with pytest.raises(PipelineError, match=r"differs from the adapter the run started from \(start_adapter.json\) "
                                            r"in 1 of \d+ tensors \(first: " + re.escape(name)):
        train(cfg, resume=True)


def test_e_resume_checks_the_reference_the_checkpoint_hands_back(saved_run, demo_world, demo_preferences, tmp_path):
    """The Trainer reloads checkpoint-*/ref/ into the reference as it resumes: a ref there that is not the adapter
    the run started from (here one LoRA weight moved) must be refused, not trained against."""
    from safetensors.torch import load_file, save_file

    first, _ = saved_run
    resumed = tmp_path / "dpo"
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-4", resumed / "checkpoint-4")
    saved = resumed / "checkpoint-4" / REFERENCE_ADAPTER / "adapter_model.safetensors"
    weights = load_file(str(saved))
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = weights[name] + 0.01
    save_file(weights, str(saved))
    cfg, _ = config(demo_world, demo_preferences, resumed, "dpo.max_steps=6", "dpo.per_device_train_batch_size=4",
                    "eval_fraction=0.0", "dpo.eval_strategy=no")
    with pytest.raises(PipelineError, match=r"differs from the adapter the run started from \(start_adapter.json\)"):
        train(cfg, resume=True)
    assert not (resumed / "checkpoint-6").exists()  # refused before any step


def test_e_resuming_with_a_changed_setting_warns(saved_run):
    from emotion_dpo.dpo_train import resolve_resume

    _, sets = saved_run
    cfg = load_config(TrainConfig, DEMO_CONFIG, [*sets, "dpo.beta=0.2"])
    with pytest.warns(UserWarning, match=r"differs from the checkpoint's:\n  dpo.beta: 0.5 -> 0.2$"):
        assert resolve_resume(cfg, True).name == "checkpoint-6"


def test_e_resuming_with_the_modules_to_save_frozen_instead_of_trained_is_refused(saved_run):
    """The frozen copies are shared with the reference: loading the checkpoint's trained ones would move it."""
    from emotion_dpo.dpo_train import resolve_resume

    out, sets = saved_run
    cfg = load_config(TrainConfig, DEMO_CONFIG, [*sets, "train_modules_to_save=false"])
    with pytest.raises(PipelineError, match="trained with train_modules_to_save true; resume it with the same setting"):
        resolve_resume(cfg, True)
    cfg = load_config(TrainConfig, DEMO_CONFIG, [*sets, "train_modules_to_save=false",
                                                  f"resume_from_checkpoint={out / 'checkpoint-4'}"])
    with pytest.raises(PipelineError, match="checkpoint-4: trained with train_modules_to_save true"):
        resolve_resume(cfg, False)


def test_e_a_checkpoint_with_trained_copies_but_no_config_is_refused_when_they_should_be_frozen(
        saved_run, demo_world, demo_preferences, tmp_path):
    first, _ = saved_run
    resumed = tmp_path / "dpo"
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-4", resumed / "checkpoint-4")
    (resumed / "checkpoint-4" / "training_config.json").unlink()  # e.g. a checkpoint from elsewhere
    cfg, _ = config(demo_world, demo_preferences, resumed, "dpo.max_steps=6", "dpo.per_device_train_batch_size=4",
                    "eval_fraction=0.0", "dpo.eval_strategy=no", "train_modules_to_save=false")
    with pytest.raises(PipelineError, match="its modules_to_save were trained, but train_modules_to_save is false"):
        train(cfg, resume=True)


def test_e_an_existing_run_is_not_overwritten_without_resume(saved_run):
    _, sets = saved_run
    with pytest.raises(PipelineError, match="already holds a run .*pass --resume"):
        train(load_config(TrainConfig, DEMO_CONFIG, sets))


def test_e_a_start_that_stopped_before_its_first_checkpoint_does_not_block_the_next(demo_world, tmp_path):
    from emotion_dpo.dpo_train import resolve_resume

    out = tmp_path / "dpo"
    (out / "wandb").mkdir(parents=True)
    (out / "config.json").write_text("{}")  # what train() writes before the model loads (and fails to)
    cfg, _ = config(demo_world, "d.jsonl", out)
    assert resolve_resume(cfg, False) is None
    (out / "notes.txt").write_text("anything else: a run, or not ours")
    with pytest.raises(PipelineError, match="already holds a run"):
        resolve_resume(cfg, False)


def test_e_a_folder_a_start_left_is_checked_against_the_config(demo_world, tmp_path, recwarn):
    """config.json and reference_logps/ alone (a start stopped before its first checkpoint): started again, but
    with another config never silently."""
    from emotion_dpo.config import save_config
    from emotion_dpo.dpo_train import resolve_resume

    out = tmp_path / "dpo"
    started, _ = config(demo_world, "d.jsonl", out)
    (out / "reference_logps").mkdir(parents=True)
    save_config(started, out, "config.json")
    (out / "reference_logps" / "train.json").write_text("{}")
    assert resolve_resume(started, False) is None
    assert not [w for w in recwarn if "differs" in str(w.message)]  # the same config: nothing to say
    changed, _ = config(demo_world, "d.jsonl", out, "dpo.beta=0.2")
    for resume in (False, True):
        with pytest.warns(UserWarning, match=re.escape(f"{out / 'config.json'}: starting again with a config that "
                                                       "differs from the one this folder was started with:\n  "
                                                       "dpo.beta: 0.5 -> 0.2")):
            assert resolve_resume(changed, resume) is None


def test_e_reference_log_probs_edited_in_the_run_folder_are_computed_again_on_resume(
        saved_run, demo_world, demo_preferences, tmp_path, capsys):
    """The chosen replies' numbers in reference_logps/train.json moved by 65 nats (its checksum as written):
    --resume recomputes them and ends on the uninterrupted run's adapter, not on another."""
    from safetensors.torch import load_file

    first, _ = saved_run
    resumed = tmp_path / "dpo"
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-4", resumed / "checkpoint-4")
    shutil.copytree(first / "reference_logps", resumed / "reference_logps")
    saved = resumed / "reference_logps" / "train.json"
    record = json.loads(saved.read_text())
    record["ref_chosen_logps"] = [value + 65.0 for value in record["ref_chosen_logps"]]
    saved.write_text(json.dumps(record))
    cfg, _ = config(demo_world, demo_preferences, resumed, "dpo.max_steps=6", "dpo.save_steps=2",
                    "dpo.save_total_limit=null", "dpo.per_device_train_batch_size=4", "eval_fraction=0.0",
                    "dpo.eval_strategy=no")
    train(cfg, resume=True)
    a = load_file(str(first / FINAL_ADAPTER / "adapter_model.safetensors"))
    b = load_file(str(resumed / FINAL_ADAPTER / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert f"{saved}: its numbers do not match the checksum they were written with" in capsys.readouterr().out
    recomputed = json.loads(saved.read_text())["ref_chosen_logps"]
    assert recomputed == pytest.approx([value - 65.0 for value in record["ref_chosen_logps"]], abs=1e-4)


@pytest.mark.parametrize("recorded", [True, False])
def test_e_resuming_a_2_process_checkpoint_with_1_process_is_refused(saved_run, demo_world, demo_preferences,
                                                                      tmp_path, recorded):
    """The global batch is per-device batch x processes: resumed with another count the Trainer would count other
    steps and retrain pairs. The count is the checkpoint's processes.json, or (saved before it was recorded) its RNG
    states: rng_state_<rank>.pth, one per process."""
    first, _ = saved_run
    resumed = tmp_path / "dpo"
    resumed.mkdir()
    checkpoint = shutil.copytree(first / "checkpoint-4", resumed / "checkpoint-4")
    for rank in (0, 1):  # what 2 processes leave
        shutil.copy(checkpoint / "rng_state.pth", checkpoint / f"rng_state_{rank}.pth")
    (checkpoint / "rng_state.pth").unlink()
    if recorded:
        (checkpoint / "processes.json").write_text(json.dumps({"num_processes": 2}))
    else:
        (checkpoint / "processes.json").unlink(missing_ok=True)
    cfg, _ = config(demo_world, demo_preferences, resumed, "dpo.max_steps=6", "dpo.per_device_train_batch_size=4",
                    "eval_fraction=0.0", "dpo.eval_strategy=no")
    with pytest.raises(PipelineError, match=re.escape(f"{checkpoint}: trained by 2 process(es), resumed with 1; "
                                                      "resume it with 2 (accelerate launch --num_processes 2")):
        train(cfg, resume=True)
    assert not (resumed / "checkpoint-6").exists()


# ---------------------------------------------------------------- (f) bad input, before any model loads

def test_f_an_adapter_folder_that_does_not_exist_is_refused_before_anything_is_written(
        demo_world, demo_preferences, tmp_path, no_model_loading):
    cfg, _ = config(demo_world, demo_preferences, tmp_path / "out", f"adapter={tmp_path / 'sft'}")
    with pytest.raises(PipelineError, match="key adapter: adapter folder .* does not exist"):
        train(cfg)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("emotion_dpo.models.load_generator", refuse)


def test_a_reply_of_special_tokens_only_is_trained_by_its_ids():
    """Its text decodes (special tokens skipped, stripped) to "", but DPO trains on the stored ids: not refused."""
    import datasets

    from emotion_dpo.dpo_data import check_preferences

    row = {"prompt": "<s>[INST] [EMOTION] joy [/EMOTION] hi [/INST] [EMOTION] joy [/EMOTION] ", "chosen": "great !",
           "rejected": "", "prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [3, 3, 2]}
    assert check_preferences(datasets.Dataset.from_list([row]), "pairs", ("[INST]", "[EMOTION]")) == []
    with pytest.raises(PipelineError, match="row 0, column 'rejected': empty"):  # text only: nothing to train on
        check_preferences(datasets.Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")}]), "pairs")


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "chosen": "c"}], "missing column 'rejected'"),
    ([{"prompt": "p", "chosen": "c", "rejected": "  "}], "row 0, column 'rejected': empty"),
    ([{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": 3, "rejected": "r"}],
     "row 1, column 'chosen': expected a string, got int"),
])
def test_f_a_bad_dataset_is_a_clear_error(demo_world, tmp_path, rows, message, no_model_loading):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, _ = config(demo_world, data, tmp_path / "out")
    with pytest.raises(PipelineError, match=message):
        train(cfg)


def test_extra_columns_are_reported_and_kept_out_of_training(demo_world, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    row = {"prompt": "<s>[INST] [EMOTION] joy [/EMOTION] hi . [/INST] [EMOTION] joy [/EMOTION]", "chosen": "yay !",
           "rejected": "no .", "chosen_score": 3.0}
    data.write_text(json.dumps(row) + "\n")
    cfg, _ = config(demo_world, data, tmp_path / "out", "eval_fraction=0.0")
    train_set, eval_set = load_preferences(cfg, ("[INST]", "[/INST]", "[EMOTION]", "[/EMOTION]"))
    assert train_set.column_names == ["prompt", "chosen", "rejected"] and eval_set is None
    assert "columns kept out of training: chosen_score" in capsys.readouterr().out


MARKED = "<s>[INST] [EMOTION] neutral [/EMOTION] hi . [/INST] [EMOTION] joy [/EMOTION]"
# The same prompt decoded with skip_special_tokens=True, as the reference built Shotaro30678/rlhf-RG-trl-style-v3
# (data_process_dpo.py at 12285059f1013d43b0f2b619d637197b0c9dad3f: `tokenizer.decode(query, skip_special_tokens=True)`)
STRIPPED = "  neutral  hi .   joy "


def test_f_prompts_without_the_template_markers_are_refused_by_default(demo_world, tmp_path, no_model_loading):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": MARKED, "chosen": "yay !", "rejected": "no ."},
            {"prompt": STRIPPED, "chosen": "yay !", "rejected": "no ."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, _ = config(demo_world, data, tmp_path / "out")
    with pytest.raises(PipelineError) as refused:
        train(cfg)
    message = str(refused.value)
    assert "1 of 2 prompts lack the chat template's markers" in message and "row 1" in message
    assert "set allow_unmarked_prompts to true to train on them anyway" in message
    assert not (tmp_path / "out").exists()


def test_f_allow_unmarked_prompts_trains_on_them_with_a_warning(demo_world, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": STRIPPED, "chosen": "yay !", "rejected": "no ."}) + "\n")
    cfg, _ = config(demo_world, data, tmp_path / "out", "allow_unmarked_prompts=true", "eval_fraction=0.0")
    with pytest.warns(UserWarning, match="1 of 1 prompts lack .* training on them anyway"):
        train_set, _ = load_preferences(cfg, ("[INST]", "[/INST]", "[EMOTION]", "[/EMOTION]"))
    assert train_set["prompt"] == [STRIPPED]


def test_f_a_bad_dpo_setting_is_a_clear_error_as_the_config_loads(demo_world, tmp_path):
    # TRL's DPOConfig is built from the section as it loads: the problem is named by its key, before any data
    with pytest.raises(PipelineError, match="key dpo.eval_strategy: sometimes is not a valid IntervalStrategy"):
        config(demo_world, tmp_path / "no data needed", tmp_path / "out", "dpo.eval_strategy=sometimes")


@pytest.mark.parametrize("dpo, message", [
    ({"output_dir": "x"}, "dpo.output_dir: set the top-level output_dir instead"),
    ({"report_to": "wandb"}, "dpo.report_to: set wandb.mode instead"),
])
def test_f_settings_owned_by_the_top_level_config_are_refused_in_the_dpo_section(tmp_path, dpo, message):
    bad = tmp_path / "dpo.json"
    bad.write_text(json.dumps({"base_model": "b", "adapter": "a", "dataset": "d", "dpo": dpo}))
    with pytest.raises(PipelineError, match=re.escape(message)):
        load_config(TrainConfig, bad, [])


@dataclasses.dataclass
class UnslothStyleDPOConfig(trl.DPOConfig):
    """What unsloth swaps in for DPOConfig on a GPU: TRL's config with some defaults changed."""
    gradient_accumulation_steps: int = 2
    weight_decay: float = 0.001


def test_f_keys_the_config_leaves_unset_keep_trls_defaults_when_unsloth_changes_them(
        demo_world, demo_preferences, tmp_path, monkeypatch):
    assert trl_defaults_for_unset(trl.DPOConfig, {}) == {}
    assert trl_defaults_for_unset(UnslothStyleDPOConfig, {"gradient_accumulation_steps": 8}) == {"weight_decay": 0.0}
    monkeypatch.setattr(trl, "DPOConfig", UnslothStyleDPOConfig)
    cfg, _ = config(demo_world, demo_preferences, tmp_path / "out", "dpo.gradient_accumulation_steps=3")
    built = build_dpo_config(cfg)
    assert type(built) is UnslothStyleDPOConfig
    assert built.weight_decay == 0.0  # TRL's default, not the swapped-in 0.001
    assert built.gradient_accumulation_steps == 3  # what the config says wins over both
    cfg, _ = config(demo_world, demo_preferences, tmp_path / "out", "dpo.weight_decay=0.05")
    assert build_dpo_config(cfg).weight_decay == 0.05


def test_f_the_script_reports_a_bad_config_briefly(tmp_path):
    bad = tmp_path / "dpo.json"
    bad.write_text(json.dumps({"base_model": "b", "adapter": "a", "dataset": "d", "dpo": {"bta": 0.1}}))
    result = subprocess.run([sys.executable, str(ROOT / "fine_tune_dpo.py"), "--config", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"{bad}: key dpo.bta: unknown key (did you mean 'beta'?)" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- (g) it learned the preferences

def test_g_on_the_demo_world_training_learns_the_held_out_preferences(demo_world, demo_preferences, tmp_path):
    cfg, _ = config(demo_world, demo_preferences, tmp_path / "dpo", "dpo.num_train_epochs=2", "eval_fraction=0.15",
                    "dpo.eval_strategy=no")
    metrics = train(cfg)
    assert metrics["eval"]["eval_loss"] < LN2
    assert metrics["eval"]["eval_rewards/accuracies"] >= 0.6
    assert json.loads((tmp_path / "dpo" / "metrics.json").read_text())["eval"] == metrics["eval"]


# ---------------------------------------------------------------- train_modules_to_save: false

def saved_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


COPIES = ("base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight")  # as PEFT saves them


@pytest.fixture(scope="module")
def frozen_copies(demo_world, demo_preferences, tmp_path_factory):
    """4 optimizer steps with the SFT adapter's embedding and LM-head copies frozen and shared with the reference."""
    cfg, _ = config(demo_world, demo_preferences, tmp_path_factory.mktemp("frozen") / "dpo", "dpo.max_steps=4",
                    "dpo.per_device_train_batch_size=4", "eval_fraction=0.0", "train_modules_to_save=false")
    trainer = build_trainer(cfg)
    lora_before = adapter_params(trainer.model, "default")
    trainer.train()
    return trainer, lora_before


def test_frozen_copies_train_only_the_lora_matrices(frozen_copies):
    trainer, lora_before = frozen_copies
    trainable = {k: v for k, v in trainer.model.named_parameters() if v.requires_grad}
    assert trainable and all(".lora_" in k and ".default." in k for k in trainable)
    optimized = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    assert optimized == sum(p.numel() for p in trainable.values())  # no optimizer state for the copies
    assert all(not torch.equal(v, lora_before[k]) for k, v in trainable.items())  # every LoRA matrix moved


def test_frozen_copies_stay_the_sft_weights_and_the_reference_shares_them(frozen_copies, demo_world):
    trainer, _ = frozen_copies
    sft = saved_tensors(demo_world / "sft_adapter")
    embed, head = trainer.model.get_input_embeddings(), trainer.model.get_output_embeddings()
    for wrapper, key in zip((embed, head), COPIES):
        default, ref = wrapper.modules_to_save["default"].weight, wrapper.modules_to_save[REFERENCE_ADAPTER].weight
        assert torch.equal(default, sft[key]), key
        assert default.untyped_storage().data_ptr() == ref.untyped_storage().data_ptr(), key  # one tensor, not two
        assert not isinstance(default, torch.nn.Parameter)  # PEFT's set_adapter cannot make it trainable again
    trainer.model.set_adapter(REFERENCE_ADAPTER)  # what TRL does around every reference pass
    trainer.model.set_adapter("default")
    assert all(".lora_" in k for k, v in trainer.model.named_parameters() if v.requires_grad)


def test_frozen_copies_are_saved_in_the_final_adapter_and_a_resumed_run_ends_where_one_run_does(
        demo_world, demo_preferences, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sets = ["dpo.max_steps=4", "dpo.save_steps=2", "dpo.save_total_limit=null", "dpo.per_device_train_batch_size=4",
            "eval_fraction=0.0", "dpo.eval_strategy=no", "train_modules_to_save=false"]
    whole, _ = config(demo_world, demo_preferences, tmp_path / "whole", *sets)
    train(whole)
    final = saved_tensors(tmp_path / "whole" / FINAL_ADAPTER)
    sft = saved_tensors(demo_world / "sft_adapter")
    assert final.keys() == sft.keys()  # the SFT adapter's format: LoRA and both copies
    for key in COPIES:
        assert torch.equal(final[key], sft[key]), key
    assert any(not torch.equal(final[k], sft[k]) for k in final if "lora_" in k)

    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed, _ = config(demo_world, demo_preferences, tmp_path / "resumed", *sets)
    train(resumed, resume=True)
    again = saved_tensors(tmp_path / "resumed" / FINAL_ADAPTER)
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=1e-5, atol=1e-6)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "whole" / FINAL_ADAPTER)
    base = AutoModelForCausalLM.from_pretrained(demo_world / "base")
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, tmp_path / "whole" / FINAL_ADAPTER)
    assert torch.equal(model.get_input_embeddings().modules_to_save["default"].weight, sft[COPIES[0]])


# ---------------------------------------------------------------- the 4-bit paths, each in its own process

@pytest.mark.parametrize("use_unsloth,train_copies", [(False, True), (True, True), (False, False), (True, False)])
def test_the_4bit_paths_train_and_keep_the_reference_frozen(demo_world, demo_preferences, tmp_path, use_unsloth,
                                                            train_copies):
    """bitsandbytes NF4, and unsloth's FastLanguageModel (it runs on the CPU too; its own process, since importing
    unsloth patches TRL's configs process-wide): a few DPO steps through the script, the final adapter saved;
    with the SFT adapter's modules_to_save trained, and frozen (then they are saved exactly as SFT left them)."""
    _, sets = config(demo_world, demo_preferences, tmp_path / "dpo", "load_in_4bit=true",
                     f"use_unsloth={'true' if use_unsloth else 'false'}", "dpo.max_steps=3", "eval_fraction=0.0",
                     "dpo.per_device_train_batch_size=4", f"train_modules_to_save={str(train_copies).lower()}",
                     "dpo.save_steps=3")
    args = [sys.executable, str(ROOT / "fine_tune_dpo.py"), "--config", str(DEMO_CONFIG)]
    for s in sets:
        args += ["--set", s]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("Unsloth" in result.stdout + result.stderr) == use_unsloth
    assert "adapters: default, ref (frozen: ref" in result.stdout
    assert ("modules_to_save frozen" in result.stdout) == (not train_copies)
    log = json.loads((tmp_path / "dpo" / "metrics.json").read_text())["train"]
    assert log[0]["loss"] == pytest.approx(LN2, abs=1e-3)
    final = saved_tensors(tmp_path / "dpo" / FINAL_ADAPTER)
    sft = saved_tensors(demo_world / "sft_adapter")
    assert all(torch.equal(final[k], sft[k]) for k in COPIES) == (not train_copies)
    # The reference after the last step, as the checkpoint saved it: every tensor still the SFT adapter's.
    ref = saved_tensors(tmp_path / "dpo" / "checkpoint-3" / REFERENCE_ADAPTER)
    assert set(sft) <= set(ref) and any("lora_B" in k for k in sft)
    moved = [k for k in sft if not torch.equal(ref[k].float(), sft[k].float())]
    assert not moved, moved[:3]


FOUR_BIT_B_AND_D = """
import json, sys
from types import SimpleNamespace
use_unsloth, config_path, sets = sys.argv[1] == "true", sys.argv[2], json.loads(sys.argv[3])
if use_unsloth:
    import unsloth  # before trl, which it patches
import torch
from emotion_dpo.config import TrainConfig, load_config
from pathlib import Path
from emotion_dpo.dpo_data import load_preferences
from emotion_dpo.dpo_guard import guard_reference
from emotion_dpo.dpo_train import build_dpo_config, make_trainer, save_final_adapter
from emotion_dpo.models import load_generator

cfg = load_config(TrainConfig, config_path, sets)
train_set, eval_set = load_preferences(cfg)
model, tokenizer = load_generator(cfg, trainable=True)
trainer = make_trainer(cfg, model, tokenizer, build_dpo_config(cfg, eval_set is not None), train_set, eval_set)

def four_bit_layers(model):
    # bitsandbytes' Linear4bit holding Params4bit packed into uint8 (unsloth loads its 4-bit models through it)
    import bitsandbytes as bnb
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
            and type(m.weight).__name__ == "Params4bit" and m.weight.dtype == torch.uint8]

assert len(four_bit_layers(trainer.model)) == 7 * trainer.model.config.num_hidden_layers, "DPO base not 4-bit"

# (a) one base model carrying both adapters; only the trainable one has gradients
import gc
gc.collect()
assert len([o for o in gc.get_objects() if type(o).__name__ == "LlamaForCausalLM"]) == 1, "(a) a second base"
assert trainer.ref_model is None and set(trainer.model.peft_config) == {"default", "ref"}, "(a) adapters"
trainable = {k for k, v in trainer.model.named_parameters() if v.requires_grad}
assert trainable and all(".default." in k for k in trainable), "(a) something besides default trains"

def adapter(name):
    # every tensor of one adapter: LoRA matrices and modules_to_save copies (parameters, or buffers when frozen)
    tensors = dict(trainer.model.named_parameters())
    tensors.update(dict(trainer.model.named_buffers()))
    return {k: v.detach().float().clone() for k, v in tensors.items() if f".{name}." in k}

def lora(name):
    return {k: v for k, v in adapter(name).items() if "lora_" in k}

ref_before, policy_before = adapter("ref"), adapter("default")
assert any("modules_to_save" in k for k in ref_before), "(b) the embedding/LM-head copies are not covered"
Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # DPOTrainer may have made it
check = guard_reference(trainer, Path(cfg.output_dir), None, True)
assert check["compared_at"].startswith("bfloat16"), check  # TRL cast the trainable copy to bf16
trainer.train()
assert check["first_batch"]["max_abs_logratio"] <= check["first_batch"]["tolerance"], check
print("reference check:", json.dumps(check))
ref_after, policy_after = adapter("ref"), lora("default")
assert ref_before.keys() == ref_after.keys() and all(torch.equal(ref_before[k], ref_after[k]) for k in ref_before), "(b) ref moved"
assert any(not torch.equal(policy_before[k], policy_after[k]) for k in policy_after), "(b) the policy did not move"
final = save_final_adapter(trainer, tokenizer, cfg)
source = SimpleNamespace(base_model=cfg.base_model, adapter=str(final), chat_template=cfg.chat_template,
                         load_in_4bit=True, use_unsloth=use_unsloth)
reloaded, tokenizer = load_generator(source)
assert list(reloaded.peft_config) == ["default"]
assert len(four_bit_layers(reloaded)) == 7 * reloaded.config.num_hidden_layers, "the generator is not 4-bit"
loaded = {k: v.detach().float() for k, v in reloaded.named_parameters() if "lora_" in k}
assert len(loaded) == len(policy_after) and all(
    torch.equal(loaded[k], policy_after[k]) for k in policy_after), "(d) the reloaded adapter is not the trained one"
batch = tokenizer(["<s>[INST] [EMOTION] neutral [/EMOTION] hello . [/INST] [EMOTION] happiness [/EMOTION]"],
                  return_tensors="pt", add_special_tokens=False)
out = reloaded.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
assert out.shape[1] > batch["input_ids"].shape[1]
print("ok")
"""


@pytest.mark.parametrize("use_unsloth", [False, True])
def test_a_b_and_d_on_the_4bit_paths_one_base_the_reference_stays_and_the_saved_adapter_reloads_and_generates(
        demo_world, demo_preferences, tmp_path, use_unsloth):
    """(a), (b) and (d) through bitsandbytes NF4 and through unsloth, each in its own process: one base, only
    `default` trains, `ref` (LoRA and modules_to_save copies) bitwise unchanged, 4-bit layers in DPO and in the
    generator that reloads the saved adapter."""
    _, sets = config(demo_world, demo_preferences, tmp_path / "dpo", "load_in_4bit=true",
                     f"use_unsloth={'true' if use_unsloth else 'false'}", "dpo.max_steps=2", "eval_fraction=0.0",
                     "dpo.per_device_train_batch_size=4", "dpo.learning_rate=1e-3")
    result = subprocess.run([sys.executable, "-c", FOUR_BIT_B_AND_D, str(use_unsloth).lower(), str(DEMO_CONFIG),
                             json.dumps(sets)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
