"""The chat template shared by every script: loading it, installing it on a tokenizer, rendering."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError


@dataclass(frozen=True)
class ChatFormat:
    template: str  # jinja, rendered by the tokenizer's apply_chat_template
    special_tokens: tuple[str, ...]
    pad_token: str


def load_chat_format(path: str | Path) -> ChatFormat:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: chat template file not found") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    problems = []
    if not isinstance(doc.get("chat_template"), str) or not doc.get("chat_template"):
        problems.append("key 'chat_template': expected a non-empty jinja string")
    tokens = doc.get("special_tokens")
    if not (isinstance(tokens, list) and all(isinstance(t, str) and t for t in tokens)):
        problems.append("key 'special_tokens': expected a list of non-empty strings")
    if not isinstance(doc.get("pad_token"), str) or not doc.get("pad_token"):
        problems.append("key 'pad_token': expected a non-empty string")
    if problems:
        raise PipelineError("\n".join(f"{path}: {p}" for p in problems))
    return ChatFormat(doc["chat_template"], tuple(tokens), doc["pad_token"])


def install_chat_format(tokenizer, chat: ChatFormat) -> int:
    """Give the tokenizer the template, its special tokens and pad token; returns how many tokens were new.

    The SFT adapter was trained after exactly this step, so the embeddings must be resized to
    len(tokenizer) whenever the result is non-zero.
    """
    tokenizer.chat_template = chat.template
    added = tokenizer.add_special_tokens(
        {"pad_token": chat.pad_token, "additional_special_tokens": list(chat.special_tokens)}
    )
    # Decoder-only generation of a batch needs the padding on the left.
    tokenizer.padding_side = "left"
    return added


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The exact string the model sees: special tokens kept, no tokenization."""
    return tokenizer.apply_chat_template(messages, tokenize=False)
