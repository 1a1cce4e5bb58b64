"""DPO's forward pass with the prompt computed once per pair (prefix sharing, arXiv 2410.20305).

TRL's DPOTrainer runs `[prompt, chosen]` and `[prompt, rejected]` as two rows, so the prompt (here about six times
as long as a reply) passes through the model twice for the policy and twice for the reference. Here one row holds
`[prompt, chosen, rejected]`: a 4-D attention mask lets chosen see the prompt and itself and rejected see the prompt
and itself, never chosen; rejected's position ids restart at the prompt's length; each reply's first token is
scored from the prompt's last position. Optionally several such pairs share one row up to a token budget (packing).

TRL's loss, metrics and config stay TRL's: the trainer hands TRL's `_compute_loss` a *compact* batch in TRL's own
layout — per sequence the prompt's last token followed by the reply, `completion_mask` on the reply — and the model
call returns the logits at exactly those positions from the shared pass. Every quantity TRL computes reads the
logits only where `completion_mask` is set, so its log-probs, rewards, entropy and token accuracy are the ones the
two-row pass gives; the LM head runs on the reply positions only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1
SUPPORTED_ATTENTION = ("sdpa", "eager")  # the implementations that take a 4-D mask as it is


@dataclass
class SharedLayout:
    """Where each of TRL's 2B sequences lives in the packed rows.

    input_ids, position_ids: [rows, T]; mask: [rows, 1, T, T] bool (True: may attend); gather_row, gather_col:
    [2B, W] the packed position whose hidden state predicts compact token t+1 (TRL's order: chosen rows, then
    rejected rows); compact_ids, compact_mask: [2B, W] TRL's layout of the same sequences, shortened to the
    prompt's last token + the reply."""

    input_ids: object
    position_ids: object
    mask: object
    gather_row: object
    gather_col: object
    compact_ids: object
    compact_mask: object


def split_pairs(inputs) -> tuple[list, str | None]:
    """TRL's collated batch (chosen rows, then rejected rows) -> [(prompt, chosen, rejected)] id tensors per pair, or
    ([], why not). Any padding side: the real tokens are those under attention_mask, the reply those under
    completion_mask."""
    input_ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    if input_ids.dim() != 2 or input_ids.shape[0] % 2:
        return [], "the batch is not TRL's [chosen rows; rejected rows] layout"
    pairs_n = input_ids.shape[0] // 2
    sequences = []
    for row in range(input_ids.shape[0]):
        real = attention[row].bool()
        ids, reply = input_ids[row][real], completion[row][real].bool()
        prompt_len = int((~reply).sum())
        if prompt_len == 0 or bool(reply[:prompt_len].any()):
            return [], "a sequence's reply does not follow its prompt"
        sequences.append((ids[:prompt_len], ids[prompt_len:]))
    pairs = []
    for i in range(pairs_n):
        (prompt, chosen), (prompt_r, rejected) = sequences[i], sequences[pairs_n + i]
        if prompt.shape != prompt_r.shape or not bool((prompt == prompt_r).all()):
            return [], "a pair's chosen and rejected rows hold different prompts (truncated into the prompt?)"
        pairs.append((prompt, chosen, rejected))
    return pairs, None


def build_layout(pairs, pad_token_id: int, padding_side: str = "right", pack_tokens: int = 0,
                 block_rejected_from_chosen: bool = True) -> SharedLayout:
    """The packed rows for `pairs` [(prompt, chosen, rejected)]: one pair per row, or with pack_tokens > 0 as many
    consecutive pairs per row as fit in that many tokens (a longer pair gets a row of its own).

    block_rejected_from_chosen is the rule itself; it is a parameter only so the tests can break it on purpose."""
    import torch

    lengths = [len(p) + len(c) + len(r) for p, c, r in pairs]
    rows: list[list[int]] = []  # pair indices per row
    for i, length in enumerate(lengths):
        if rows and pack_tokens and sum(lengths[j] for j in rows[-1]) + length <= pack_tokens:
            rows[-1].append(i)
        else:
            rows.append([i])
    width = max(sum(lengths[j] for j in row) for row in rows)
    device = pairs[0][0].device
    n_rows = len(rows)
    ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long, device=device)
    positions = torch.zeros((n_rows, width), dtype=torch.long, device=device)
    segment = torch.full((n_rows, width), -1, dtype=torch.long, device=device)
    part = torch.full((n_rows, width), PADDING, dtype=torch.long, device=device)
    starts = {}  # pair -> (row, column of its first prompt token)
    for r, row in enumerate(rows):
        column = width - sum(lengths[j] for j in row) if padding_side == "left" else 0
        for i in row:
            prompt, chosen, rejected = pairs[i]
            p, c, q = len(prompt), len(chosen), len(rejected)
            span = slice(column, column + p + c + q)
            ids[r, span] = torch.cat([prompt, chosen, rejected])
            positions[r, span] = torch.cat([torch.arange(p + c), torch.arange(p, p + q)]).to(device)
            segment[r, span] = i
            part[r, span] = torch.tensor([PROMPT] * p + [CHOSEN] * c + [REJECTED] * q, device=device)
            starts[i] = (r, column)
            column += p + c + q

    # may attend: same pair, not later, and never rejected -> chosen; padding attends to itself only (an all-masked
    # row would give NaN, and NaN times a zero gradient is still NaN in the weights' gradient)
    index = torch.arange(width, device=device)
    causal = index[None, :, None] >= index[None, None, :]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    mask = same & causal
    if block_rejected_from_chosen:
        mask &= ~((part[:, :, None] == REJECTED) & (part[:, None, :] == CHOSEN))
    mask |= (segment[:, :, None] < 0) & torch.eye(width, dtype=torch.bool, device=device)[None]

    # compact TRL layout: per sequence [prompt's last token, reply...]; hidden state t predicts compact token t+1
    n_pairs = len(pairs)
    compact_width = 1 + max(max(len(c), len(r)) for _, c, r in pairs)
    compact_ids = torch.full((2 * n_pairs, compact_width), pad_token_id, dtype=torch.long, device=device)
    compact_mask = torch.zeros((2 * n_pairs, compact_width), dtype=torch.long, device=device)
    gather_row = torch.zeros((2 * n_pairs, compact_width), dtype=torch.long, device=device)
    gather_col = torch.zeros((2 * n_pairs, compact_width), dtype=torch.long, device=device)
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        r, start = starts[i]
        p = len(prompt)
        for sequence, reply, first in ((i, chosen, start + p), (n_pairs + i, rejected, start + p + len(chosen))):
            n = len(reply)
            compact_ids[sequence, 0] = prompt[-1]
            compact_ids[sequence, 1:1 + n] = reply
            compact_mask[sequence, 1:1 + n] = 1
            gather_row[sequence] = r
            # prompt's last position, then the reply's own positions but its last (which predicts nothing scored)
            columns = [start + p - 1] + list(range(first, first + n - 1))
            gather_col[sequence, :len(columns)] = torch.tensor(columns, device=device)
            gather_col[sequence, len(columns):] = columns[-1]  # unscored filler
    return SharedLayout(ids, positions, mask[:, None], gather_row, gather_col, compact_ids, compact_mask)


def unsupported_reason(model) -> str | None:
    """Why the shared pass cannot run on this model (then the trainer takes TRL's plain path), or None."""
    from peft import PeftModel

    if not isinstance(model, PeftModel) or model.peft_type != "LORA":
        return "the model is not a LoRA PeftModel"
    inner = model.base_model.model
    if getattr(model, "unsloth_cuda_decode", False):  # models.load_generator: unsloth on a GPU
        return ("unsloth's CUDA forward runs its own fast attention kernels, which build their own causal mask and "
                "take no 4-D one")
    implementation = getattr(inner.config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        return f"attention implementation {implementation!r} takes no 4-D mask (supported: {', '.join(SUPPORTED_ATTENTION)})"
    text_config = inner.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) or getattr(text_config, "logit_scale", None) not in (None, 1, 1.0):
        return "the model scales or caps its logits after the LM head"
    return None


def shared_logits(model, layout: SharedLayout, autocast):
    """The logits at the compact layout's positions from one pass over the packed rows (the active adapter)."""
    import torch

    inner = model.base_model.model
    backbone = inner.model
    mask = layout.mask
    if getattr(inner.config, "_attn_implementation", "eager") == "eager":  # eager adds the mask to the scores
        dtype = backbone.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    with autocast():
        hidden = backbone(input_ids=layout.input_ids, attention_mask=mask, position_ids=layout.position_ids,
                          use_cache=False).last_hidden_state
        selected = hidden[layout.gather_row, layout.gather_col]
        return inner.get_output_embeddings()(selected)


@contextlib.contextmanager
def shared_forward(model, layout: SharedLayout, autocast):
    """While inside, a call of `model` (the PeftModel; through DDP too) returns the shared pass's compact logits,
    whatever inputs it is given: TRL's `_compute_loss` calls it with the compact batch for the policy and the
    reference alike (the reference under TRL's own `use_adapter('ref')`)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(*args, **kwargs):
        return CausalLMOutputWithPast(logits=shared_logits(model, layout, autocast))

    previous = model.__dict__.get("forward")  # accelerate's autocast wrapper, if it set one
    model.forward = forward  # an instance attribute: nn.Module.__call__ looks it up there first
    try:
        yield
    finally:
        if previous is None:
            del model.forward
        else:
            model.forward = previous


def compact_inputs(inputs, layout: SharedLayout) -> dict:
    """TRL's batch in its own layout, the sequences shortened to [prompt's last token, reply]. attention_mask stays
    the full one: TRL reads it only for its token count, and the model call ignores it."""
    compact = dict(inputs)
    compact["input_ids"] = layout.compact_ids
    compact["completion_mask"] = layout.compact_mask
    return compact
