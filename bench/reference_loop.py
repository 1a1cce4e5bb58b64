"""A faithful re-implementation of the reference project's generation loop, for benchmarks only.

One prompt at a time: its N candidates in one `generate` call, each classifier called on one text at a
time, then the chosen reply classified again for the filters (the reference re-ran both classifiers).
"""

from __future__ import annotations

import copy

import torch

from emotion_dpo.rewards import reply_length
from emotion_dpo.selection import pick_pair, round_failure, score_reply


def reference_round(model, tokenizer, prompt, n_candidates, generation_config, emotion_pipe, gibberish_pipe, cfg):
    settings = copy.deepcopy(generation_config)
    settings.update(num_return_sequences=n_candidates, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    inputs = tokenizer.pad({"input_ids": [prompt.ids]}, return_tensors="pt").to(model.device)  # the context ids
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=settings)
    replies = [r.strip() for r in tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                                         skip_special_tokens=True)]
    scored = []
    for reply in replies:
        emotion = emotion_pipe(reply)[0]
        gibberish = gibberish_pipe(reply)[0]
        scored.append(score_reply(reply, emotion["label"], emotion["score"], gibberish["label"], gibberish["score"],
                                  reply_length(reply, cfg.length_unit, lambda t: len(tokenizer(t)["input_ids"])),
                                  prompt.target_emotion, cfg))
    chosen_at, _ = pick_pair(scored)
    emotion_pipe(replies[chosen_at])  # the reference classified the chosen reply again for its filters
    gibberish_pipe(replies[chosen_at])
    return round_failure(scored, prompt.target_emotion, cfg)
