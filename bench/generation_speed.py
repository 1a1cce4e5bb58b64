"""Preference generation speed: the reference project's loop vs this project's batched pipeline, one run.

    python bench/generation_speed.py                                  # demo world, CPU
    python bench/generation_speed.py --synthetic 7b --prompts 64      # Llama-2-7B shape, random weights, GPU

Both paths get the same prompts, models, candidate count and generation settings, one round per prompt
(retries off), so the work is identical. Prints one JSON line: prompts per second for each and the ratio.
With --repeats R each path runs R times, alternated, and its fastest pass counts (the CPU here is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from reference_loop import reference_round  # noqa: E402

from emotion_dpo.config import GenerateConfig, load_config  # noqa: E402
from emotion_dpo.generation import (CandidateSampler, Scorer, left_padded_positions,  # noqa: E402
                                    prefill_cache, shares_prefill)
from emotion_dpo.models import load_generator  # noqa: E402
from emotion_dpo.prompts import load_prompts  # noqa: E402


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def logit_agreement(whole, cached) -> dict:
    return {"max_abs_diff_over_max_abs_logit": float((whole - cached).abs().max() / whole.abs().max()),
            "same_top_token": float((whole.argmax(-1) == cached.argmax(-1)).float().mean())}


def check_shared_prefill(model, tokenizer, settings, n_candidates, prompts):
    """Whether this model takes the batched path's shared prefill, and, even where it does not (unsloth on CUDA
    waits for this check), how the prefilled cache compares with the plain path: next-token logits against one
    forward pass over the whole left-padded prompt, and greedy `generate` continuations with and without it.

    In bf16 any key/value cache changes the rounding, so the same two measures are taken for transformers' own
    cached decoding as a control: its first decode step (cache of the whole prompt, one new token) against one
    forward pass over prompt + token, and greedy `generate` with its cache against `use_cache=False`."""
    import copy

    batch = tokenizer.pad({"input_ids": [p.ids for p in prompts]}, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    positions = left_padded_positions(mask)
    taken = shares_prefill(model, settings, n_candidates, ids.shape[1])
    greedy = copy.deepcopy(settings)
    greedy.update(do_sample=False, top_k=None, top_p=None, temperature=None, num_return_sequences=1,
                  max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        cache = prefill_cache(model, ids, mask, 1)
        if cache is None:
            return taken, None
        whole = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        cached = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                       past_key_values=cache).logits[:, -1].float()
        plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy)
        prefilled = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy,
                                   past_key_values=prefill_cache(model, ids, mask, 1))  # fresh: the first one grew
        # the control: transformers' own decode step and cache, no prefill of ours
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        token = full.logits[:, -1:].argmax(-1)
        ids_1, mask_1 = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        positions_1 = left_padded_positions(mask_1)
        whole_1 = model(input_ids=ids_1, attention_mask=mask_1, position_ids=positions_1).logits[:, -1].float()
        step_1 = model(input_ids=token, attention_mask=mask_1, position_ids=positions_1[:, -1:],
                       past_key_values=full.past_key_values).logits[:, -1].float()
        uncached = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy, use_cache=False)
    check = {**logit_agreement(whole, cached),
             "same_greedy_continuation": float((plain == prefilled).all(-1).float().mean())}
    control = {**logit_agreement(whole_1, step_1),
               "same_greedy_continuation": float((plain == uncached).all(-1).float().mean())}
    return taken, {**check, "control_transformers_decode_step_vs_whole_forward": control}


def run(cfg, prompts, n_prompts: int, batch_prompts: int, repeats: int = 1, check_only: bool = False,
        skip_reference: bool = False, force_shared_prefill: bool = False, reference_prompts: int | None = None) -> dict:
    from transformers import GenerationConfig

    model, tokenizer = load_generator(cfg)
    scorer = Scorer(cfg, tokenizer)
    settings = GenerationConfig(**cfg.generation)
    sampler = CandidateSampler(model, tokenizer, scorer, cfg.n_candidates, settings, batch_prompts)
    prompts = prompts[:n_prompts]
    try:  # a model whose decode path rejects a given cache (unsloth on CUDA?) should not cost the timings
        shared_prefill, prefill_check = check_shared_prefill(model, tokenizer, settings, cfg.n_candidates, prompts[:8])
    except Exception as error:  # noqa: BLE001
        shared_prefill, prefill_check = False, {"error": repr(error)[:500]}
    if force_shared_prefill:  # unsloth on CUDA: take the shared prefill the models module still holds back
        model.unsloth_cuda_decode = False
        shared_prefill = shares_prefill(model, settings, cfg.n_candidates, 2)
    if check_only:
        return {"use_unsloth": str(cfg.use_unsloth), "shared_prefill": shared_prefill,
                "shared_prefill_next_token_logits_vs_whole_prompt": prefill_check,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    # the reference loop takes one prompt at a time, so its rate does not depend on how many it is timed over
    reference_set = prompts[:reference_prompts] if reference_prompts else prompts

    def reference_pass():
        for prompt in reference_set:
            reference_round(model, tokenizer, prompt, cfg.n_candidates, settings, scorer.emotion, scorer.gibberish,
                            cfg)

    def batched_pass():
        for i in range(0, len(prompts), batch_prompts):
            sampler.sample(prompts[i:i + batch_prompts])

    def timed(fn):
        synchronize()
        started = time.perf_counter()
        fn()
        synchronize()
        return time.perf_counter() - started

    # warm-up: kernels, caches, the classifiers' first call
    reference_round(model, tokenizer, prompts[0], cfg.n_candidates, settings, scorer.emotion, scorer.gibberish, cfg)
    sampler.sample(prompts[:2])

    load_before = os.getloadavg()[0]  # the CPU may be shared: a busy machine slows both paths unevenly
    passes = {"reference": [], "batched": []}
    for _ in range(repeats):  # alternated, so that a load from elsewhere falls on both; the fastest pass counts
        if not skip_reference:
            passes["reference"].append(timed(reference_pass))
        passes["batched"].append(timed(batched_pass))
    batched_seconds = min(passes["batched"])
    reference_seconds = min(passes["reference"]) if passes["reference"] else None
    return {
        "use_unsloth": str(cfg.use_unsloth), "prompts": len(prompts), "candidates": cfg.n_candidates,
        "max_new_tokens": cfg.generation.get("max_new_tokens"), "batch_prompts": batch_prompts,
        "shared_prefill": shared_prefill, "shared_prefill_next_token_logits_vs_whole_prompt": prefill_check,
        "reference_prompts": len(reference_set),
        "reference_prompts_per_s": len(reference_set) / reference_seconds if reference_seconds else None,
        "batched_prompts_per_s": len(prompts) / batched_seconds,
        "ratio": (len(prompts) / batched_seconds) / (len(reference_set) / reference_seconds) if reference_seconds else None,
        "batched_seconds_for_2048_prompts": 2048 * batched_seconds / len(prompts),
        "pass_seconds": {k: [round(t, 3) for t in v] for k, v in passes.items()},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(), "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "args/demo/generate_preferences_arg.json"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-prompts", type=int, default=64)
    parser.add_argument("--synthetic", choices=["7b", "small"], help="random-weight models of this shape")
    parser.add_argument("--world", help="folder for the synthetic world (reused if already built)")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes of each path, alternated; the fastest of each counts (for a shared machine)")
    parser.add_argument("--check-only", action="store_true", help="only the shared prefill's check, no timing")
    parser.add_argument("--skip-reference", action="store_true", help="time the batched pipeline alone")
    parser.add_argument("--reference-prompts", type=int,
                        help="time the reference loop on the first K prompts only (its rate is per prompt; on a GPU "
                             "64 prompts took 2 minutes)")
    parser.add_argument("--force-shared-prefill", action="store_true",
                        help="take the shared prefill with unsloth on CUDA too (held back there until checked)")
    args = parser.parse_args()

    overrides = ["wandb.mode=disabled"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            from synthetic import build_world

            world = build_world(Path(args.world or tmp), args.synthetic)
            overrides += [f"{k}={v}" for k, v in world.items()]
        overrides += args.set  # last, so that they win over the synthetic world's (e.g. use_unsloth=true)
        cfg = load_config(GenerateConfig, args.config, overrides)
        _, prompts = load_prompts(cfg)
        result = run(cfg, prompts, args.prompts, args.batch_prompts, args.repeats, args.check_only,
                     args.skip_reference, args.force_shared_prefill, args.reference_prompts)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
