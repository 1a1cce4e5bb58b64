"""Where the batched generation's time goes on this machine (CPU, demo world), stage by stage.

    python bench/profile_generation.py                    # stage times, best of 3, 64 prompts x 6 candidates
    python bench/profile_generation.py --cprofile 30      # plus cProfile's top 30 of one batched round

Stages of one batched round (`CandidateSampler.sample`): generate (`generate_candidates`, the prompts' prefill
shared by their N candidates), then the two classifiers and the length rule (`Scorer.score`). For comparison:
the same `generate` without the shared prefill (`num_return_sequences` runs each prompt N times), the
classifiers through the text-classification pipeline, and a merged LoRA (the adapter folded into the
full-precision base; not possible on a 4-bit base).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emotion_dpo import generation  # noqa: E402
from emotion_dpo.config import GenerateConfig, load_config  # noqa: E402
from emotion_dpo.generation import CandidateSampler, Scorer, generate_candidates  # noqa: E402
from emotion_dpo.models import load_generator  # noqa: E402
from emotion_dpo.prompts import load_prompts  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from reference_loop import reference_round  # noqa: E402


def generate_plain(model, tokenizer, contexts, n, settings):
    """generate_candidates without the shared prefill."""
    shared = generation.prefill_cache
    generation.prefill_cache = lambda *args: None
    try:
        return generate_candidates(model, tokenizer, contexts, n, settings)
    finally:
        generation.prefill_cache = shared


def best_of(k, fn):
    best = float("inf")
    for _ in range(k):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "args/demo/generate_preferences_arg.json"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cprofile", type=int, default=0, help="print cProfile's top K functions of one round")
    args = parser.parse_args()

    cfg = load_config(GenerateConfig, args.config, ["wandb.mode=disabled"])
    _, prompts = load_prompts(cfg)
    prompts = prompts[:args.prompts]
    contexts, n = [p.ids for p in prompts], cfg.n_candidates
    model, tokenizer = load_generator(cfg)
    scorer = Scorer(cfg, tokenizer)
    from transformers import GenerationConfig

    settings = GenerationConfig(**cfg.generation)
    sampler = CandidateSampler(model, tokenizer, scorer, n, settings, len(prompts))
    sampler.sample(prompts[:2])  # warm-up
    generated = [r for group in generate_candidates(model, tokenizer, contexts, n, settings) for r in group]
    replies = [text for text, _ in generated]
    targets = [p.target_emotion for p in prompts for _ in range(n)]

    k = args.repeats
    if args.cprofile:
        profiler = cProfile.Profile()
        profiler.runcall(sampler.sample, prompts)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    times = {
        "reference: whole pass (bench/reference_loop.py)": best_of(
            k, lambda: [reference_round(model, tokenizer, p, n, settings, scorer.emotion, scorer.gibberish, cfg)
                        for p in prompts]),
        "round (CandidateSampler.sample)": best_of(k, lambda: sampler.sample(prompts)),
        "generate_candidates (shared prefill)": best_of(
            k, lambda: generate_candidates(model, tokenizer, contexts, n, settings)),
        "generate, no shared prefill": best_of(k, lambda: generate_plain(model, tokenizer, contexts, n, settings)),
        "Scorer.score": best_of(k, lambda: scorer.score(generated, targets)),
        "both classifiers, Scorer.classify": best_of(
            k, lambda: (scorer.classify(scorer.emotion, replies), scorer.classify(scorer.gibberish, replies))),
        "both classifiers, through the pipeline": best_of(
            k, lambda: (scorer.emotion(replies, truncation=True), scorer.gibberish(replies, truncation=True))),
        "reference: generate, one prompt at a time": best_of(
            k, lambda: [generate_plain(model, tokenizer, [c], n, settings) for c in contexts]),
        "reference: classifiers, one text at a time": best_of(
            k, lambda: [(scorer.emotion(r), scorer.gibberish(r)) for r in replies]),
    }
    merged = model.merge_and_unload()  # last: it changes the model
    times["generate_candidates, merged LoRA"] = best_of(
        k, lambda: generate_candidates(merged, tokenizer, contexts, n, settings))
    times["reference: generate, merged LoRA"] = best_of(
        k, lambda: [generate_plain(merged, tokenizer, [c], n, settings) for c in contexts])
    times["ratio: reference pass / round"] = (times["reference: whole pass (bench/reference_loop.py)"]
                                              / times["round (CandidateSampler.sample)"])
    print(json.dumps({"prompts": len(prompts), "candidates": n, "threads": torch.get_num_threads(),
                      "load_average": os.getloadavg(), "seconds_best_of": k,
                      **{key: round(v, 4) for key, v in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
