"""Where the batched generation's time goes on this machine, and what two changes would save (CPU, demo world).

    python bench/profile_generation.py                    # stage times, best of 3, 64 prompts x 6 candidates
    python bench/profile_generation.py --cprofile 30      # plus cProfile's top 30 of one batched round

Stages of one batched round (`CandidateSampler.sample`): generate (`generate_candidates`), then the two
classifiers and the length rule (`Scorer.score`). Prototypes, here only, not in the project:
- shared prefill: the prompt is run once and its KV cache repeated for the N candidates (`generate`'s
  `num_return_sequences` repeats the prompt N times first, so the prefill does N times the work);
- classifiers without the pipeline: one tokenizer call and one softmax per batch instead of the
  text-classification pipeline's per-text preprocessing and postprocessing (same labels and scores);
- merged LoRA: the adapter folded into the full-precision base for inference (not for a 4-bit base).
"""

from __future__ import annotations

import argparse
import copy
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

from emotion_dpo.config import GenerateConfig, load_config  # noqa: E402
from emotion_dpo.generation import CandidateSampler, Scorer, generate_candidates  # noqa: E402
from emotion_dpo.models import load_generator  # noqa: E402
from emotion_dpo.prompts import load_prompts  # noqa: E402
from emotion_dpo.rewards import reply_length  # noqa: E402
from emotion_dpo.selection import score_reply  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from reference_loop import reference_round  # noqa: E402


def generate_shared_prefill(model, tokenizer, prompt_texts, n_candidates, generation_config):
    """Same result shape as generate_candidates; the prompts' prefill runs once, its cache repeated N times."""
    from transformers import DynamicCache

    batch = tokenizer(list(prompt_texts), return_tensors="pt", padding=True, add_special_tokens=False)
    batch = batch.to(model.device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    settings = copy.deepcopy(generation_config)
    settings.update(num_return_sequences=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    use_cache=True)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
              past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(n_candidates)
        output = model.generate(input_ids=ids.repeat_interleave(n_candidates, 0),
                                attention_mask=mask.repeat_interleave(n_candidates, 0), past_key_values=cache,
                                generation_config=settings)
    replies = [r.strip() for r in tokenizer.batch_decode(output[:, ids.shape[1]:], skip_special_tokens=True)]
    return [replies[i:i + n_candidates] for i in range(0, len(replies), n_candidates)]


def classify_direct(pipe, texts, batch_size):
    """What the text-classification pipeline returns, from one tokenizer call and one softmax per batch."""
    model, tokenizer, results = pipe.model, pipe.tokenizer, []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
            scores, labels = model(**encoded.to(model.device)).logits.float().softmax(-1).max(-1)
            results += [{"label": model.config.id2label[j], "score": s}
                        for j, s in zip(labels.tolist(), scores.tolist())]
    return results


def prototype_round(model, tokenizer, scorer, prompts, n, settings, cfg):
    """CandidateSampler.sample with both prototypes: shared prefill, classifiers without the pipeline."""
    replies = [r for group in generate_shared_prefill(model, tokenizer, [p.text for p in prompts], n, settings)
               for r in group]
    targets = [p.target_emotion for p in prompts for _ in range(n)]
    emotions = classify_direct(scorer.emotion, replies, cfg.classifier_batch_size)
    gibberish = classify_direct(scorer.gibberish, replies, cfg.classifier_batch_size)
    scored = [score_reply(t, e["label"], e["score"], g["label"], g["score"],
                          reply_length(t, cfg.length_unit, scorer.count_tokens), target, cfg)
              for t, e, g, target in zip(replies, emotions, gibberish, targets)]
    return [scored[i:i + n] for i in range(0, len(scored), n)]


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
    texts, n = [p.text for p in prompts], cfg.n_candidates
    model, tokenizer = load_generator(cfg)
    scorer = Scorer(cfg, tokenizer)
    from transformers import GenerationConfig

    settings = GenerationConfig(**cfg.generation)
    sampler = CandidateSampler(model, tokenizer, scorer, n, settings, len(prompts))
    sampler.sample(prompts[:2])  # warm-up
    replies = [r for group in generate_candidates(model, tokenizer, texts, n, settings) for r in group]
    targets = [p.target_emotion for p in prompts for _ in range(n)]

    # the shared prefill must give the same replies: greedy (one candidate), and sampling from the same seed
    greedy = copy.deepcopy(settings)
    greedy.update(do_sample=False, top_k=None, top_p=None, temperature=None)
    same_greedy = (generate_candidates(model, tokenizer, texts[:16], 1, greedy)
                   == generate_shared_prefill(model, tokenizer, texts[:16], 1, greedy))
    torch.manual_seed(0)
    plain = [r for g in generate_candidates(model, tokenizer, texts[:16], n, settings) for r in g]
    torch.manual_seed(0)
    shared = [r for g in generate_shared_prefill(model, tokenizer, texts[:16], n, settings) for r in g]
    same_sampled = sum(a == b for a, b in zip(plain, shared)) / len(plain)

    bs = cfg.classifier_batch_size
    piped, direct = scorer.emotion(replies, truncation=True), classify_direct(scorer.emotion, replies, bs)
    same_labels = all(a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(piped, direct))

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
        "prototype: round, shared prefill + classifiers without the pipeline": best_of(
            k, lambda: prototype_round(model, tokenizer, scorer, prompts, n, settings, cfg)),
        "generate_candidates": best_of(k, lambda: generate_candidates(model, tokenizer, texts, n, settings)),
        "emotion classifier, batched": best_of(k, lambda: scorer.emotion(replies, truncation=True)),
        "gibberish detector, batched": best_of(k, lambda: scorer.gibberish(replies, truncation=True)),
        "Scorer.score": best_of(k, lambda: scorer.score(replies, targets)),
        "prototype: generate, shared prefill": best_of(
            k, lambda: generate_shared_prefill(model, tokenizer, texts, n, settings)),
        "reference: generate, one prompt at a time": best_of(
            k, lambda: [generate_candidates(model, tokenizer, [t], n, settings) for t in texts]),
        "reference: classifiers, one text at a time": best_of(
            k, lambda: [(scorer.emotion(r), scorer.gibberish(r)) for r in replies]),
    }
    times["prototype: both classifiers without the pipeline"] = best_of(
        k, lambda: (classify_direct(scorer.emotion, replies, bs), classify_direct(scorer.gibberish, replies, bs)))
    merged = model.merge_and_unload()  # last: it changes the model
    times["prototype: generate, merged LoRA"] = best_of(
        k, lambda: generate_candidates(merged, tokenizer, texts, n, settings))
    times["prototype: generate, merged LoRA + shared prefill"] = best_of(
        k, lambda: generate_shared_prefill(merged, tokenizer, texts, n, settings))
    times["reference: generate, merged LoRA"] = best_of(
        k, lambda: [generate_candidates(merged, tokenizer, [t], n, settings) for t in texts])
    ref = times["reference: whole pass (bench/reference_loop.py)"]
    times["ratio: reference pass / round"] = ref / times["round (CandidateSampler.sample)"]
    times["ratio: reference pass / prototype round"] = ref / times[
        "prototype: round, shared prefill + classifiers without the pipeline"]
    print(json.dumps({"prompts": len(prompts), "candidates": n, "threads": torch.get_num_threads(),
                      "load_average": os.getloadavg(), "shared_prefill_same_greedy_replies": same_greedy,
                      "direct_classifier_same_labels": same_labels,
                      "shared_prefill_same_sampled_replies_fraction": same_sampled,
                      "seconds_best_of": k, **{key: round(v, 4) for key, v in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
