"""How each candidate ended: generation stopped on EOS, or was cut off at max_new_tokens. Recorded per candidate in
the journal (older journals without it still read), counted for chosen and rejected in the statistics."""

import json
from pathlib import Path

import pytest

from emotion_dpo.journal import record_problem
from emotion_dpo.stats import format_summary, summarize

ROOT = Path(__file__).resolve().parents[1]


def reply(total, ended=None):
    out = {"text": "a reply .", "emotion_label": "happiness", "emotion_confidence": 0.9, "gibberish_label": "clean",
           "gibberish_confidence": 0.9, "length": 9.0, "emotion_reward": 9.0, "length_reward": 0.0,
           "gibberish_reward": 9.0, "total": total, "token_ids": [5, 6]}
    return out if ended is None else {**out, "ended_on_eos": ended}


def record(index, replies, chosen_at=0, rejected_at=1):
    return {"index": index, "dialogue": index, "prompt": "<s>[INST] hi [/INST]", "target_emotion": "happiness",
            "status": "accepted", "reason": None, "chosen_at": chosen_at, "rejected_at": rejected_at,
            "rounds": [replies]}


def test_the_cut_off_shares_of_chosen_and_rejected_on_a_hand_made_journal():
    journal = [
        record(0, [reply(20, True), reply(5, False)]),   # chosen ended, rejected cut off
        record(1, [reply(20, True), reply(5, True)]),    # both ended
        record(2, [reply(3, False), reply(20, False)], chosen_at=1, rejected_at=0),  # both cut off
        record(3, [reply(20, False), reply(5, False)]),  # both cut off
        record(4, [reply(20), reply(5)]),                # an older journal's line: not recorded, not counted
    ]
    cut = summarize(journal)["cut_off"]
    # by hand: chosen cut off in prompts 2, 3 of 4 counted; rejected in 0, 2, 3
    assert cut == {"pairs": 4, "chosen": 0.5, "rejected": 0.75}
    assert "cut off at max_new_tokens: chosen 50.0 %  rejected 75.0 %  (of 4 pairs)" in format_summary(summarize(journal))


def test_a_journal_without_the_field_still_reads_and_a_wrong_value_is_named():
    assert record_problem(record(0, [reply(20), reply(5)])) is None  # written before the field existed
    assert record_problem(record(0, [reply(20, True), reply(5, False)])) is None
    problem = record_problem(record(0, [reply(20, "yes"), reply(5, False)]))
    assert problem is not None and "ended_on_eos" in problem
    assert summarize([record(0, [reply(20), reply(5)])])["cut_off"] == {"pairs": 0, "chosen": None, "rejected": None}


@pytest.mark.parametrize("max_new_tokens", [3, 40])
def test_each_candidate_records_whether_generation_stopped_on_eos(demo_world, max_new_tokens):
    """On the demo SFT model: a candidate ended on EOS exactly when generation stopped before max_new_tokens (its ids
    are those before the EOS); the scored reply, as the journal stores it, carries the same."""
    import torch
    from transformers import GenerationConfig

    from emotion_dpo.config import GenerateConfig, load_config
    from emotion_dpo.generation import Scorer, generate_candidates
    from emotion_dpo.models import load_generator
    from emotion_dpo.prompts import load_prompts

    w = demo_world
    cfg = load_config(GenerateConfig, ROOT / "args/demo/generate_preferences_arg.json", [
        f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dataset={w / 'dialogues'}",
        f"emotion_classifier={w / 'emotion_classifier'}", f"gibberish_detector={w / 'gibberish_detector'}",
        f"chat_template={ROOT / 'args/chat_template.json'}", "num_prompts=4", "wandb.mode=disabled"])
    _, prompts = load_prompts(cfg)
    model, tokenizer = load_generator(cfg)
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens)
    torch.manual_seed(0)
    groups = generate_candidates(model, tokenizer, [p.ids for p in prompts], 4, settings)
    replies = [r for group in groups for r in group]
    for text, ids in replies:  # still unpacked as (text, token ids)
        assert isinstance(text, str) and tokenizer.eos_token_id not in ids
    assert [r.ended_on_eos for r in replies] == [len(ids) < max_new_tokens for _, ids in replies]
    if max_new_tokens == 3:
        assert not all(r.ended_on_eos for r in replies)  # the demo replies are longer than 3 tokens
    else:
        assert any(r.ended_on_eos for r in replies)
    scored = Scorer(cfg, tokenizer).score(replies, [p.target_emotion for p in prompts for _ in range(4)])
    stored = [json.loads(json.dumps(s.to_dict())) for s in scored]
    assert [s["ended_on_eos"] for s in stored] == [r.ended_on_eos for r in replies]


def test_dpo_trains_on_a_reply_as_sampled_the_eos_only_where_generation_stopped_on_it():
    from emotion_dpo.dataset import preference_row

    line = {**record(0, [{**reply(20, True), "token_ids": [7, 8]}, {**reply(5, False), "token_ids": [9, 10, 11]}]),
            "prompt_ids": [1, 4], "eos_token_id": 2}
    row = preference_row(line)
    assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == ([1, 4], [7, 8, 2], [9, 10, 11])
    older = {**record(0, [{**reply(20), "token_ids": [7, 8]}, {**reply(5), "token_ids": [9]}]),
             "prompt_ids": [1, 4], "eos_token_id": 2}
    assert (preference_row(older)["chosen_ids"], preference_row(older)["rejected_ids"]) == ([7, 8, 2], [9, 2])
