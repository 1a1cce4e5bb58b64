"""The GPU work of preference generation: sample N replies for many prompts at once, score them in batches."""

from __future__ import annotations

import copy
import inspect
from typing import Sequence

from .config import GenerationSettings, generation_problems
from .errors import PipelineError
from .models import load_classifier
from .rewards import reply_length
from .selection import ScoredReply, score_reply


def checked_generation_config(settings: dict, source: str):
    """transformers.GenerationConfig from a config's `generation` section, checked as config.py checks it when the
    config loads (types and ranges `generate` would refuse only after the models load; a whole number for a float
    setting is read as a float: generate's TemperatureLogitsWarper refuses int 2)."""
    from pydantic import ValidationError
    from transformers import GenerationConfig

    try:
        typed = GenerationSettings.model_validate(settings).model_dump(exclude_unset=True)
    except ValidationError as error:
        raise PipelineError("\n".join(f"{source}: key generation.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                      for e in error.errors())) from None
    problems = generation_problems({**settings, **typed})
    if problems:
        raise PipelineError("\n".join(f"{source}: key generation.{key}: {text}" for key, text in problems))
    return GenerationConfig(**{**settings, **typed})


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def causal_lm_of(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def left_padded_positions(attention_mask):
    """The position ids `generate` gives a left-padded batch (padding at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def shares_prefill(model, generation_config, n_candidates: int, prompt_length: int) -> bool:
    """Whether the prompts' prefill can run once and its KV cache be repeated for the N candidates: sampling
    (greedy would give N copies of one reply), no beams (generate expands the inputs, not a given cache), no
    other cache or chunked prefill asked for, a model that takes position ids and is not unsloth's on CUDA (its
    forward hands back no plain cache), and something to share. Unset settings are read from the model's own
    generation config, as `generate` does."""
    causal_lm = causal_lm_of(model)
    defaults = getattr(causal_lm, "generation_config", None)

    def setting(name):
        value = getattr(generation_config, name, None)
        return getattr(defaults, name, None) if value is None else value

    return (n_candidates > 1 and prompt_length > 1 and not getattr(model, "unsloth_cuda_decode", False)
            and setting("do_sample") is True and (setting("num_beams") or 1) == 1
            and setting("cache_implementation") is None and setting("prefill_chunk_size") is None
            and "position_ids" in inspect.signature(causal_lm.forward).parameters)


def prefill_cache(model, input_ids, attention_mask, n_candidates: int):
    """The KV cache of all prompt tokens but the last (which `generate` feeds itself), computed once per prompt
    and repeated N times: `num_return_sequences` repeats each prompt N times *before* the prefill, so the prompt
    would be run N times to sample N short replies. Positions are those `generate` gives (left padding).
    None when the model's cache is not plain keys and values (linear-attention and hybrid layers hold states
    that repeating would not copy) or the model did not hand back a full cache: then the caller generates plainly."""
    from transformers import Cache, DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    causal_lm = causal_lm_of(model)
    if not causal_lm._supports_default_dynamic_cache():
        return None
    cache = DynamicCache(config=causal_lm.config)
    if not all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        return None
    positions = left_padded_positions(attention_mask)
    keep = {"logits_to_keep": 1} if causal_lm._supports_logits_to_keep() else {}  # no logits over the whole prompt
    output = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                   position_ids=positions[:, :-1], past_key_values=cache, use_cache=True, **keep)
    cache = output.past_key_values  # the one returned: patched forwards (unsloth) may build their own
    if not isinstance(cache, Cache) or cache.get_seq_length() != input_ids.shape[1] - 1:
        return None
    cache.batch_repeat_interleave(n_candidates)
    return cache


def generate_candidates(model, tokenizer, contexts: Sequence[Sequence[int]], n_candidates: int, generation_config):
    """n_candidates sampled replies for each prompt's context ids (template.context_ids), from one left-padded
    `generate` call: per prompt, a list of (text, token ids). The ids are what was generated up to, not
    including, the first EOS (DPO trains on exactly them); the text is their decoding, stripped.

    The rows are laid out as `num_return_sequences` lays them out (each prompt N times in a row), so the
    shared prefill draws the same random numbers as the plain call; the logits agree to rounding (the prefill's
    shapes differ), which on the CPU gave the very same replies from the same seed."""
    import torch

    batch = tokenizer.pad({"input_ids": [list(ids) for ids in contexts]}, padding=True, return_tensors="pt")
    batch = batch.to(model.device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    settings = copy.deepcopy(generation_config)
    settings.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    with torch.inference_mode():
        cache = prefill_cache(model, ids, mask, n_candidates) if shares_prefill(
            model, settings, n_candidates, ids.shape[1]) else None
        if cache is not None:
            settings.update(num_return_sequences=1)
            output = model.generate(input_ids=ids.repeat_interleave(n_candidates, 0),
                                    attention_mask=mask.repeat_interleave(n_candidates, 0),
                                    past_key_values=cache, generation_config=settings)
        else:
            settings.update(num_return_sequences=n_candidates)
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
    rows = output[:, ids.shape[1]:].tolist()
    generated = [until_eos(row, tokenizer.eos_token_id) for row in rows]
    replies = [Reply(text.strip(), kept, tokenizer.eos_token_id in row) for text, kept, row in
               zip(tokenizer.batch_decode(generated, skip_special_tokens=True), generated, rows)]
    return [replies[i:i + n_candidates] for i in range(0, len(replies), n_candidates)]


class Reply(tuple):
    """A generated reply as (text, token ids), unpacked as a pair; `ended_on_eos` says whether generation stopped on
    EOS (False: cut off at max_new_tokens)."""

    def __new__(cls, text: str, token_ids: list, ended_on_eos: bool):
        reply = super().__new__(cls, (text, token_ids))
        reply.ended_on_eos = ended_on_eos
        return reply

    def __getnewargs__(self):  # copy and pickle build it again from all three
        return (*self, self.ended_on_eos)


def until_eos(ids: list[int], eos_token_id: int) -> list[int]:
    """The generated ids before the first EOS (after it `generate` pads)."""
    return ids[:ids.index(eos_token_id)] if eos_token_id in ids else ids


def token_counter(tokenizer):
    """reply_length's count_tokens: a reply's tokens under the generator's tokenizer, no special tokens."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


class Scorer:
    """Both classifiers, called on whole batches of replies; the reward parts computed from their outputs."""

    def __init__(self, rewards, tokenizer):
        self.rewards = rewards
        self.tokenizer = tokenizer
        self.count_tokens = token_counter(tokenizer)
        self.batch_size = rewards.classifier_batch_size  # halved on out-of-memory
        self.emotion = load_classifier(rewards.emotion_classifier, rewards.classifier_batch_size,
                                       rewards.emotion_labels)
        self.gibberish = load_classifier(rewards.gibberish_detector, rewards.classifier_batch_size)

    def classify(self, classifier, texts: list[str]) -> list[dict]:
        """What the text-classification pipeline returns ({label, score} per text), from one tokenizer call and
        one softmax per batch: the pipeline tokenizes and post-processes text by text, a quarter of a CPU round.
        Out of memory on a batch halves the batch size and goes on."""
        import torch

        results, start = [], 0
        while start < len(texts):
            batch = texts[start:start + self.batch_size]
            try:
                results += self.classify_batch(classifier, batch)
                start += len(batch)
                continue
            except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
                if not is_out_of_memory(error):
                    raise
            # outside the except block: the live exception would keep the failed batch's tensors alive
            if self.batch_size == 1:
                raise PipelineError("out of GPU memory classifying a single reply; lower generation.max_new_tokens")
            torch.cuda.empty_cache()
            self.batch_size = max(1, self.batch_size // 2)
            print(f"out of memory: classifier_batch_size halved to {self.batch_size}")
        return results

    def classify_batch(self, classifier, texts: list[str]) -> list[dict]:
        import torch

        model, tokenizer = classifier.model, classifier.tokenizer
        with torch.inference_mode():
            batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(model.device)
            scores, labels = model(**batch).logits.float().softmax(-1).max(-1)
        return [{"label": model.config.id2label[i], "score": score} for i, score in zip(labels.tolist(), scores.tolist())]

    def score(self, replies: Sequence[tuple[str, list]], targets: Sequence[str]) -> list[ScoredReply]:
        """`replies` as generate_candidates gives them: (text, token ids)."""
        texts = [text for text, _ in replies]
        emotions = self.classify(self.emotion, texts)
        gibberish = self.classify(self.gibberish, texts)
        return [
            score_reply(reply[0], e["label"], float(e["score"]), g["label"], float(g["score"]),
                        reply_length(reply[0], self.rewards.length_unit, self.count_tokens), target, self.rewards,
                        reply[1], getattr(reply, "ended_on_eos", None))  # a plain pair: not recorded
            for reply, e, g, target in zip(replies, emotions, gibberish, targets)
        ]


class CandidateSampler:
    """generate + score for a batch of prompts; halves the batch on out-of-memory instead of dying (the scorer
    halves its own)."""

    def __init__(self, model, tokenizer, scorer: Scorer, n_candidates: int, generation_config, batch_prompts: int):
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        self.n_candidates = n_candidates
        self.generation_config = generation_config
        self.batch_prompts = batch_prompts

    def sample(self, prompts) -> list[list[ScoredReply]]:
        """One scored round for each prompt (the caller passes at most `batch_prompts` of them)."""
        import torch

        try:
            replies = generate_candidates(
                self.model, self.tokenizer, [p.ids for p in prompts], self.n_candidates, self.generation_config,
            )
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not is_out_of_memory(error):
                raise
            replies = None  # retried below, outside this block: the live exception would keep the cache alive
        if replies is None:
            if len(prompts) == 1:
                raise PipelineError(
                    f"out of GPU memory generating {self.n_candidates} replies for a single prompt; "
                    "lower n_candidates or generation.max_new_tokens"
                )
            torch.cuda.empty_cache()
            half = max(1, len(prompts) // 2)  # a local: the first half's own retries may halve self.batch_prompts again
            self.batch_prompts = min(self.batch_prompts, half)
            print(f"out of memory: batch_prompts halved to {self.batch_prompts}")
            return self.sample(prompts[:half]) + self.sample(prompts[half:])
        flat = [reply for group in replies for reply in group]
        targets = [p.target_emotion for p in prompts for _ in range(self.n_candidates)]
        scored = self.scorer.score(flat, targets)
        return [scored[i:i + self.n_candidates] for i in range(0, len(scored), self.n_candidates)]
