"""DPO throughput: candidate settings side by side, each in its own process, on realistic lengths.

    python bench/dpo_memory.py --build-cpu-world --world /tmp/dpo-cpu --design adapter    # once (CPU world)
    python bench/dpo_throughput.py --world /tmp/dpo-cpu                         # every candidate, CPU
    python bench/dpo_throughput.py --world /tmp/dpo-cpu --candidates batch2-accum8,batch16-accum1 --repeats 2
    python bench/dpo_throughput.py --world /tmp/synth-7b --limit 90             # GPU, 7B 4-bit (bench/gpu_issue17.sh)
    python bench/dpo_throughput.py --build-cpu-world realistic --world /tmp/dpo-real   # issue 23: 8 layers, hidden 1024
    python bench/dpo_throughput.py --world /tmp/dpo-real --real-lengths --steps 2 \
        --candidates trl-path,prefix-sharing,reference-once,all-levers,prefix-batch8,prefix-packed,all-levers-packed

Every candidate trains the same pairs in the same order (seed 0) with the same effective batch (16 pairs per
optimizer step, as args/dpo_arg.json: 2 per device x 8 accumulated) and the adapter design (one base, TRL's
frozen "ref" copy of the SFT adapter). The pairs are shaped like the real ones: the prompt rendered by the chat
template from a system prompt and a two-turn history, about 100 tokens; replies of 5 to 20 tokens.

Per candidate, one JSON line as soon as it ends: pairs/s over the optimizer steps after the first (the first
pays for allocation and kernel selection; with precompute_ref_log_probs the reference pass before training is
added back, spread over the pairs it covered), peak memory (process max RSS on the CPU,
torch.cuda.max_memory_allocated on CUDA), the first logged loss (ln 2 = 0.6931 for the sigmoid loss: policy and
reference start equal) and the last. A candidate that fails or passes --limit seconds prints a line saying so.
The learning rate is 1e-4, constant, so that a few steps move the loss and settings that train differently show.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EFFECTIVE_BATCH = 16
SYSTEM_PROMPT = "you are a friendly chatbot , reply in the requested emotion ."  # args/demo/generate_preferences_arg.json
EMOTIONS = ["neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"]


# random Llama shapes for the CPU: dpo_memory.py's, and issue 23's "realistic" one (8 layers, hidden 1024, Llama-2's
# vocabulary size and MLP ratio), on which the prompt-to-reply ratio and the LM head weigh as on Llama-2-7B
CPU_SHAPES = {
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=8000),
    "realistic": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=32000),
}


def batches(per_device: int) -> dict:
    return dict(per_device_train_batch_size=per_device, gradient_accumulation_steps=EFFECTIVE_BATCH // per_device)


# name -> (DPOConfig settings beyond the common ones, loaded through unsloth); the first is args/dpo_arg.json's
CANDIDATES = {
    "batch2-accum8": (batches(2), False),
    "batch4-accum4": (batches(4), False),
    "batch8-accum2": (batches(8), False),
    "batch16-accum1": (batches(16), False),
    "batch16-no-checkpointing": ({**batches(16), "gradient_checkpointing": False}, False),
    "batch2-accum8-precompute-ref": ({**batches(2), "precompute_ref_log_probs": True,
                                      "precompute_ref_batch_size": 16}, False),
    "batch16-precompute-ref": ({**batches(16), "precompute_ref_log_probs": True, "precompute_ref_batch_size": 16},
                               False),
    "batch2-accum8-length-grouped": ({**batches(2), "train_sampling_strategy": "group_by_length"}, False),
    "batch2-accum8-liger": ({**batches(2), "use_liger_kernel": True}, False),
    "batch16-liger": ({**batches(16), "use_liger_kernel": True}, False),
    # TRL's own part of use_liger_kernel alone (its chunked log-probs, no [N, vocab] logits), without liger's
    # Triton kernels, which transformers' Trainer would patch in: runs where Triton does not (the CPU)
    "batch16-chunked-logps-only": ({**batches(16), "use_liger_kernel": True}, False),
    "batch2-accum8-adamw-8bit": ({**batches(2), "optim": "adamw_bnb_8bit"}, False),
    "batch2-accum8-paged-adamw-8bit": ({**batches(2), "optim": "paged_adamw_8bit"}, False),
    "batch2-accum8-padding-free": ({**batches(2), "padding_free": True}, False),
    "unsloth-batch2-accum8": (batches(2), True),
    "unsloth-batch16-accum1": (batches(16), True),
}
# issue 23's levers, through fine_tune_dpo's own trainer (dpo_train.dpo_trainer_class, token ids as it gives them),
# at args/dpo_arg.json's batch: name -> (DPOConfig settings, prefix_sharing, pack_pairs_tokens)
LEVERS = {
    "trl-path": (batches(2), False, 0),  # TRL's two rows per pair, the reference every step
    "prefix-sharing": (batches(2), True, 0),
    "prefix-packed": (batches(8), True, 512),  # 8 pairs per forward, packed into rows of up to 512 tokens
    "prefix-batch8": (batches(8), True, 0),  # the same forward size unpacked: packing's own share
    "reference-once": ({**batches(2), "precompute_ref_log_probs": True, "precompute_ref_batch_size": 16}, False, 0),
    "all-levers": ({**batches(2), "precompute_ref_log_probs": True, "precompute_ref_batch_size": 16}, True, 0),
    "all-levers-packed": ({**batches(8), "precompute_ref_log_probs": True, "precompute_ref_batch_size": 16}, True,
                          512),
}


def realistic_pairs(tokenizer, n: int, seed: int = 0, real_config: bool = False):
    """Preference pairs shaped like generate_preferences' output: a rendered prompt with a system prompt and a
    two-turn history (user, assistant, user; about 100 tokens), replies of 5 to 20 tokens.

    real_config: the window args/generate_preferences_arg.json renders (its system_prompt, num_turns_history 2:
    five filled turns, the sixth the reply), turns of 6 to 20 words, replies of 4 to 18 words + "." + EOS (at most
    21 tokens with a word-level tokenizer: max_new_tokens 20 + EOS)."""
    import datasets

    from emotion_dpo.template import render_chat

    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()  # a hash map: its order changes from process to process, so sort by id
    vocabulary = [t for t in sorted(vocab, key=vocab.get) if t.isalnum() and not t.startswith("<")][:1000] or ["w"]

    def words(k):
        return " ".join(rng.choice(vocabulary) for _ in range(k))

    def turn(role, dialog):
        return {"role": role, "content": {"emotion": rng.choice(EMOTIONS), "dialog": dialog}}

    real = json.loads((ROOT / "args/generate_preferences_arg.json").read_text()) if real_config else None
    rows = []
    for _ in range(n):
        if real:
            filled = 2 + 2 * real["num_turns_history"] - 1
            messages = [{"role": "system", "content": {"emotion": "neutral", "dialog": real["system_prompt"]}}]
            messages += [turn("user" if i % 2 == 0 else "assistant", words(rng.randint(6, 20))) for i in range(filled)]
            messages.append(turn("assistant", ""))
        else:
            messages = [{"role": "system", "content": {"emotion": "neutral", "dialog": SYSTEM_PROMPT}},
                        turn("user", words(rng.randint(18, 30))), turn("assistant", words(rng.randint(18, 30))),
                        turn("user", words(rng.randint(18, 30))), turn("assistant", "")]
        rows.append({"prompt": render_chat(tokenizer, messages),
                     "chosen": " " + words(rng.randint(4, 18)) + " .",
                     "rejected": " " + words(rng.randint(4, 18)) + " ."})
    return datasets.Dataset.from_list(rows)


def measure(args) -> dict:
    lever = LEVERS.get(args.candidate)
    settings_extra, unsloth = (lever[0], False) if lever else CANDIDATES[args.candidate]
    if args.effective_batch != EFFECTIVE_BATCH:  # the same effective batch for every candidate, another size
        per_device = min(settings_extra["per_device_train_batch_size"], args.effective_batch)
        settings_extra = {**settings_extra, "per_device_train_batch_size": per_device,
                          "gradient_accumulation_steps": args.effective_batch // per_device}
    if unsloth:
        import unsloth as _  # noqa: F401  (before trl, which it patches)
    import torch
    from trl import DPOConfig, DPOTrainer

    sys.path.insert(0, str(ROOT / "bench"))
    from dpo_memory import load, step_clock

    from emotion_dpo.dpo_train import freeze_modules_to_save, keep_trainable_in_fp32, trl_defaults_for_unset

    cuda = torch.cuda.is_available()
    if args.candidate.endswith("chunked-logps-only"):
        import transformers.trainer

        transformers.trainer.apply_liger_kernel = lambda *a, **k: None  # the Trainer's patching, left out

    def peak_gib() -> float:
        return (torch.cuda.max_memory_allocated() if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30

    base, adapter = Path(args.world) / "base", Path(args.world) / "adapter"
    four_bit = cuda or args.four_bit
    model, tokenizer = load(base, adapter, four_bit=four_bit, trainable=True, unsloth=unsloth)
    # the dataset: the pairs trained on, or more (--dataset-pairs): a precomputed reference runs over all of them, as
    # over a real dataset, so that its fixed costs (TRL hashes the whole model) are spread over more than a few steps
    pairs = realistic_pairs(tokenizer, max(args.dataset_pairs, args.effective_batch * args.steps),
                            real_config=args.real_lengths)
    if lever:  # the ids fine_tune_dpo trains on, measured as it gives them to TRL
        from emotion_dpo.dpo_data import token_id_rows

        pairs = token_id_rows(pairs, tokenizer, "benchmark")
        prompt_tokens = [len(ids) for ids in pairs["prompt_ids"]]
        reply_tokens = [len(ids) for ids in list(pairs["chosen_ids"]) + list(pairs["rejected_ids"])]
    else:
        prompt_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pairs["prompt"]]
        reply_tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"])
                        for r in list(pairs["chosen"]) + list(pairs["rejected"])]
    settings = dict(
        max_length=512, beta=0.1, max_steps=args.steps, gradient_checkpointing=True, learning_rate=1e-4,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        bf16=cuda, fp16=False, eval_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0)
    settings.update(settings_extra)
    with tempfile.TemporaryDirectory() as tmp:
        dpo_args = DPOConfig(output_dir=str(Path(tmp) / "out"), **settings,
                             **trl_defaults_for_unset(DPOConfig, settings))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer_class = DPOTrainer
        if lever:
            from emotion_dpo.dpo_train import dpo_trainer_class

            trainer_class = dpo_trainer_class(prefix_sharing=lever[1], pack_tokens=lever[2])
        trainer = trainer_class(model=model, ref_model=None, args=dpo_args, processing_class=tokenizer,
                                train_dataset=pairs)
        setup_seconds = time.perf_counter() - started  # tokenizing; with precompute_ref_log_probs the reference pass
        if args.frozen_copies:
            freeze_modules_to_save(trainer.model)
        keep_trainable_in_fp32(trainer)
        step_times = []
        trainer.add_callback(step_clock(step_times, peak_gib, f"{args.candidate} "))
        trainer.train()
    precompute = dpo_args.precompute_ref_log_probs
    # precompute: DPOTrainer's reference pass runs before training (in __init__ or at the start of train, as
    # TRL places it); its time is in setup_seconds or in the first step, spread here over every pair it covered
    steady = step_times[1:] or step_times
    seconds_per_pair = sum(steady) / (args.effective_batch * len(steady))
    if precompute:  # once per pair, for --epochs passes over it
        seconds_per_pair += setup_seconds / (len(pairs) * args.epochs)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "candidate": args.candidate, "settings": settings_extra, "unsloth": unsloth,
        "train_modules_to_save": not args.frozen_copies,
        "effective_batch": dpo_args.per_device_train_batch_size * dpo_args.gradient_accumulation_steps,
        "pairs_per_s": 1 / seconds_per_pair, "optimizer_step_seconds": [round(t, 3) for t in step_times],
        "setup_seconds": round(setup_seconds, 3), "peak_memory_gib": peak_gib(),
        "memory_measure": "torch.cuda.max_memory_allocated" if cuda else "process max RSS",
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "first_loss_minus_ln2": losses[0] - math.log(2) if losses else None,
        "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens), "reply_tokens_max": max(reply_tokens),
        "prompt_tokens_min_max": [min(prompt_tokens), max(prompt_tokens)],
        "reply_tokens_mean": sum(reply_tokens) / len(reply_tokens), "reply_tokens_min": min(reply_tokens),
        "precompute_amortized_over_epochs": args.epochs if precompute else None, "dataset_pairs": len(pairs),
        "prefix_sharing": lever[1] if lever else False, "pack_pairs_tokens": lever[2] if lever else 0,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "four_bit": four_bit,
        "load_average_1m_after": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="folder with base/ and adapter/ (as dpo_memory.py)")
    parser.add_argument("--candidates", default=",".join(c for c in CANDIDATES if not c.startswith("unsloth")),
                        help=f"comma-separated, run in this order (known: {', '.join([*CANDIDATES, *LEVERS])})")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of 16 pairs each")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the candidates, alternated")
    parser.add_argument("--limit", type=float, default=0, help="seconds per candidate process (0: none)")
    parser.add_argument("--frozen-copies", action="store_true", help="train_modules_to_save false")
    parser.add_argument("--four-bit", action="store_true", help="a 4-bit base on the CPU too (always on CUDA)")
    parser.add_argument("--effective-batch", type=int, default=EFFECTIVE_BATCH,
                        help="pairs per optimizer step, for every candidate (args/dpo_arg.json: 16)")
    parser.add_argument("--real-lengths", action="store_true",
                        help="prompts as args/generate_preferences_arg.json renders them (realistic_pairs)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="passes over the pairs a precomputed reference serves (args/dpo_arg.json: 3)")
    parser.add_argument("--dataset-pairs", type=int, default=0,
                        help="pairs in the dataset, if more than --effective-batch x --steps (the precomputed "
                             "reference covers them all; the real dataset: 2048)")
    parser.add_argument("--build-cpu-world", choices=sorted(CPU_SHAPES),
                        help="only build a random Llama world of this shape in --world (dpo_memory.cpu_world)")
    parser.add_argument("--candidate", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.build_cpu_world:
        sys.path.insert(0, str(ROOT / "bench"))
        import dpo_memory

        dpo_memory.CPU_SHAPE = CPU_SHAPES[args.build_cpu_world]
        print(dpo_memory.cpu_world(Path(args.world)))
        return
    if args.candidate:
        sys.path.insert(0, str(ROOT))
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    names = args.candidates.split(",")
    known = {**CANDIDATES, **LEVERS}
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for repeat in range(args.repeats):
        for name in names:
            command = [sys.executable, __file__, "--world", args.world, "--candidate", name, "--steps", str(args.steps)]
            command += ["--frozen-copies"] if args.frozen_copies else []
            command += ["--four-bit"] if args.four_bit else []
            command += ["--real-lengths"] if args.real_lengths else []
            command += ["--epochs", str(args.epochs), "--effective-batch", str(args.effective_batch),
                        "--dataset-pairs", str(args.dataset_pairs)]
            started = time.time()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.limit or None)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                result = (json.loads(lines[-1][len("RESULT "):]) if lines else
                          {"candidate": name, "failed": True, "returncode": done.returncode,
                           "error": last_error(done.stderr)})
                steps_seen = done.stderr
            except subprocess.TimeoutExpired as expired:
                steps_seen = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
                result = {"candidate": name, "failed": True, "timed_out_after_s": args.limit}
            result["step_lines"] = [line for line in steps_seen.splitlines() if f"{name} step" in line][-4:]
            result.update(repeat=repeat + 1, process_seconds=round(time.time() - started, 1))
            print(json.dumps(result), flush=True)


def last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [""])[-1][:400]


if __name__ == "__main__":
    main()
