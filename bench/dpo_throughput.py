"""DPO throughput: candidate settings side by side, each in its own process, on realistic lengths.

    python bench/dpo_memory.py --build-cpu-world --world /tmp/dpo-cpu --design adapter    # once (CPU world)
    python bench/dpo_throughput.py --world /tmp/dpo-cpu                         # every candidate, CPU
    python bench/dpo_throughput.py --world /tmp/dpo-cpu --candidates batch2-accum8,batch16-accum1 --repeats 2
    python bench/dpo_throughput.py --world /tmp/synth-7b --limit 90             # GPU, 7B 4-bit (bench/gpu_issue17.sh)

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


def realistic_pairs(tokenizer, n: int, seed: int = 0):
    """Preference pairs shaped like generate_preferences' output: a rendered prompt with a system prompt and a
    two-turn history (user, assistant, user; about 100 tokens), replies of 5 to 20 tokens."""
    import datasets

    from emotion_dpo.template import render_chat

    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()  # a hash map: its order changes from process to process, so sort by id
    vocabulary = [t for t in sorted(vocab, key=vocab.get) if t.isalnum() and not t.startswith("<")][:1000] or ["w"]

    def words(k):
        return " ".join(rng.choice(vocabulary) for _ in range(k))

    def turn(role, dialog):
        return {"role": role, "content": {"emotion": rng.choice(EMOTIONS), "dialog": dialog}}

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": {"emotion": "neutral", "dialog": SYSTEM_PROMPT}},
                    turn("user", words(rng.randint(18, 30))), turn("assistant", words(rng.randint(18, 30))),
                    turn("user", words(rng.randint(18, 30))), turn("assistant", "")]
        rows.append({"prompt": render_chat(tokenizer, messages),
                     "chosen": " " + words(rng.randint(4, 18)) + " .",
                     "rejected": " " + words(rng.randint(4, 18)) + " ."})
    return datasets.Dataset.from_list(rows)


def measure(args) -> dict:
    settings_extra, unsloth = CANDIDATES[args.candidate]
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
    pairs = realistic_pairs(tokenizer, EFFECTIVE_BATCH * args.steps)
    prompt_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pairs["prompt"]]
    reply_tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in list(pairs["chosen"]) + list(pairs["rejected"])]
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
        trainer = DPOTrainer(model=model, ref_model=None, args=dpo_args, processing_class=tokenizer,
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
    seconds_per_pair = sum(steady) / (EFFECTIVE_BATCH * len(steady))
    if precompute:
        seconds_per_pair += setup_seconds / len(pairs)
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
        "device": torch.cuda.get_device_name() if cuda else "cpu", "four_bit": four_bit,
        "load_average_1m_after": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="folder with base/ and adapter/ (as dpo_memory.py)")
    parser.add_argument("--candidates", default=",".join(c for c in CANDIDATES if not c.startswith("unsloth")),
                        help=f"comma-separated, run in this order (known: {', '.join(CANDIDATES)})")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of 16 pairs each")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the candidates, alternated")
    parser.add_argument("--limit", type=float, default=0, help="seconds per candidate process (0: none)")
    parser.add_argument("--frozen-copies", action="store_true", help="train_modules_to_save false")
    parser.add_argument("--four-bit", action="store_true", help="a 4-bit base on the CPU too (always on CUDA)")
    parser.add_argument("--candidate", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.candidate:
        sys.path.insert(0, str(ROOT))
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    names = args.candidates.split(",")
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(CANDIDATES)}")
    for repeat in range(args.repeats):
        for name in names:
            command = [sys.executable, __file__, "--world", args.world, "--candidate", name, "--steps", str(args.steps)]
            command += ["--frozen-copies"] if args.frozen_copies else []
            command += ["--four-bit"] if args.four_bit else []
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
