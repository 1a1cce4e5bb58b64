"""Prefix sharing's rules (emotion_dpo/dpo_prefix.py) on hand-made batches and a tiny random Llama (2 layers, width
16; no demo world): TRL's batch split into pairs, the packed row's ids, positions and mask written out by hand, the
compact layout, and the attention implementations the shared pass accepts (eager, sdpa: log-probs equal the plain
two-row pass) or refuses. tests/test_dpo_prefix.py checks the same pass against TRL's on the demo world's model."""

import contextlib

import pytest
import torch

from emotion_dpo.dpo_prefix import build_layout, compact_inputs, shared_forward, split_pairs, unsupported_reason

PAD = 0
# pair A: prompt 11 12 13, chosen 21 22, rejected 31; pair B: prompt 41 42, chosen 51, rejected 61 62
A = (torch.tensor([11, 12, 13]), torch.tensor([21, 22]), torch.tensor([31]))
B = (torch.tensor([41, 42]), torch.tensor([51]), torch.tensor([61, 62]))


def trl_batch(pairs, padding_side="right"):
    """TRL's collated batch: the chosen rows [prompt, chosen], then the rejected rows [prompt, rejected], padded."""
    sequences = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(reply) for p, reply in sequences)
    ids, attention, completion = [], [], []
    for prompt, reply in sequences:
        n = width - len(prompt) - len(reply)
        real = prompt.tolist() + reply.tolist()
        mark = [0] * len(prompt) + [1] * len(reply)

        def padded(values, filler):
            return [filler] * n + values if padding_side == "left" else values + [filler] * n

        ids.append(padded(real, PAD))
        attention.append(padded([1] * len(real), 0))
        completion.append(padded(mark, 0))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attention),
            "completion_mask": torch.tensor(completion)}


def as_lists(pairs):
    return [tuple(t.tolist() for t in pair) for pair in pairs]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_trls_batch_splits_into_its_pairs_whatever_the_padding(padding_side):
    pairs, why = split_pairs(trl_batch([A, B], padding_side))
    assert why is None
    assert as_lists(pairs) == [([11, 12, 13], [21, 22], [31]), ([41, 42], [51], [61, 62])]


def test_a_batch_of_an_odd_number_of_rows_is_not_trls_layout():
    batch = {k: v[:3] for k, v in trl_batch([A, B]).items()}
    assert split_pairs(batch) == ([], "the batch is not TRL's [chosen rows; rejected rows] layout")


def test_a_reply_token_inside_the_prompt_or_no_prompt_is_refused():
    batch = trl_batch([A, B])
    batch["completion_mask"][0, 0] = 1  # row 0: reply, prompt, prompt, reply, reply
    assert split_pairs(batch) == ([], "a sequence's reply does not follow its prompt")
    batch = trl_batch([A, B])
    batch["completion_mask"][1, :2] = 1  # row 1: no prompt token left
    assert split_pairs(batch) == ([], "a sequence's reply does not follow its prompt")


def test_chosen_and_rejected_rows_with_different_prompts_of_one_length_are_refused():
    batch = trl_batch([A, B])
    batch["input_ids"][2, 1] = 99  # pair A's rejected row: prompt 11 99 13
    pairs, why = split_pairs(batch)
    assert pairs == [] and why.startswith("a pair's chosen and rejected rows hold different prompts")


def test_one_pair_per_row_by_hand():
    layout = build_layout([A], PAD)
    # [prompt 11 12 13 | chosen 21 22 | rejected 31]; rejected's position restarts at the prompt's length 3
    assert layout.input_ids.tolist() == [[11, 12, 13, 21, 22, 31]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    # row: who attends, column: to whom. The prompt and chosen causally; rejected sees the prompt and itself only
    assert layout.mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1]]
    # compact (TRL's layout): the prompt's last token, then the reply; chosen rows, then rejected rows
    assert layout.compact_ids.tolist() == [[13, 21, 22], [13, 31, PAD]]
    assert layout.compact_mask.tolist() == [[0, 1, 1], [0, 1, 0]]
    # compact token t+1 is predicted at packed column: chosen 21 from 13 (column 2), 22 from 21 (column 3), filler;
    # rejected 31 from 13 (column 2), then filler
    assert layout.gather_row.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert layout.gather_col.tolist() == [[2, 3, 3], [2, 2, 2]]


def test_two_pairs_share_a_row_when_they_fit_the_budget_exactly():
    # A is 3 + 2 + 1 = 6 tokens, B 2 + 1 + 2 = 5: one row of 11 with a budget of 11, two rows with 10
    assert build_layout([A, B], PAD, pack_tokens=10).input_ids.shape == (2, 6)
    layout = build_layout([A, B], PAD, pack_tokens=11)
    assert layout.input_ids.tolist() == [[11, 12, 13, 21, 22, 31, 41, 42, 51, 61, 62]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3]]
    mask = layout.mask[0, 0].int()
    assert mask[6:, :6].sum() == 0  # B sees nothing of A
    assert mask[9].tolist() == [0] * 6 + [1, 1, 0, 1, 0]  # B's rejected 61: B's prompt and itself, not B's chosen
    # B's compact rows: chosen 51 from 42 (column 7); rejected 61 from 42 (column 7), 62 from 61 (column 9)
    assert layout.compact_ids.tolist() == [[13, 21, 22], [42, 51, PAD], [13, 31, PAD], [42, 61, 62]]
    assert layout.gather_col.tolist()[1] == [7, 7, 7] and layout.gather_col.tolist()[3] == [7, 9, 9]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_sits_on_the_side_asked_for_and_attends_to_itself_only(padding_side):
    layout = build_layout([A, B], PAD, padding_side)  # B's row: 5 tokens in a width of 6
    assert layout.input_ids[1].tolist() == ([41, 42, 51, 61, 62, PAD] if padding_side == "right"
                                            else [PAD, 41, 42, 51, 61, 62])
    pad = 5 if padding_side == "right" else 0
    assert layout.mask[1, 0, pad].int().tolist() == [int(column == pad) for column in range(6)]
    assert layout.mask[1, 0, :, pad].int().tolist() == [int(row == pad) for row in range(6)]
    first = 1 if padding_side == "left" else 0  # B's chosen 51 is predicted from B's prompt's last token 42
    assert layout.gather_col[1, 0] == first + 1 and layout.gather_row[1, 0] == 1


# ---------------------------------------------------------------- a tiny Llama: the attention paths

def tiny_llama(attention: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng():  # seeded weights; the other tests' random state left as it was
        torch.manual_seed(0)
        return LlamaForCausalLM._from_config(config, attn_implementation=attention)


def tiny_lora_llama(attention: str):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(attention)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        # init_lora_weights=False: B is random too, so the adapter is in the pass
        lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        return get_peft_model(base, lora).eval()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def tiny(request):
    return tiny_lora_llama(request.param)


def reply_log_probs_alone(model, prompt, reply) -> float:
    """The plain pass: [prompt, reply] alone through the model, the reply's tokens' log-probs summed."""
    ids = torch.cat([prompt, reply])[None]
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return float(sum(logp[len(prompt) - 1 + k, int(token)] for k, token in enumerate(reply)))


@pytest.mark.parametrize("padding_side,pack_tokens", [("right", 0), ("left", 0), ("right", 11)])
def test_the_shared_pass_gives_the_plain_passs_log_probs_under_eager_and_sdpa_attention(tiny, padding_side,
                                                                                        pack_tokens):
    assert unsupported_reason(tiny) is None
    batch = trl_batch([A, B])
    pairs, _ = split_pairs(batch)
    layout = build_layout(pairs, PAD, padding_side, pack_tokens)
    with shared_forward(tiny, layout, contextlib.nullcontext), torch.no_grad():
        compact = compact_inputs(batch, layout)
        logits = tiny(input_ids=compact["input_ids"]).logits
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, compact["input_ids"][:, 1:, None])[..., 0]
    got = (logp * compact["completion_mask"][:, 1:]).sum(1)
    expected = [reply_log_probs_alone(tiny, p, c) for p, c, _ in pairs] + [
        reply_log_probs_alone(tiny, p, r) for p, _, r in pairs]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_the_model_is_itself_again_after_the_shared_pass(tiny):
    layout = build_layout([A], PAD)
    with shared_forward(tiny, layout, contextlib.nullcontext):
        pass
    with torch.no_grad():
        assert tiny(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.shape == (1, 4, 100)


@pytest.mark.parametrize("attention", ["flash_attention_2", "flex_attention"])
def test_an_attention_implementation_that_takes_no_4d_mask_is_refused(attention):
    model = tiny_lora_llama("sdpa")
    model.base_model.model.config._attn_implementation = attention
    assert unsupported_reason(model) == (f"attention implementation {attention!r} takes no 4-D mask "
                                         "(supported: sdpa, eager)")


def test_a_model_that_is_no_lora_peftmodel_or_runs_unsloths_kernels_is_refused():
    from peft import IA3Config, get_peft_model

    assert unsupported_reason(tiny_llama("sdpa")) == "the model is not a LoRA PeftModel"
    ia3 = get_peft_model(tiny_llama("sdpa"), IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert unsupported_reason(ia3) == "the model is not a LoRA PeftModel"
    model = tiny_lora_llama("sdpa")
    model.unsloth_cuda_decode = True  # models.load_generator's mark: unsloth on a GPU
    assert unsupported_reason(model).startswith("unsloth's CUDA forward runs its own fast attention kernels")


@pytest.mark.parametrize("setting,refused", [("final_logit_softcapping", 30.0), ("logit_scale", 0.5)])
def test_a_model_that_caps_or_scales_its_logits_is_refused(setting, refused):
    model = tiny_lora_llama("sdpa")
    setattr(model.base_model.model.config, setting, 1.0 if setting == "logit_scale" else None)
    assert unsupported_reason(model) is None  # a scale of 1 and no cap change nothing
    setattr(model.base_model.model.config, setting, refused)
    assert unsupported_reason(model) == "the model scales or caps its logits after the LM head"
