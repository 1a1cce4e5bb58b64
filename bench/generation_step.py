"""Generation, the next step: where a batched round's decode time goes, and candidates that cut per-step
overhead, each checked against the plain path for the replies it samples from the same seed.

    python bench/generation_step.py                                       # demo world, CPU
    python bench/generation_step.py --set load_in_4bit=true               # demo world, 4-bit base (CPU too)
    python bench/generation_step.py --synthetic 7b --world /tmp/synth-7b --config args/generate_preferences_arg.json

Paths, each one round of --prompts prompts x n_candidates replies (one `generate_candidates` call), timed
alternately --repeats times (fastest counts), each run from the same seed:
- plain: `generate_candidates` as the pipeline runs it (shared prefill, dynamic cache);
- static-cache: `cache_implementation: "static"`, compilation off (the shared prefill does not apply);
- static-cache-compiled: the same with transformers' automatic `torch.compile` of the decode step (on the CPU
  forced through `CompileConfig`; its first call, which compiles, is timed apart);
- merged-dequantized: generation from a copy of the model whose LoRA is merged into the base weights
  (a 4-bit base dequantized first, exactly the values its matmuls use), in the compute dtype;
- merged-static-compiled: that copy with the static cache and compiled decoding (transformers compiles nothing
  on a bitsandbytes 4-bit model, so static-cache-compiled says whether it compiled: "compiles").
For each: seconds, the fraction of replies equal to the plain path's, and for the merged copy the largest
next-token logit difference over the largest logit. Also: the decode profile (prefill + 1 token vs the whole
round, so the per-step decode time) and the logits processors `generate` builds from the config, per step,
against one function doing the same arithmetic in the same order (`fused_processors`).
"""

from __future__ import annotations

import argparse
import copy
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

from emotion_dpo.config import GenerateConfig, load_config  # noqa: E402
from emotion_dpo.generation import generate_candidates  # noqa: E402
from emotion_dpo.models import load_generator  # noqa: E402
from emotion_dpo.prompts import load_prompts  # noqa: E402


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    synchronize()
    started = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - started, result


def merged_dequantized_copy(peft_model):
    """A plain transformers model holding the SFT model's weights with the LoRA merged: each LoRA layer's base
    weight (a 4-bit one dequantized with bitsandbytes' own function, i.e. the values its matmul uses) plus the
    adapter's delta, summed in fp32 and stored in the compute dtype; the adapter's embedding / LM-head copies
    (modules_to_save) as they are. Memory: a full-precision copy of the model."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    causal = peft_model.get_base_model()
    dtype = causal.get_input_embeddings().weight.dtype  # the compute dtype (bf16 on a GPU, fp32 on the CPU)
    adapter = peft_model.active_adapter
    state = {}
    for name, module in causal.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = base.weight
            if type(weight).__name__ == "Params4bit":
                import bitsandbytes.functional as bnb_functional

                weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
            state[f"{name}.weight"] = (weight.float() + module.get_delta_weight(adapter).float()).to(dtype)
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.to(dtype)
        elif isinstance(module, ModulesToSaveWrapper):
            for key, value in module.modules_to_save[adapter].state_dict().items():
                state[f"{name}.{key}"] = value.to(dtype)
    for key, value in causal.state_dict().items():
        if not any(part in key for part in ("lora_", "base_layer", "original_module", "modules_to_save")):
            state.setdefault(key, value.to(dtype) if value.is_floating_point() else value)  # norms
    config = copy.deepcopy(causal.config)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # on the model's device, not "meta": non-persistent buffers (rotary frequencies) are built here
        with torch.device(causal.device):
            merged = type(causal)(config)
    finally:
        torch.set_default_dtype(default_dtype)
    missing, unexpected = merged.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"merged copy: missing {missing[:3]}, unexpected {unexpected[:3]}")
    merged.generation_config = copy.deepcopy(causal.generation_config)
    return merged.eval()


def fused_processors(input_ids, scores, prompt_length, settings, eos_token_id):
    """What RepetitionPenalty, MinNewTokensLength, Temperature and TopK do to the scores, in generate's order,
    as one function (fewer Python-side objects and calls per step)."""
    if settings.repetition_penalty not in (None, 1.0):
        picked = torch.gather(scores, 1, input_ids)
        picked = torch.where(picked < 0, picked * settings.repetition_penalty, picked / settings.repetition_penalty)
        scores = scores.scatter(1, input_ids, picked)
    if settings.min_new_tokens and input_ids.shape[1] - prompt_length < settings.min_new_tokens:
        scores = scores.clone()
        scores[:, eos_token_id] = -float("inf")
    if settings.temperature not in (None, 1.0):
        scores = scores / settings.temperature
    if settings.top_k:
        kth = torch.topk(scores, min(settings.top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    return scores


def processors_profile(model, tokenizer, settings, rows: int, prompt_length: int, steps: int = 20) -> dict:
    """Per decode step: generate's own processor list vs fused_processors on logits of the round's shape."""
    from transformers import LogitsProcessorList
    from transformers.generation import (MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                         TemperatureLogitsWarper, TopKLogitsWarper)

    eos = tokenizer.eos_token_id
    listed = LogitsProcessorList()
    if settings.repetition_penalty not in (None, 1.0):
        listed.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.min_new_tokens:
        listed.append(MinNewTokensLengthLogitsProcessor(prompt_length, settings.min_new_tokens, eos,
                                                        device=model.device))
    if settings.temperature not in (None, 1.0):
        listed.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        listed.append(TopKLogitsWarper(settings.top_k))
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator(device=model.device).manual_seed(0)
    ids = torch.randint(0, vocab, (rows, prompt_length + 2), device=model.device, generator=generator)
    logits = torch.randn(rows, vocab, device=model.device, generator=generator)
    same = torch.equal(listed(ids, logits.clone()), fused_processors(ids, logits.clone(), prompt_length, settings, eos))
    listed_s, _ = timed(lambda: [listed(ids, logits.clone()) for _ in range(steps)])
    fused_s, _ = timed(lambda: [fused_processors(ids, logits.clone(), prompt_length, settings, eos)
                                for _ in range(steps)])
    return {"processors": [type(p).__name__ for p in listed], "rows": rows, "vocab": vocab,
            "listed_ms_per_step": 1000 * listed_s / steps, "fused_ms_per_step": 1000 * fused_s / steps,
            "fused_equals_listed": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "args/demo/generate_preferences_arg.json"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic", choices=["7b", "small"])
    parser.add_argument("--world")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--paths", default="plain,static-cache,static-cache-compiled,merged-dequantized,"
                                           "merged-static-compiled")
    args = parser.parse_args()
    from transformers import GenerationConfig, set_seed

    overrides = ["wandb.mode=disabled"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            from synthetic import build_world

            overrides += [f"{k}={v}" for k, v in build_world(Path(args.world or tmp), args.synthetic).items()]
        cfg = load_config(GenerateConfig, args.config, overrides + args.set)
        _, prompts = load_prompts(cfg)
    contexts = [p.ids for p in prompts[:args.prompts]]  # what the pipeline conditions on (template.context_ids)
    n = cfg.n_candidates
    model, tokenizer = load_generator(cfg)
    settings = GenerationConfig(**cfg.generation)
    print(json.dumps({"step": "loaded", "device": str(model.device), "four_bit": cfg.load_in_4bit,
                      "prompts": len(contexts), "candidates": n}), flush=True)

    def static(compiled: bool):
        from transformers import CompileConfig

        s = copy.deepcopy(settings)
        s.cache_implementation = "static"
        s.disable_compile = not compiled
        if compiled:
            s.compile_config = CompileConfig(fullgraph=False, dynamic=False)
            s.compile_config._compile_all_devices = True  # on the CPU too
        return s

    merged = None
    runners = {"plain": lambda: generate_candidates(model, tokenizer, contexts, n, settings),
               "static-cache": lambda: generate_candidates(model, tokenizer, contexts, n, static(False)),
               "static-cache-compiled": lambda: generate_candidates(model, tokenizer, contexts, n, static(True))}
    paths = args.paths.split(",")
    results = {}
    # transformers compiles the decode step only where the quantizer allows it (bitsandbytes 4-bit does not:
    # then "compiled" runs uncompiled, and says so); the merged copy has no quantizer
    from emotion_dpo.generation import causal_lm_of

    quantizer = getattr(causal_lm_of(model), "hf_quantizer", None)
    results["static-cache-compiled"] = {"compiles": quantizer is None or bool(quantizer.is_compileable)}
    if any(p.startswith("merged") for p in paths):
        seconds, merged = timed(lambda: merged_dequantized_copy(model))
        batch = tokenizer.pad({"input_ids": contexts[:8]}, padding=True, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            a = model(**batch).logits[:, -1].float()
            b = merged(**batch).logits[:, -1].float()
        results["merged-static-compiled"] = {"compiles": True}
        results["merged-dequantized"] = {
            "build_s": seconds, "max_abs_logit_diff_over_max_abs_logit": float((a - b).abs().max() / a.abs().max()),
            "same_top_token": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
        runners["merged-dequantized"] = lambda: generate_candidates(merged, tokenizer, contexts, n, settings)
        runners["merged-static-compiled"] = lambda: generate_candidates(merged, tokenizer, contexts, n, static(True))
        print(json.dumps({"step": "merged copy", **results["merged-dequantized"]}), flush=True)

    def seeded(name):
        set_seed(cfg.seed)
        return timed(runners[name])

    replies, best = {}, {}
    for name in paths:  # first call of each: warm-up (compilation for the compiled path), and its replies
        try:
            seconds, replies[name] = seeded(name)
            results.setdefault(name, {})["first_call_s"] = seconds
        except Exception as error:  # noqa: BLE001  a dead end is a result too
            results.setdefault(name, {})["error"] = repr(error)[:400]
        print(json.dumps({"step": "first call", "path": name, **results[name]}), flush=True)
    live = [name for name in paths if name in replies]
    for _ in range(args.repeats):
        for name in live:
            best[name] = min(best.get(name, float("inf")), seeded(name)[0])
    plain = [r for group in replies.get("plain", []) for r in group]
    for name in live:
        mine = [r for group in replies[name] for r in group]
        results[name].update(seconds=best[name], ratio_to_plain=best[name] / best["plain"] if "plain" in best else None,
                             same_replies_as_plain=(sum(a == b for a, b in zip(plain, mine)) / len(plain)
                                                    if plain else None))
        print(json.dumps({"step": "path", "path": name, **results[name]}), flush=True)

    # the decode profile: prefill + one token vs the whole round
    one = copy.deepcopy(settings)
    one.update(max_new_tokens=1, min_new_tokens=None)
    first_token = min(timed(lambda: generate_candidates(model, tokenizer, contexts, n, one))[0]
                      for _ in range(args.repeats))
    new_tokens = settings.max_new_tokens
    prompt_length = max(len(ids) for ids in contexts)
    profile = {"round_s": best.get("plain"), "prefill_and_first_token_s": first_token,
               "per_decode_step_ms": 1000 * (best["plain"] - first_token) / (new_tokens - 1) if "plain" in best else None,
               "padded_prompt_tokens": prompt_length,
               **processors_profile(model, tokenizer, settings, len(contexts) * n, prompt_length)}
    print(json.dumps({"step": "decode profile", **profile}), flush=True)
    print(json.dumps({"paths": results, "decode_profile": profile, "device": torch.cuda.get_device_name()
                      if torch.cuda.is_available() else "cpu", "four_bit": cfg.load_in_4bit,
                      "threads": torch.get_num_threads(), "load_average_1m": os.getloadavg()[0],
                      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))


if __name__ == "__main__":
    main()
