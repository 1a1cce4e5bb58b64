"""The reference log-probs computed once and kept in the run folder (with dpo.precompute_ref_log_probs).

TRL computes them before training and caches them under the datasets cache, keyed by the dataset's fingerprint and
a hash of the model; here they are also written to `output_dir/reference_logps/<split>.json`, keyed by what they
depend on (the token ids, TRL's max_length rule, the reference adapter's tensors, the precision and the forward
path), so a resumed run (`--resume`) reads them instead of running the reference over every pair again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .dataset import ID_COLUMNS
from .dpo_guard import REFERENCE_ADAPTER, adapter_digests
from .files import write_text_atomic

REFERENCE_LOGPS = "reference_logps"
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def reference_key(trainer, dataset, path_tag: str) -> str:
    """sha256 of everything the reference log-probs of `dataset` depend on."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in getattr(model, "peft_config", {}) else "default"
    digest = hashlib.sha256()
    for column in ID_COLUMNS:
        digest.update(json.dumps(list(dataset[column])).encode())
    digest.update(json.dumps({"max_length": args.max_length, "truncation_mode": args.truncation_mode,
                              "bf16": args.bf16, "fp16": args.fp16, "path": path_tag,
                              "adapter": adapter_digests(model, adapter)}, sort_keys=True).encode())
    return digest.hexdigest()


def cached_reference_log_probs(trainer, dataset, name: str, compute, path_tag: str):
    """`dataset` with TRL's ref_chosen_logps / ref_rejected_logps columns: read from the run folder when it holds
    them for exactly these inputs, else computed (`compute()`, TRL's own precompute) and written there."""
    path = Path(trainer.args.output_dir) / REFERENCE_LOGPS / f"{name}.json"
    key = reference_key(trainer, dataset, path_tag)
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            saved = {}
        if saved.get("key") == key and all(len(saved.get(c, ())) == len(dataset) for c in COLUMNS):
            print(f"{path}: the reference log-probs of {len(dataset)} pairs, computed before; not computed again")
            for column in COLUMNS:
                dataset = dataset.add_column(column, saved[column])
            return dataset
        print(f"{path}: computed for other inputs (data, reference adapter, precision or path); computing again")
    result = compute()
    if trainer.accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "pairs": len(result)} | {c: [float(v) for v in result[c]] for c in COLUMNS}
        write_text_atomic(path, json.dumps(record) + "\n")
    return result
