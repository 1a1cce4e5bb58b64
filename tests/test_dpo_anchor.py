"""reference_adapter: DPO trains on from one adapter against another adapter as its frozen reference (run_pipeline's
dpo_reference "sft": the SFT adapter anchors every iteration)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emotion_dpo.config import TrainConfig, load_config
from emotion_dpo.dpo_guard import REFERENCE_ADAPTER
from emotion_dpo.dpo_train import train
from emotion_dpo.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"


def moved_adapter(sft: Path, folder: Path) -> Path:
    """A copy of the SFT adapter with every LoRA B matrix moved by 0.01: a stand-in for iteration 1's adapter."""
    shutil.copytree(sft, folder)
    tensors = load_file(str(folder / WEIGHTS))
    save_file({k: v + 0.01 if "lora_B" in k else v for k, v in tensors.items()}, str(folder / WEIGHTS),
              metadata={"format": "pt"})
    return folder


def anchored_config(demo_world, demo_preferences, tmp_path, *extra):
    w = demo_world
    start = moved_adapter(w / "sft_adapter", tmp_path / "iter1_adapter")
    sets = [f"base_model={w / 'base'}", f"adapter={start}", f"reference_adapter={w / 'sft_adapter'}",
            f"dataset={demo_preferences}", f"chat_template={ROOT / 'args/chat_template.json'}",
            f"output_dir={tmp_path / 'dpo'}", "wandb.mode=disabled", 'dpo.loss_type=["sigmoid"]', "dpo.max_steps=2",
            "dpo.per_device_train_batch_size=4", "dpo.max_length=96", "eval_fraction=0.0", *extra]
    return load_config(TrainConfig, ROOT / "args/demo/dpo_arg.json", sets)


def test_the_reference_is_the_anchor_adapter_bitwise_and_the_first_batch_reads_it(demo_world, demo_preferences,
                                                                                tmp_path, monkeypatch):
    import emotion_dpo.dpo_train as dpo

    seen = {}
    built = dpo.make_trainer

    def keep(*args, **kwargs):
        trainer = built(*args, **kwargs)
        seen["trainer"] = trainer
        return trainer

    monkeypatch.setattr(dpo, "make_trainer", keep)
    metrics = train(anchored_config(demo_world, demo_preferences, tmp_path))
    check = metrics["reference_check"]
    assert check["equal_to"] == f"the reference_adapter {demo_world / 'sft_adapter'}"
    first = check["first_batch"]
    assert first["compared_with"] == REFERENCE_ADAPTER and first["max_abs_logratio"] <= first["tolerance"]
    # after training, `ref` still holds the SFT file's LoRA matrices exactly; the start adapter's differ from them
    sft = load_file(str(demo_world / "sft_adapter" / WEIGHTS))
    params = dict(seen["trainer"].model.named_parameters())
    for name, value in sft.items():
        if "lora_B" in name:
            held = params[name.replace(".weight", f".{REFERENCE_ADAPTER}.weight")]
            assert torch.equal(held.detach(), value)
    # the policy started 0.01 away from SFT: its log-probs differ from the reference's from the first step on
    logged = [e for e in metrics["train"] if "rewards/margins" in e or "rewards/chosen" in e]
    assert logged and any(abs(e.get("rewards/chosen", 0.0)) > 0 for e in logged)


def test_a_reference_that_is_not_the_anchor_is_refused(demo_world, demo_preferences, tmp_path, monkeypatch):
    import emotion_dpo.dpo_train as dpo

    built = dpo.make_trainer

    def perturbed(*args, **kwargs):
        trainer = built(*args, **kwargs)
        name = next(n for n, _ in trainer.model.named_parameters() if f"lora_A.{REFERENCE_ADAPTER}" in n)
        with torch.no_grad():
            trainer.model.get_parameter(name).view(-1)[0] += 1e-3
        return trainer

    monkeypatch.setattr(dpo, "make_trainer", perturbed)
    with pytest.raises(PipelineError, match=r"differs from the reference_adapter .*sft_adapter in 1 of"):
        train(anchored_config(demo_world, demo_preferences, tmp_path))
    assert not (tmp_path / "dpo" / "metrics.json").exists()


def test_the_pipeline_anchors_iteration_2_to_the_sft_adapter_only_when_asked(tmp_path):
    from emotion_dpo.config import PipelineConfig
    from emotion_dpo.pipeline import plan

    for choice, expected in (("sft", "demo_world/sft_adapter"), ("previous", None)):
        cfg = load_config(PipelineConfig, ROOT / "args/demo/pipeline_arg.json",
                          [f"output_dir={tmp_path / choice}", f"dpo_reference={json.dumps(choice)}"])
        dpo_stages = [s for s in plan(cfg) if s.kind.name == "dpo"]
        assert dpo_stages[0].resolved["reference_adapter"] is None  # iteration 1 starts from SFT itself
        assert dpo_stages[1].resolved["reference_adapter"] == expected
        assert dpo_stages[1].resolved["adapter"] == str(tmp_path / choice / "iter-1/dpo/final_adapter")
