"""DPO memory and step time: the frozen-reference-adapter design vs a separate full reference model.

    python bench/dpo_memory.py --build-cpu-world --world /tmp/dpo-cpu --design adapter
    python bench/dpo_memory.py --design adapter  --world /tmp/dpo-cpu       # one design per process
    python bench/dpo_memory.py --design separate --world /tmp/dpo-cpu
    python bench/dpo_memory.py --design adapter  --world /tmp/synth-7b --max-length 512   # GPU, 7B 4-bit
    python bench/dpo_memory.py --design adapter  --world /tmp/dpo-cpu --frozen-copies   # train_modules_to_save false

"adapter": one base carrying the SFT adapter; TRL adds the frozen copy "ref" (what fine_tune_dpo.py does).
"separate": the same policy, plus a second base with the SFT adapter as ref_model. Prints one JSON line with
peak memory (process max RSS on the CPU, torch.cuda.max_memory_allocated on CUDA) and the mean step time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A model large enough that the base dominates (~69 M parameters), random weights.
CPU_SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=8000)


def cpu_world(folder: Path) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic import SPECIALS, word_tokenizer

    from emotion_dpo.template import install_chat_format, load_chat_format

    torch.manual_seed(0)
    tokenizer = word_tokenizer(CPU_SHAPE["vocab_size"], SPECIALS, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    base = LlamaForCausalLM(LlamaConfig(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **CPU_SHAPE))
    base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    install_chat_format(tokenizer, load_chat_format(ROOT / "args/chat_template.json"))
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    lora = LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM", modules_to_save=["embed_tokens", "lm_head"],
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(base, lora).save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "adapter")
    return folder / "base", folder / "adapter"


def pairs(n: int, words: int):
    import datasets

    rng = random.Random(0)

    def text(k):
        return " ".join(f"w{rng.randrange(1000)}" for _ in range(k))

    return datasets.Dataset.from_list([
        {"prompt": f"<s>[INST] [EMOTION] neutral [/EMOTION] {text(words)} [/INST] [EMOTION] happiness [/EMOTION]",
         "chosen": f" {text(words // 2)} .", "rejected": f" {text(words // 2)} ."} for _ in range(n)])


def load(base: Path, adapter: Path, four_bit: bool, trainable: bool, unsloth: bool = False):
    from types import SimpleNamespace

    from emotion_dpo.models import load_generator

    source = SimpleNamespace(base_model=str(base), adapter=str(adapter),
                             chat_template=str(ROOT / "args/chat_template.json"),
                             load_in_4bit=four_bit, use_unsloth=unsloth)
    return load_generator(source, trainable=trainable)


def held_tensors(models, optimizer) -> dict:
    """GiB held by the models' weights, their gradients and the optimizer state, by kind, each storage once
    (exact, any device; activations and allocator slack are what the peak adds on top). Kinds: the 4-bit base
    weights (packed bytes only), the base's embeddings and LM head, the rest of the base, the adapters' LoRA
    matrices and their embedding / LM-head copies (PEFT modules_to_save), each split into trainable and frozen."""
    seen, held = set(), {}

    def add(kind, tensor):
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            held[kind] = held.get(kind, 0) + tensor.untyped_storage().nbytes() / 2**30

    for model in models:
        # buffers too: frozen modules_to_save copies are buffers (emotion_dpo.dpo_train.freeze_modules_to_save)
        tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        for name, tensor in tensors:
            part = ("modules_to_save copies" if "modules_to_save" in name else "LoRA" if "lora_" in name
                    else "base, embeddings / LM head" if "original_module" in name or "embed" in name
                    or "lm_head" in name
                    else "base, 4-bit" if type(tensor).__name__ == "Params4bit" else "base, full precision")
            add(f"weights: {part}, {'trainable' if tensor.requires_grad else 'frozen'}", tensor)
            if tensor.grad is not None:
                add(f"gradients: {part}", tensor.grad)
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                add("optimizer state", value)
    return {kind: round(gib, 4) for kind, gib in sorted(held.items())}


def step_clock(step_times: list, peak_gib, label: str = ""):
    """A callback appending each optimizer step's seconds to `step_times` and writing them, with the peak memory
    so far, to stderr as the step ends, so a run cut off by a time limit still leaves its figures so far."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.started)
            print(f"\n{label}step {len(step_times)}: {step_times[-1]:.3f} s, peak so far {peak_gib():.3f} GiB",
                  file=sys.stderr, flush=True)

    return Clock()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--design", choices=["adapter", "separate"], required=True)
    parser.add_argument("--world", required=True,
                        help="folder with base/ and adapter/ (bench/synthetic.py, or built here by --build-cpu-world)")
    parser.add_argument("--build-cpu-world", action="store_true", help="only build the CPU-sized world in --world")
    parser.add_argument("--frozen-copies", action="store_true",
                        help="train_modules_to_save false: the SFT adapter's embedding / LM-head copies frozen "
                             "(in the adapter design shared with the reference)")
    parser.add_argument("--unsloth", action="store_true", help="load the models through unsloth (use_unsloth: true)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.unsloth:
        import unsloth  # noqa: F401  (before trl, which it patches)

    from trl import DPOConfig

    from emotion_dpo.dpo_train import freeze_modules_to_save, keep_trainable_in_fp32, trl_defaults_for_unset

    if args.build_cpu_world:  # in its own process, so the build does not count in the measured peak
        cpu_world(Path(args.world))
        return
    cuda = torch.cuda.is_available()

    def peak_gib() -> float:
        return (torch.cuda.max_memory_allocated() if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30

    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = Path(args.world) / "base", Path(args.world) / "adapter"
        model, tokenizer = load(base, adapter, four_bit=cuda, trainable=True, unsloth=args.unsloth)
        ref_model = (load(base, adapter, four_bit=cuda, trainable=False, unsloth=args.unsloth)[0]
                     if args.design == "separate" else None)
        settings = dict(
            per_device_train_batch_size=args.batch, max_length=args.max_length,
            max_steps=args.steps, gradient_checkpointing=True, learning_rate=1e-5, logging_steps=1, save_strategy="no",
            report_to="none", bf16=cuda, fp16=False, eval_strategy="no", seed=0)
        # unsloth's DPOConfig on CUDA changes defaults (gradient accumulation 2): the same training either way
        dpo_args = DPOConfig(output_dir=str(Path(tmp) / "out"), **settings,
                             **trl_defaults_for_unset(DPOConfig, settings))
        from trl import DPOTrainer

        trainer = DPOTrainer(model=model, ref_model=ref_model, args=dpo_args, processing_class=tokenizer,
                             train_dataset=pairs(args.batch * args.steps, args.max_length // 2))
        if args.frozen_copies:
            freeze_modules_to_save(trainer.model)
        keep_trainable_in_fp32(trainer)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step_times = []
        trainer.add_callback(step_clock(step_times, peak_gib))

        from transformers import TrainerCallback

        accounts = {}

        class Accountant(TrainerCallback):
            def on_pre_optimizer_step(self, *a, **k):  # gradients present, optimizer state from earlier steps
                accounts.update(held_tensors([trainer.model] + ([ref_model] if ref_model is not None else []),
                                             trainer.optimizer))

        trainer.add_callback(Accountant())
        trainer.train()
    steady = step_times[1:] or step_times  # the first step pays for allocation and kernel selection
    print(json.dumps({
        "design": args.design, "unsloth": args.unsloth, "train_modules_to_save": not args.frozen_copies,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "adapters": list(model.peft_config), "separate_reference_model": ref_model is not None,
        "max_length": args.max_length, "batch": args.batch, "steps": args.steps,
        "peak_memory_gib": peak_gib(),
        "memory_measure": "torch.cuda.max_memory_allocated" if cuda else "process max RSS",
        "mean_step_seconds": sum(steady) / len(steady),
        "held_gib_before_last_optimizer_step": accounts, "held_gib_total": round(sum(accounts.values()), 4),
        "load_average_1m_after": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }))


if __name__ == "__main__":
    main()
