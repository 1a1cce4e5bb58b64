"""The reference log-probs computed once and kept in the run folder (with dpo.precompute_ref_log_probs).

TRL computes them before training and caches them under the datasets cache, keyed by the dataset's fingerprint and
a hash of the model; here they are also written to `output_dir/reference_logps/<split>.json`, so that a resumed run
(`--resume`) reads them instead of running the reference over every pair again. The file is read back only when
its key, the sha256 of every input that changes the numbers (reference_inputs), is this run's, its numbers match
the checksum they were written with, and every one is finite; otherwise a printed notice says which, and they are
computed again. The guard (dpo_guard) then compares the first batch's numbers with the reference pass itself."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from .dataset import ID_COLUMNS
from .dpo_guard import REFERENCE_ADAPTER, adapter_digests, tensor_digest
from .errors import PipelineError
from .files import write_text_atomic

REFERENCE_LOGPS = "reference_logps"
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def sha256_of(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def base_weights_digest(model) -> str:
    """sha256 of the tensors the reference pass reads besides its adapter's: the base's weights as loaded (4-bit
    packed with their quantization state, or not). Left out: the adapters' own tensors (the reference's are keyed by
    their digests) and the layers modules_to_save replaces by the adapter's copy (TRL gives `ref` a copy of each),
    whose rows added by resize_token_embeddings are random and never read."""
    adapters = tuple(f".{name}." for name in getattr(model, "peft_config", {}))
    return sha256_of({name: tensor_digest(tensor) for name, tensor in model.state_dict().items()
                      if ".original_module." not in name and not any(a in name for a in adapters)})


def reference_inputs(trainer, dataset, path_tag: str, batch_size: int) -> dict:
    """Everything the reference log-probs of `dataset` depend on, by name (the large ones as sha256 digests)."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in getattr(model, "peft_config", {}) else "default"
    collator = trainer.data_collator
    if "base_weights_digest" not in vars(trainer):  # hashed once: the eval split's pass reads the same base
        trainer.base_weights_digest = base_weights_digest(model)
    return {
        "token_ids": sha256_of({column: list(dataset[column]) for column in ID_COLUMNS}),
        # TRL's collator: truncation, and the padding the rows of a batch share
        "max_length": args.max_length, "truncation_mode": args.truncation_mode,
        "pad_token_id": getattr(collator, "pad_token_id", None),
        "pad_to_multiple_of": getattr(collator, "pad_to_multiple_of", None),
        # the rows padded together (their last bits)
        "batch_size": batch_size, "num_processes": trainer.accelerator.num_processes,
        "bf16": args.bf16, "fp16": args.fp16, "device": trainer.accelerator.device.type,
        "path": path_tag, "pack_pairs_tokens": getattr(trainer, "pack_pairs_tokens", 0),
        "use_liger_kernel": args.use_liger_kernel,  # its chunked log-softmax instead of the logits
        # TRL weights the reference's log-probs past the shared length by ld_alpha (_compute_ref_log_probs); the
        # loss types are what reads them: numbers made for another objective are not reused
        "ld_alpha": args.ld_alpha, "loss_type": list(args.loss_type),
        # how the base was loaded (path, 4-bit NF4, unsloth) and the template, then what the model holds: the base's
        # weights and the reference adapter's
        **getattr(trainer, "base_loaded_as", {}),
        "base_weights": trainer.base_weights_digest,
        "reference_adapter": sha256_of(adapter_digests(model, adapter)),
    }


def numbers_checksum(record: dict) -> str:
    """sha256 of the two columns as JSON (sort_keys): what the file's `sha256` holds."""
    return sha256_of({column: record[column] for column in COLUMNS})


def first_non_finite(record: dict) -> str | None:
    for column in COLUMNS:
        for pair, value in enumerate(record[column]):
            if not math.isfinite(value):
                return f"pair {pair}, {column}: {value}"
    return None


def cache_problem(saved, key: str, inputs: dict, pairs: int) -> str | None:
    """Why a saved record cannot be reused for these inputs, or None."""
    if not isinstance(saved, dict):
        return "not a JSON object"
    if saved.get("key") != key:
        old = saved.get("inputs") if isinstance(saved.get("inputs"), dict) else {}
        changed = sorted(name for name in inputs.keys() | old.keys() if old.get(name) != inputs.get(name))
        return f"computed for other inputs ({', '.join(changed) if old else 'its inputs not recorded'})"
    if not all(isinstance(saved.get(c), list) and len(saved[c]) == pairs for c in COLUMNS):
        return f"not {pairs} pairs of numbers"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for c in COLUMNS for v in saved[c]):
        return "holds values that are not numbers"
    if saved.get("sha256") != numbers_checksum(saved):
        return "its numbers do not match the checksum they were written with (edited or damaged)"
    if where := first_non_finite(saved):
        return f"holds a number that is not finite ({where})"
    return None


def cached_reference_log_probs(trainer, dataset, name: str, compute, path_tag: str, batch_size: int):
    """`dataset` with TRL's ref_chosen_logps / ref_rejected_logps columns: read from the run folder when it holds
    them for exactly these inputs, checksummed and finite, else computed (`compute()`, TRL's own precompute) and
    written there. Which it was is kept in `trainer.reference_logps_files[name]` for the guard to name."""
    path = Path(trainer.args.output_dir) / REFERENCE_LOGPS / f"{name}.json"
    inputs = reference_inputs(trainer, dataset, path_tag, batch_size)
    key = sha256_of(inputs)
    files = trainer.__dict__.setdefault("reference_logps_files", {})
    say = print if trainer.accelerator.is_main_process else (lambda _: None)
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            saved, problem = None, f"does not load ({e})"
        else:
            problem = cache_problem(saved, key, inputs, len(dataset))
        if problem is None:
            say(f"{path}: the reference log-probs of {len(dataset)} pairs, computed before; not computed again")
            files[name] = (path, "read from the run folder")
            for column in COLUMNS:
                dataset = dataset.add_column(column, saved[column])
            return dataset
        say(f"{path}: {problem}; computing the reference log-probs again")
    result = compute()
    record = {c: [float(v) for v in result[c]] for c in COLUMNS}
    if where := first_non_finite(record):
        raise PipelineError(f"the reference pass gave a log-prob that is not finite ({name} split, {where}); DPO "
                            "would train against it; refusing to train")
    if trainer.accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "inputs": inputs, "pairs": len(result), "sha256": numbers_checksum(record)} | record
        write_text_atomic(path, json.dumps(record) + "\n")
    files[name] = (path, "computed by this run")
    return result
