"""The guard on DPO's frozen reference, before the first optimizer step: `ref` exists, is frozen, equals the adapter
the run starts from bitwise (or its recorded digests on resume), and gives the policy's log-probs on the first batch.

A LoRA reference that silently falls back to the bare base model is a known failure of other tools."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .errors import PipelineError
from .files import write_text_atomic

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy
START_ADAPTER = "start_adapter.json"  # a sha256 per tensor of the adapter the run started from: `ref` on resume


# Largest |policy - reference| sequence log-prob allowed on the first batch: in float32 the two passes are the same
# computation on the same weights; under bf16/fp16 autocast, or with a 4-bit base (TRL rounds the trainable copy
# to bf16), they differ by rounding.
REFERENCE_TOLERANCE = {"exact": 1e-3, "rounded": 5e-2}


def adapter_tensors(model, adapter: str) -> dict:
    """An adapter's tensors (LoRA matrices and modules_to_save copies, parameters or frozen buffers), keyed by
    their names without the adapter's."""
    import itertools

    marker = f".{adapter}."
    named = itertools.chain(model.named_parameters(remove_duplicate=False),
                            model.named_buffers(remove_duplicate=False))
    return {name.replace(marker, "."): tensor.detach() for name, tensor in named if marker in name}


def tensor_digest(tensor) -> str:
    """dtype, shape and the sha256 of the bytes: equal digests, bitwise equal tensors."""
    import hashlib

    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return f"{flat.dtype} {list(tensor.shape)} " + hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def adapter_digests(model, adapter: str) -> dict:
    return {name: tensor_digest(tensor) for name, tensor in sorted(adapter_tensors(model, adapter).items())}


def read_start_digests(checkpoint: Path, folder: Path) -> dict | None:
    """The start adapter's digests a resumed run checks `ref` against: the checkpoint's copy, else the run's."""
    for path in (checkpoint / START_ADAPTER, folder / START_ADAPTER):
        if path.is_file():
            return json.loads(path.read_text())
    warnings.warn(f"{checkpoint}: no {START_ADAPTER} (a run started before it was recorded): the reference adapter "
                  "cannot be checked against the adapter the run started from", stacklevel=2)
    return None


def is_quantized(model) -> bool:
    """TRL's own test (DPOTrainer.__init__): on such a model it casts the trainable weights to bf16."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def reference_file_differences(model, source: str) -> list[str]:
    """The tensors of adapter `source` (as PEFT saved them) that `ref` does not hold bitwise."""
    import torch
    from peft import get_peft_model_state_dict
    from peft.utils import load_peft_weights

    saved = load_peft_weights(source, device="cpu")
    held = get_peft_model_state_dict(model, adapter_name=REFERENCE_ADAPTER, save_embedding_layers=False)
    return sorted(name for name, value in saved.items()
                  if name in held and not torch.equal(held[name].detach().cpu().to(value.dtype), value)) or \
        sorted(set(saved) - set(held) - {k for k in saved if k.endswith((".original_module.weight",
                                                                          ".modules_to_save.weight"))})


def check_reference_weights(model, resumed: bool = False, start_digests: dict | None = None,
                            reference_adapter: str | None = None) -> dict:
    """Before training: `ref` exists, is frozen, and equals the adapter the run starts from, bitwise,
    modules_to_save included. On a fresh start that is the trainable `default`, compared at the dtype TRL gave
    it (bf16 on a quantized base, which TRL casts to bf16; the reference keeps the loaded values); on resume,
    `default` is the trained adapter, so `ref` is compared with the digests recorded when the run started."""
    import torch

    if REFERENCE_ADAPTER not in model.peft_config:
        raise PipelineError(f"the model has no reference adapter {REFERENCE_ADAPTER!r} (adapters: "
                            f"{', '.join(model.peft_config)}): DPO would have no reference; refusing to train")
    ref = adapter_tensors(model, REFERENCE_ADAPTER)
    trainable = sorted(name for name, p in model.named_parameters()
                       if f".{REFERENCE_ADAPTER}." in name and p.requires_grad)
    if trainable:
        raise PipelineError(f"the reference adapter is not frozen ({trainable[0]} requires grad); refusing to train")
    if resumed and start_digests is None:
        return {"adapter": REFERENCE_ADAPTER, "frozen": True, "tensors": len(ref),
                "equal_to": f"not checked: the run recorded no {START_ADAPTER}"}
    if not resumed and reference_adapter is not None:
        against = f"the reference_adapter {reference_adapter}"
        compared_at = "their saved dtype"
        differing = reference_file_differences(model, reference_adapter)
    elif not resumed:
        default = adapter_tensors(model, "default")
        dtype = torch.bfloat16 if is_quantized(model) else None
        against = "the trainable adapter 'default'"
        compared_at = "bfloat16 (TRL casts a quantized model's trainable weights to it)" if dtype else "their own dtype"
        differing = sorted(set(ref) ^ set(default)) or [
            name for name, value in default.items()
            if not torch.equal(ref[name].to(dtype or value.dtype), value.to(dtype or value.dtype))]
    else:
        digests = {name: tensor_digest(tensor) for name, tensor in ref.items()}
        against = f"the adapter the run started from ({START_ADAPTER})"
        compared_at = "their own dtype (sha256 of each tensor's bytes)"
        differing = sorted(name for name in set(digests) | set(start_digests)
                           if digests.get(name) != start_digests.get(name))
    if differing:
        raise PipelineError(f"the reference adapter {REFERENCE_ADAPTER!r} differs from {against} in {len(differing)} "
                            f"of {len(ref)} tensors (first: {differing[0]}); DPO would train against a wrong "
                            "reference; refusing to train")
    return {"adapter": REFERENCE_ADAPTER, "frozen": True, "tensors": len(ref), "equal_to": against,
            "compared_at": compared_at}


def sequence_log_probs(trainer, model, inputs, adapter: str):
    """Summed completion log-probs of a collated DPO batch through `adapter`, the way DPOTrainer computes the
    policy's: the same model call, TRL's selective_log_softmax over the completion mask."""
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import selective_log_softmax, use_adapter

    import contextlib

    # the trainer's own forward path (dpo_prefix's shared rows when prefix_sharing is on), as for the reference
    layout = getattr(trainer, "forward_layout", None) or contextlib.nullcontext
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    with layout(inputs) as batch, use_adapter(unwrapped, adapter), disable_gradient_checkpointing(
            trainer.model, trainer.args.gradient_checkpointing_kwargs):
        kwargs = {k: v for k, v in batch.items()
                  if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        logits = model(**kwargs, use_cache=False).logits[..., :-1, :]
        completion = batch["completion_mask"][..., 1:]
        return selective_log_softmax(logits, batch["input_ids"][..., 1:], row_mask=completion).sum(1)


def check_precomputed_reference(trainer, model, inputs, rounded: bool) -> dict:
    """The precomputed reference log-probs of a training batch (TRL's ref_*_logps columns, from
    reference_logps/train.json or computed before training) equal the reference pass run on that batch now. Numbers
    that are stale, or edited past their checksum, are named as such, not trained against, nor taken for a broken
    reference pass by check_first_batch. Dropout off."""
    import torch

    path, how = getattr(trainer, "reference_logps_files", {}).get("train", ("the precomputed reference log-probs",
                                                                            "computed by TRL"))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            live = torch.cat(trainer.compute_ref_log_probs(model, inputs)).float()
    finally:
        model.train(training)
    stored = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float().to(live.device)
    tolerance = REFERENCE_TOLERANCE["rounded" if rounded else "exact"]
    worst = float((stored - live).abs().max())
    if not worst <= tolerance:
        raise PipelineError(f"{path} ({how}): on the first batch its reference log-probs differ from the reference "
                            f"pass by up to {worst:.4g} nats (allowed: {tolerance}): stale or edited; delete it to "
                            "compute them again; refusing to train")
    return {"file": str(path), "source": how, "max_abs_difference": worst, "tolerance": tolerance}


def check_first_batch(trainer, model, inputs, rounded: bool, anchored: bool = False) -> dict:
    """On the first training batch, before any optimizer step: the policy's log-probs equal the reference's as
    DPOTrainer computes them (its compute_ref_log_probs, or the precomputed columns, themselves first checked against
    that pass), so every reward margin is 0. Anchored to another reference_adapter, the policy differs from it: then
    the reference log-probs must equal those computed here through `ref`. Dropout off for both passes."""
    import torch

    precomputed = check_precomputed_reference(trainer, model, inputs, rounded) if trainer.precompute_ref_logps else None
    if trainer.ld_alpha is not None:  # the reference log-probs are weighted then; the weights check still ran
        return {"skipped": "ld_alpha weights the log-probs"} | ({"precomputed": precomputed} if precomputed else {})
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if trainer.precompute_ref_logps:
                reference = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
            else:
                reference = torch.cat(trainer.compute_ref_log_probs(model, inputs))
            policy = sequence_log_probs(trainer, model, inputs, REFERENCE_ADAPTER if anchored else "default")
    finally:
        model.train(training)
    logratios = (policy.float() - reference.float().to(policy.device))
    chosen, rejected = logratios.chunk(2)
    margins = trainer.beta * (chosen - rejected)
    tolerance = REFERENCE_TOLERANCE["rounded" if rounded else "exact"]
    worst = float(logratios.abs().max())
    record = {"pairs": len(chosen), "max_abs_logratio": worst, "max_abs_margin": float(margins.abs().max()),
              "tolerance": tolerance, "compared_with": REFERENCE_ADAPTER if anchored else "default"}
    if precomputed:
        record["precomputed"] = precomputed
    if not worst <= tolerance:
        raise PipelineError(f"on the first batch the policy and the reference disagree by up to {worst:.4g} nats of "
                            f"log-prob (allowed: {tolerance}); before training they are one adapter, so the "
                            "reference pass is not computing through the SFT adapter's copy; refusing to train")
    return record


def guard_reference(trainer, folder: Path, checkpoint: Path | None, main_process: bool,
                    reference_adapter: str | None = None) -> dict:
    """The guard on the reference, before the first optimizer step; returns the record train() writes to
    metrics.json as `reference_check` (its first batch filled in when training computes its first loss).

    A fresh run: `ref` equals `default` (check_reference_weights), their digests are recorded in output_dir (and
    copied into every checkpoint), and the first batch's margins are 0 (check_first_batch). A resumed run: `ref`
    equals the recorded start adapter; the policy is trained, so its margins are not 0 and are not checked, but
    precomputed reference log-probs are still checked against the reference pass on its first batch."""
    start_digests = read_start_digests(checkpoint, folder) if checkpoint else None
    record = check_reference_weights(trainer.model, checkpoint is not None, start_digests, reference_adapter)
    # a fresh start replaces what an earlier start that stopped before its first checkpoint left
    if main_process and (not checkpoint or not (folder / START_ADAPTER).exists()):
        digests = start_digests or adapter_digests(trainer.model, REFERENCE_ADAPTER)
        write_text_atomic(folder / START_ADAPTER, json.dumps(digests, indent=1) + "\n")
    args = trainer.args
    rounded = bool(args.bf16 or args.fp16 or is_quantized(trainer.model))
    if checkpoint:
        record["first_batch"] = {"skipped": "resumed: the policy is the trained adapter"}
        if not trainer.precompute_ref_logps:
            return record
    compute_loss = trainer.compute_loss

    def checked_compute_loss(model, inputs, *rest, **kwargs):
        if model.training and checkpoint and "precomputed" not in record:  # resumed: the reference numbers alone
            record["precomputed"] = check_precomputed_reference(trainer, model, inputs, rounded)
            del trainer.compute_loss
        elif model.training and "first_batch" not in record:
            record["first_batch"] = check_first_batch(trainer, model, inputs, rounded, reference_adapter is not None)
            del trainer.compute_loss  # the class's own again
        return compute_loss(model, inputs, *rest, **kwargs)

    trainer.compute_loss = checked_compute_loss
    return record


