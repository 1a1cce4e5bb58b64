"""fine_tune_dpo.py's stages: TRL's config, the run folder and resume, load ONE 4-bit base with the SFT adapter, let TRL add
the frozen reference copy of that adapter, train, and save the trained adapter alone.

TRL 1.x replaced the reference project's `model_adapter_name` / `ref_adapter_name` with the same idea built in:
given a PeftModel with a pretrained adapter and `ref_model=None`, DPOTrainer adds a copy of that adapter named
"ref" (modules_to_save copies included), keeps it frozen, and computes the reference log-probs through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import shutil
import warnings
from pathlib import Path

from .config import TrainConfig, differing_keys_except, save_config, to_dict, without_comments
from .dpo_data import check_pair_texts, fully_truncated, load_preferences, report_overlong, token_id_rows
from .dpo_guard import REFERENCE_ADAPTER, START_ADAPTER, guard_reference
from .distributed import on_cpus, process_state
from .dpo_reference import REFERENCE_LOGPS
from .errors import PipelineError
from .faultpoints import reached
from .files import RUN_MARKER, claim_run_folder, folder_entries, run_folder_exists, write_text_atomic

FINAL_ADAPTER = "final_adapter"
SCRIPT = "fine_tune_dpo.py"  # in the run marker: the folder is this script's run
METRICS_NAME = "metrics.json"
# What train() writes before training starts, and TRL's model card (README.md), which it writes next to each checkpoint
# it saves (so also before the first one is whole), and the reference log-probs (dpo_reference: reused by the next start)
STARTED_ONLY = {"config.json", "wandb", START_ADAPTER, "README.md", REFERENCE_LOGPS}
CONFIG_NAME = "training_config.json"  # the resolved config, in every checkpoint and in the final adapter
PROCESSES_NAME = "processes.json"  # {"num_processes": N}: the launch that trained a checkpoint; --resume takes the same


# ------------------------------------------------------------------ TRL's config

def trl_defaults_for_unset(config_class, settings: dict) -> dict:
    """TRL's own defaults for the keys `settings` leaves unset whose default `config_class` changes.

    On a GPU, unsloth swaps in a DPOConfig whose defaults differ (seen on an H200: gradient_accumulation_steps 2;
    in its source also weight_decay 0.001, padding_free auto, eval_accumulation_steps 2, ...), so the same JSON
    would train differently depending on whether unsloth is installed. Passing TRL's values keeps it the same."""
    trl_class = next((k for k in config_class.__mro__
                      if dataclasses.is_dataclass(k) and k.__module__.startswith("trl.")), config_class)
    if trl_class is config_class:
        return {}
    ours = inspect.signature(config_class.__init__).parameters
    theirs = inspect.signature(trl_class.__init__).parameters
    pinned = {}
    for field in dataclasses.fields(trl_class):
        name = field.name
        if not field.init or name in settings or name == "output_dir" or name not in ours or name not in theirs:
            continue
        if ours[name].default != theirs[name].default:
            has_default = field.default is not dataclasses.MISSING
            pinned[name] = field.default if has_default else field.default_factory()
    return pinned


def build_dpo_config(cfg, has_eval: bool = True):
    """trl.DPOConfig from the config's `dpo` section, with the precision chosen by device unless set."""
    import torch
    from trl import DPOConfig

    settings = without_comments(cfg.dpo)
    if "bf16" not in settings and "fp16" not in settings:
        cuda = torch.cuda.is_available()
        settings["bf16"] = cuda and torch.cuda.is_bf16_supported()
        settings["fp16"] = cuda and not settings["bf16"]
    if not has_eval:
        settings["eval_strategy"] = "no"
    settings["report_to"] = "none" if cfg.wandb.mode == "disabled" else "wandb"
    settings.setdefault("seed", cfg.seed)
    if not cfg.train_modules_to_save:  # the frozen copies are buffers, identical on every GPU: no broadcast
        settings.setdefault("ddp_broadcast_buffers", False)
    if on_cpus():  # several processes on CPUs: TrainingArguments starts accelerate's gloo group only when told
        settings["use_cpu"] = True
    settings.update(trl_defaults_for_unset(DPOConfig, settings))
    try:
        dpo_config = DPOConfig(output_dir=cfg.output_dir, **settings)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"{cfg.source}: key dpo: {e}") from None
    if on_cpus() and dpo_config.device.index is not None:
        # the Trainer loads a checkpoint's optimizer state with map_location=args.device under DDP, and torch.load
        # refuses "cpu:0" ("don't know how to restore data location"): a resumed CPU run would fail
        dpo_config.__dict__["_setup_devices"] = torch.device("cpu")
    return dpo_config


# ------------------------------------------------------------------ the run folder

def _loads(path: Path, load) -> str | None:
    """Why `load(path)` fails (missing, cut short, unreadable), or None."""
    if not path.is_file():
        return f"no {path.name}"
    try:
        load(path)
    except Exception as e:  # noqa: BLE001 - whatever the reader says: this file cannot be resumed from
        return f"{path.name} does not load ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None


def _read_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # the header, checked against the file's length: a cut file fails
        for key in f.keys():
            f.get_slice(key)


def _read_torch(path: Path) -> None:
    import torch

    torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)  # a cut zip has no central directory


def _read_rng_state(path: Path) -> None:
    import torch
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():  # the numpy RNG state, allowed as the Trainer allows it when it resumes
        torch.load(str(path), map_location="cpu", weights_only=True)


def _read_json(path: Path) -> None:
    json.loads(path.read_text(encoding="utf-8"))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None: every file the resume reads must load, not merely exist.

    The Trainer writes the adapter, optimizer, scheduler and RNG state, then trainer_state.json; this run's callback
    then adds training_config.json and start_adapter.json. A kill or a full disk anywhere in that leaves a folder
    with a file missing or cut short (next to a whole trainer_state.json, too)."""
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME

    reads = [("adapter_model.safetensors", _read_safetensors), (OPTIMIZER_NAME, _read_torch),
             (SCHEDULER_NAME, _read_torch), (TRAINER_STATE_NAME, _read_json)]
    reads += [(f"{path.parent.name}/{path.name}", _read_safetensors)  # TRL's ref/ copy, reloaded by the Trainer
              for path in checkpoint.glob(f"{REFERENCE_ADAPTER}/adapter_model.safetensors")]
    reads += [(path.name, _read_rng_state) for path in sorted(checkpoint.glob("rng_state*.pth"))]
    if (checkpoint.parent / START_ADAPTER).is_file():  # recorded by this run: its checkpoints carry it
        reads += [(CONFIG_NAME, _read_json), (START_ADAPTER, _read_json)]
    elif (checkpoint / CONFIG_NAME).exists():
        reads += [(CONFIG_NAME, _read_json)]
    if (checkpoint / PROCESSES_NAME).exists():  # absent from checkpoints saved before it was recorded
        reads += [(PROCESSES_NAME, _read_json)]
    for name, load in reads:
        if problem := _loads(checkpoint / name, load):
            return problem
    return None


def checkpoints(folder: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint-* or None, the newer or only incomplete ones with their problem)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not folder.is_dir():
        return None, []
    steps = {p: int(p.name.rpartition("-")[2]) for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and p.name.rpartition("-")[2].isdigit()}
    incomplete = []
    for checkpoint in sorted(steps, key=steps.get, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, incomplete
        incomplete.append((checkpoint, problem))
    return None, incomplete


def last_checkpoint(folder: Path, say=print) -> Path | None:
    """The newest complete checkpoint-*; newer ones a kill cut short while they were saved are named and skipped."""
    complete, incomplete = checkpoints(folder)
    for checkpoint, problem in incomplete:
        say(f"{checkpoint}: skipped, incomplete ({problem}: its save was cut short)")
    return complete


def restart_from_the_start_adapter(cfg, incomplete: list[tuple[Path, str]], tidy: bool) -> None:
    """Only incomplete checkpoints (the first save was cut short): nothing to resume, so they are removed, named,
    and training starts again from the adapter (the Trainer would otherwise save into their half-written folders)."""
    for checkpoint, problem in incomplete:
        if tidy:
            print(f"{checkpoint}: incomplete ({problem}: its save was cut short); removed")
            shutil.rmtree(checkpoint)
    if tidy:
        print(f"{cfg.output_dir}: no complete checkpoint to resume from; starting again from the start adapter "
              f"({cfg.adapter})")


def resolve_resume(cfg, resume_flag: bool, tidy: bool = True, processes: int = 1):
    """The checkpoint to resume from, or None; a finished or started run is never silently overwritten.

    `tidy` (the main process, holding the run folder's lock): say what is skipped and remove the checkpoints a
    restart replaces. `processes`: this launch's process count, which a checkpoint must have been trained by."""
    folder = Path(cfg.output_dir)
    run_folder_exists(folder)
    say = print if tidy else (lambda _: None)
    wanted = cfg.resume_from_checkpoint if cfg.resume_from_checkpoint is not None else resume_flag
    if isinstance(wanted, str):
        if not Path(wanted).is_dir():
            raise PipelineError(f"{cfg.source}: key resume_from_checkpoint: {wanted} is not a checkpoint folder")
        if problem := checkpoint_problem(Path(wanted)):
            raise PipelineError(f"{cfg.source}: key resume_from_checkpoint: {wanted} is incomplete ({problem}); "
                                "name an earlier checkpoint, or pass --resume for the newest complete one")
        check_config_changes(cfg, Path(wanted))
        check_process_count(Path(wanted), processes)
        return Path(wanted)
    checkpoint, incomplete = checkpoints(folder)
    if checkpoint is not None:
        for skipped, problem in incomplete:
            say(f"{skipped}: skipped, incomplete ({problem}: its save was cut short)")
    entries = folder_entries(folder) - STARTED_ONLY - {c.name for c, _ in incomplete}
    if wanted:
        if checkpoint is None:
            if entries:  # e.g. a final_adapter next to cut-short checkpoints: not ours to remove
                raise PipelineError(f"{folder}: --resume, but there is no complete checkpoint-* folder to resume "
                                    f"from, and it holds {', '.join(sorted(entries))}; choose another output_dir")
            check_start_config(cfg, folder)
            restart_from_the_start_adapter(cfg, incomplete, tidy)
            return None
        check_config_changes(cfg, checkpoint)
        check_process_count(checkpoint, processes)
        say(f"resuming from {checkpoint}")
        return checkpoint
    if entries or (checkpoint is not None):
        raise PipelineError(
            f"{folder}: output_dir already holds a run"
            + (f" (last complete checkpoint {checkpoint.name}); pass --resume to continue it" if checkpoint else "")
            + ", or choose another output_dir"
        )
    check_start_config(cfg, folder)
    if incomplete:
        restart_from_the_start_adapter(cfg, incomplete, tidy)
    elif folder_entries(folder):
        # only what a start writes before training: it stopped before its first checkpoint, nothing to lose
        say(f"{folder}: the run there stopped before its first checkpoint; starting it again")
    return None


def check_start_config(cfg, folder: Path) -> None:
    """A folder that a start left (config.json, reference_logps/, ... but no checkpoint) is started again; with a
    config that differs from its config.json that is never silent: the differing keys are named (its reference
    log-probs are then reused only if their key still matches)."""
    saved = folder / "config.json"
    if not saved.is_file():
        return
    try:
        saved_config = json.loads(saved.read_text(encoding="utf-8"))
    except ValueError:
        warnings.warn(f"{saved}: does not load; starting again with the config given", stacklevel=3)
        return
    changed = differing_keys_except(saved_config, to_dict(cfg), TrainConfig.unchanged_results)
    if changed:
        warnings.warn(f"{saved}: starting again with a config that differs from the one this folder was started "
                      "with:\n  " + "\n  ".join(changed), stacklevel=3)


def saved_process_count(checkpoint: Path) -> int | None:
    """How many processes trained `checkpoint`: its processes.json, else (saved before that was recorded) the
    Trainer's RNG states, rng_state.pth from one process or rng_state_<rank>.pth from each of several."""
    recorded = checkpoint / PROCESSES_NAME
    if recorded.is_file():
        count = json.loads(recorded.read_text(encoding="utf-8")).get("num_processes")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise PipelineError(f"{recorded}: key num_processes: expected a process count >= 1, got {count!r}")
        return count
    ranks = len(list(checkpoint.glob("rng_state_*.pth")))
    return ranks or (1 if (checkpoint / "rng_state.pth").is_file() else None)


def check_process_count(checkpoint: Path, processes: int) -> None:
    """The global batch is per_device_train_batch_size x processes x gradient_accumulation_steps: resumed with
    another count, the Trainer would count other steps and hand other pairs to each step. Refused."""
    saved = saved_process_count(checkpoint)
    if saved is not None and saved != processes:
        raise PipelineError(f"{checkpoint}: trained by {saved} process(es), resumed with {processes}; resume it with "
                            f"{saved} (accelerate launch --num_processes {saved}, or launcher.num_processes {saved}): "
                            "the global batch, and with it the steps and the pairs each step trains, depend on it")


def check_config_changes(cfg, checkpoint: Path) -> None:
    """Resuming with another seed, beta, dataset or schedule is allowed (to extend a run) but never silent;
    with train_modules_to_save changed it is refused."""
    saved = checkpoint / CONFIG_NAME
    if not saved.exists():
        return
    saved_config = json.loads(saved.read_text())
    trained_copies = saved_config.get("train_modules_to_save", True)  # checkpoints from before the key: trained
    if trained_copies != cfg.train_modules_to_save:
        # Frozen copies are one tensor shared with the reference: loading trained ones into it would move the reference.
        raise PipelineError(
            f"{checkpoint}: trained with train_modules_to_save {str(trained_copies).lower()}; "
            f"resume it with the same setting (the config says {str(cfg.train_modules_to_save).lower()})"
        )
    changed = differing_keys_except(saved_config, to_dict(cfg), TrainConfig.resumable_changes)
    if changed:
        warnings.warn(f"{checkpoint}: resuming with a config that differs from the checkpoint's:\n  "
                      + "\n  ".join(changed), stacklevel=2)


# ------------------------------------------------------------------ training

def training_steps(pairs: int, args, processes: int = 1) -> tuple[int, int]:
    """(optimizer steps, batches per epoch) as transformers' Trainer counts them (_get_training_setup): max_steps
    when >= 0, else ceil(num_train_epochs x updates per epoch), at least one update per epoch that has a batch."""
    per_step = args.per_device_train_batch_size * processes
    batches = pairs // per_step if args.dataloader_drop_last else math.ceil(pairs / per_step)
    if args.max_steps >= 0:
        return args.max_steps, batches
    updates = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return max(math.ceil(args.num_train_epochs * updates), 0), batches


def check_trains_something(source, pairs: int, args, processes: int = 1) -> None:
    """A run that would take no optimizer step would save the adapter it started from as `final_adapter`: an error
    before the model loads, naming the keys that decide it."""
    steps, batches = training_steps(pairs, args, processes)
    if batches == 0:
        raise PipelineError(
            f"{source}: keys dpo.per_device_train_batch_size, dpo.dataloader_drop_last: {pairs} training pairs make "
            f"no batch of {args.per_device_train_batch_size} x {processes} process(es) with the last one dropped; "
            "lower the batch size, set dataloader_drop_last to false, or add pairs")
    if steps <= 0:
        how = (f"dpo.max_steps is {args.max_steps}" if args.max_steps >= 0 else
               f"dpo.num_train_epochs is {args.num_train_epochs} (with dpo.max_steps {args.max_steps}: epochs decide)")
        raise PipelineError(
            f"{source}: keys dpo.num_train_epochs, dpo.max_steps: {how}, so training would take 0 steps on {pairs} "
            f"pairs ({batches} batches of dpo.per_device_train_batch_size {args.per_device_train_batch_size} per "
            "epoch) and save the start adapter as final_adapter; set num_train_epochs > 0 or max_steps > 0")


def config_saver(cfg):
    """A callback that puts the resolved config, the process count and the start adapter's digests into every
    checkpoint, next to the adapter it trained."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class SaveConfig(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
                save_config(cfg, checkpoint, CONFIG_NAME)
                write_text_atomic(checkpoint / PROCESSES_NAME, json.dumps({"num_processes": args.world_size}) + "\n")
                start = Path(args.output_dir) / START_ADAPTER
                if start.exists():  # a resumed run checks its reference against it, wherever the checkpoint goes
                    write_text_atomic(checkpoint / START_ADAPTER, start.read_text(encoding="utf-8"))
                reached(f"dpo-saved:{state.global_step}", checkpoint)

    return SaveConfig()


def keep_trainable_in_fp32(trainer) -> None:
    """TRL casts a quantized model's trainable weights to bf16 and counts on bf16 autocast; without mixed
    precision (the CPU, or unsloth turning bf16 off there) the fp32 activations would meet bf16 weights."""
    import torch

    if trainer.args.bf16 or trainer.args.fp16:
        return
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def freeze_modules_to_save(model) -> int:
    """Keep the SFT adapter's modules_to_save (its embedding and LM-head copies) as SFT left them, the frozen
    reference adapter (if any) using the very same tensors; returns how many tensors were frozen.

    They become buffers: saved and loaded with the adapter as before, but no longer parameters, because PEFT's
    set_adapter, which TRL calls around every reference pass, makes the active adapter's modules_to_save
    trainable again. So: no gradient, no optimizer state, no second copy for the reference."""
    from peft.utils import ModulesToSaveWrapper

    frozen = 0
    for wrapper in [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]:
        copies = wrapper.modules_to_save
        if "default" not in copies:
            continue
        # The reference's copy holds the SFT weights exactly; on a 4-bit base TRL rounded the trainable one to bf16.
        source = copies[REFERENCE_ADAPTER] if REFERENCE_ADAPTER in copies else copies["default"]
        for name, param in list(source.named_parameters(remove_duplicate=False)):  # a tied second name too
            owner_name, _, leaf = name.rpartition(".")
            tensor = param.detach()
            for module in copies.values():
                owner = module.get_submodule(owner_name)
                delattr(owner, leaf)
                owner.register_buffer(leaf, tensor)
            frozen += 1
    return frozen



def dpo_trainer_class(prefix_sharing: bool = False, pack_tokens: int = 0, reference_adapter: str | None = None,
                      loaded_as: dict | None = None):
    """TRL's DPOTrainer, given token ids instead of text; with prefix_sharing, each pair's prompt runs once.

    TRL tokenizes a text prompt with the tokenizer's defaults (a Llama tokenizer adds a second BOS to the `<s>` the
    prompt already holds) and appends the EOS text to each reply, so DPO would train on other ids than the
    generator saw. Here the ids generate_preferences kept are used as they are (token_id_rows), and TRL's
    max_length rule is applied to them (fully_truncated).

    prefix_sharing: the policy's and the reference's passes run `[prompt, chosen, rejected]` as one row
    (dpo_prefix), pack_tokens > 0 packs several pairs per row; TRL's loss and metrics are computed unchanged on the
    logits that pass gives. With precompute_ref_log_probs the reference log-probs are kept in the run folder
    (dpo_reference) and reused on --resume; `loaded_as` (base_loading) is part of their key."""
    from trl import DPOTrainer

    from .dpo_prefix import build_layout, compact_inputs, shared_forward, split_pairs, unsupported_reason
    from .dpo_reference import cached_reference_log_probs

    class TokenExactDPOTrainer(DPOTrainer):
        _fallback_said = False
        prefix_sharing_on = prefix_sharing  # attributes, so a test or a benchmark can switch them on one trainer
        pack_pairs_tokens = pack_tokens
        reference_source = reference_adapter  # loaded into `ref` before anything reads it (make_trainer)
        base_loaded_as = dict(loaded_as or {})  # how the base was loaded: part of the reference log-probs' key

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            rows = token_id_rows(dataset, self._tokenizer, dataset_name)
            return rows.filter(lambda ids: not fully_truncated(ids, args.max_length, args.truncation_mode),
                               input_columns="prompt_ids")

        def _save_rng_state(self, output_dir):
            super()._save_rng_state(output_dir)
            # inside the save: trainer_state.json not yet written
            reached(f"dpo-save:{self.state.global_step}", output_dir)

        def _plain_path(self, reason: str) -> None:
            if not self._fallback_said:
                print(f"prefix sharing off, TRL's plain two-row pass instead: {reason}")
                type(self)._fallback_said = True

        def shared_layout(self, inputs):
            """The packed rows for this batch, or None for TRL's plain path (the reason printed once)."""
            if not self.prefix_sharing_on:
                return None
            model = self.accelerator.unwrap_model(self.model)
            reason = ("use_liger_kernel computes log-probs in its own pass" if self.use_liger_kernel
                      else unsupported_reason(model))
            pairs, why = ([], reason) if reason else split_pairs(inputs)
            if why:
                self._plain_path(why)
                return None
            return build_layout(pairs, self.data_collator.pad_token_id, pack_tokens=self.pack_pairs_tokens)

        @contextlib.contextmanager
        def forward_layout(self, inputs):
            """Yields the batch to hand TRL (compact under prefix sharing), the model's calls giving its logits."""
            layout = self.shared_layout(inputs)
            if layout is None:
                yield inputs
                return
            with shared_forward(self.accelerator.unwrap_model(self.model), layout, self.accelerator.autocast):
                yield compact_inputs(inputs, layout)

        def _compute_loss(self, model, inputs, return_outputs):
            if return_outputs:  # the caller wants the logits of TRL's full layout
                return super()._compute_loss(model, inputs, return_outputs)
            with self.forward_layout(inputs) as batch:
                return super()._compute_loss(model, batch, return_outputs)

        def _compute_ref_log_probs(self, model, inputs):
            with self.forward_layout(inputs) as batch:
                return super()._compute_ref_log_probs(model, batch)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if self.reference_source is not None:  # TRL precomputes inside __init__: the anchor must be `ref` first
                load_reference_adapter(self.model, self.reference_source)
            if self.accelerator.num_processes > 1 and not dataset.cache_files:
                dataset = shared_on_disk(self, dataset, name)
            compute = super()._precompute_ref_logps
            return cached_reference_log_probs(self, dataset, name, lambda: compute(dataset, name, batch_size),
                                              path_tag="shared" if self.prefix_sharing_on else "plain",
                                              batch_size=batch_size)

    return TokenExactDPOTrainer


def shared_on_disk(trainer, dataset, name: str):
    """The dataset saved in the run folder and read back by every process. TRL's precompute writes the reference
    log-probs next to the dataset's files on the main process and the others read them there; an in-memory dataset
    (read so, to leave no cache files in a published dataset/) has none, and each process would look in its own
    temporary folder."""
    from datasets import load_from_disk

    path = Path(trainer.args.output_dir) / REFERENCE_LOGPS / f"dataset-{name}"
    if trainer.accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        dataset.save_to_disk(str(path))
    trainer.accelerator.wait_for_everyone()
    return load_from_disk(str(path))


def base_loading(cfg) -> dict:
    """How the base model is loaded and the prompts templated, as the reference log-probs' key names it."""
    import hashlib

    from .models import use_unsloth

    template = Path(cfg.chat_template)
    return {"base_model": cfg.base_model, "load_in_4bit": cfg.load_in_4bit, "use_unsloth": use_unsloth(cfg.use_unsloth),
            "chat_template": hashlib.sha256(template.read_bytes()).hexdigest() if template.is_file() else None}


def make_trainer(cfg, model, tokenizer, dpo_args, train_set, eval_set):
    trainer_class = dpo_trainer_class(cfg.prefix_sharing, cfg.pack_pairs_tokens, cfg.reference_adapter,
                                      base_loading(cfg))
    trainer = trainer_class(model=model, ref_model=None, args=dpo_args, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, callbacks=[config_saver(cfg)])
    if REFERENCE_ADAPTER not in trainer.model.peft_config:
        raise PipelineError("TRL did not add the frozen reference adapter; this trl version is not supported")
    if not cfg.train_modules_to_save and not freeze_modules_to_save(trainer.model):  # before the optimizer is built
        warnings.warn(f"{cfg.adapter}: train_modules_to_save is false, but the adapter has no modules_to_save: "
                      "nothing to freeze", stacklevel=2)
    if cfg.reference_adapter is not None:
        load_reference_adapter(trainer.model, cfg.reference_adapter)
    keep_trainable_in_fp32(trainer)
    return trainer


def load_reference_adapter(model, source: str) -> None:
    """Replace TRL's copy of the start adapter in `ref` by another adapter's weights (an anchor: e.g. the SFT
    adapter while iteration k trains on from iteration k-1's); the guard then checks `ref` against that adapter."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    result = set_peft_model_state_dict(model, load_peft_weights(source, device="cpu"), adapter_name=REFERENCE_ADAPTER)
    unexpected = [k for k in getattr(result, "unexpected_keys", None) or []
                  if not k.endswith((".original_module.weight", ".modules_to_save.weight"))]
    if unexpected:
        raise PipelineError(f"reference_adapter {source}: its weights do not fit the model ({unexpected[:3]} ...)")


def restore_trained_adapter(trainer, checkpoint: Path) -> None:
    """Load the checkpoint's trained adapter into "default" before resuming.

    transformers' Trainer, seeing the checkpoint's ref/ sub-folder, reloads only the sub-folder adapters and
    skips the trainable one at the top: a resumed run would silently restart from the SFT weights.
    """
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    # Frozen copies are one tensor shared with the reference: the checkpoint must hold exactly those values.
    buffers = trainer.model.named_buffers
    shared = {name: buffer.detach().cpu().clone() for name, buffer in buffers(remove_duplicate=False)
              if f".modules_to_save.{REFERENCE_ADAPTER}." in name}
    result = set_peft_model_state_dict(trainer.model, weights, adapter_name="default")
    moved = [name for name, buffer in buffers(remove_duplicate=False)
             if name in shared and not torch.equal(buffer.detach().cpu(), shared[name])]
    if moved:
        raise PipelineError(f"{checkpoint}: its modules_to_save were trained, but train_modules_to_save is false "
                            f"({moved[0]}); resume it with train_modules_to_save true")
    # PEFT's save_embedding_layers="auto" adds, from the second save on, copies of the wrapped embedding layers
    # ("X.original_module.weight", "X.modules_to_save.weight" next to the "X.weight" that loads): not a misfit.
    unexpected = [k for k in getattr(result, "unexpected_keys", None) or []
                  if not k.endswith((".original_module.weight", ".modules_to_save.weight"))]
    if unexpected:
        raise PipelineError(f"{checkpoint}: adapter weights do not fit the model ({unexpected[:3]} ...)")
    # The Trainer reloads the checkpoint's ref/ into "ref" as it resumes: load it now, so that the guard checks the
    # reference that training will use (against the adapter the run started from), not the one built from SFT.
    saved_reference = checkpoint / REFERENCE_ADAPTER / "adapter_model.safetensors"
    if saved_reference.is_file():
        set_peft_model_state_dict(trainer.model, load_file(str(saved_reference)), adapter_name=REFERENCE_ADAPTER)
    keep_trainable_in_fp32(trainer)


def embeddings_in_modules_to_save(model) -> bool:
    from peft.utils import ModulesToSaveWrapper

    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    return all(isinstance(layer, ModulesToSaveWrapper) for layer in layers)


def save_final_adapter(trainer, tokenizer, cfg) -> Path:
    """The trained adapter alone (not TRL's reference copy), with the tokenizer and the resolved config."""
    folder = Path(cfg.output_dir) / FINAL_ADAPTER
    # Embeddings in modules_to_save are saved as the adapter's own weights; PEFT's "auto" would add redundant copies.
    embeddings = False if embeddings_in_modules_to_save(trainer.model) else "auto"
    trainer.model.save_pretrained(str(folder), selected_adapters=["default"], save_embedding_layers=embeddings)
    tokenizer.save_pretrained(str(folder))
    save_config(cfg, folder, CONFIG_NAME)
    return folder


def train(cfg, resume: bool = False) -> dict:
    """Under `accelerate launch` every process trains (TRL's DDP path); only the main one holds the run folder's
    lock and writes files and wandb."""

    from .models import check_adapter_path
    from .template import load_chat_format

    # ---- inputs, checked before any model loads
    state = process_state()
    check_adapter_path(cfg.adapter, "adapter", cfg.source)
    if cfg.reference_adapter is not None:
        check_adapter_path(cfg.reference_adapter, "reference_adapter", cfg.source)
    chat = load_chat_format(cfg.chat_template)
    folder = Path(cfg.output_dir)
    lock, created = None, not folder.exists()
    try:
        with state.main_process_first():  # the main process locks the folder and tidies it; the others then read it
            if state.is_main_process:  # one writer per run folder, to the end of the run
                lock = claim_run_folder(folder, SCRIPT, "training", "fine_tune_dpo run")
            checkpoint = resolve_resume(cfg, resume, tidy=state.is_main_process, processes=state.num_processes)
        return _train(cfg, state, chat, folder, checkpoint)
    except PipelineError:
        # refused input leaves no half-made run behind: a folder this run made holding only its marker goes again
        if lock is not None and created:
            lock.release()
            if {p.name for p in folder.iterdir()} <= {RUN_MARKER}:
                shutil.rmtree(folder)
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, state, chat, folder: Path, checkpoint: Path | None) -> dict:
    import torch

    from .models import load_generator, load_tokenizer
    from .tracking import start_wandb

    tokenizer = load_tokenizer(cfg.base_model, cfg.adapter, chat)
    with state.main_process_first():  # one process writes the datasets cache, the others read it
        train_set, eval_set = load_preferences(cfg, chat.special_tokens, vocabulary=len(tokenizer))
    dpo_args = build_dpo_config(cfg, has_eval=eval_set is not None)
    check_pair_texts(tokenizer, train_set, cfg.base_model)
    kept = report_overlong({"training": train_set, "held-out": eval_set}, tokenizer, dpo_args, cfg.dataset,
                           say=print if state.is_main_process else lambda _: None)
    check_trains_something(cfg.source, kept["training"], dpo_args, state.num_processes)
    state.wait_for_everyone()  # every process has looked at output_dir before the main one writes into it
    run = None
    if state.is_main_process:
        save_config(cfg, folder, "config.json")
        run = start_wandb(cfg.wandb, "fine_tune_dpo", to_dict(cfg), folder)

    # ---- one base model: the SFT adapter trainable as "default", TRL's frozen copy as "ref"
    model, tokenizer = load_generator(cfg, trainable=True)
    trainer = make_trainer(cfg, model, tokenizer, dpo_args, train_set, eval_set)
    if state.is_main_process:
        held_out = trainer.eval_dataset
        print(f"training {len(trainer.train_dataset)} pairs (held out: {len(held_out) if held_out is not None else 0}); "
              f"one base model, adapters: {', '.join(trainer.model.peft_config)} (frozen: {REFERENCE_ADAPTER}"
              + ("; modules_to_save frozen in both, one shared copy" if not cfg.train_modules_to_save else "") + ")")
    if checkpoint:
        restore_trained_adapter(trainer, checkpoint)
    reference_check = guard_reference(trainer, folder, checkpoint, state.is_main_process, cfg.reference_adapter)

    # ---- training, then the held-out figures
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if "first_batch" not in reference_check:  # e.g. max_steps 0, or a trainer that bypasses compute_loss
        warnings.warn("the reference's first-batch check never ran: training computed no loss through compute_loss",
                      stacklevel=2)
        reference_check["first_batch"] = {"skipped": "training computed no loss through compute_loss"}
    metrics = {"train": trainer.state.log_history, "reference_check": reference_check}
    if eval_set is not None:
        metrics["eval"] = trainer.evaluate()
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

    # ---- the trained adapter alone, metrics
    state.wait_for_everyone()
    if state.is_main_process:
        final = save_final_adapter(trainer, tokenizer, cfg)
        write_text_atomic(folder / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
        if eval_set is not None:
            e = metrics["eval"]
            plain_dpo = cfg.dpo.get("loss_type", ["sigmoid"]) in ("sigmoid", ["sigmoid"])  # else ln 2 means nothing
            print(f"held-out: loss {e['eval_loss']:.4f}" + (f" (ln 2 = {math.log(2):.4f})" if plain_dpo else "") + ", "
                  f"rewards/accuracies {e.get('eval_rewards/accuracies', float('nan')):.3f}, "
                  f"rewards/margins {e.get('eval_rewards/margins', float('nan')):.3f}")
        if "peak_gpu_memory_gib" in metrics:
            print(f"peak GPU memory: {metrics['peak_gpu_memory_gib']:.2f} GiB")
        print(f"saved the trained adapter to {final}")
        if run is not None:
            run.summary.update({k: v for k, v in metrics.items() if k != "train"})
            run.finish()
    return metrics
