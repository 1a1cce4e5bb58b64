"""The chat template shared by every script: loading it, installing it on a tokenizer, rendering, and the token
ids a prompt gives the model."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError


@dataclass(frozen=True)
class ChatFormat:
    template: str  # jinja, rendered by the tokenizer's apply_chat_template
    special_tokens: tuple[str, ...]
    pad_token: str
    source: str = ""  # the file it came from, named in every error about it


def load_chat_format(path: str | Path) -> ChatFormat:
    """The project's format (`chat_template`, `special_tokens`, `pad_token`) or the reference project's, as it is
    (`template`, `instruction`, `response`, `special_tokens: {pad_token, additional_special_tokens}`)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: chat template file not found") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(doc, dict):
        raise PipelineError(f"{path}: expected a JSON object with a chat template")
    if "template" in doc and "chat_template" not in doc:  # the reference's format
        template, tokens = doc.get("template"), doc.get("special_tokens")
        template_key, tokens_key, pad_key = "template", "special_tokens.additional_special_tokens", "special_tokens.pad_token"
        tokens = tokens if isinstance(tokens, dict) else {}
        special, pad = tokens.get("additional_special_tokens"), tokens.get("pad_token")
    else:
        template, special, pad = doc.get("chat_template"), doc.get("special_tokens"), doc.get("pad_token")
        template_key, tokens_key, pad_key = "chat_template", "special_tokens", "pad_token"
    problems = []
    if not isinstance(template, str) or not template:
        problems.append(f"key '{template_key}': expected a non-empty jinja string")
    if not (isinstance(special, list) and all(isinstance(t, str) and t for t in special)):
        problems.append(f"key '{tokens_key}': expected a list of non-empty strings")
    if not isinstance(pad, str) or not pad:
        problems.append(f"key '{pad_key}': expected a non-empty string")
    if problems:
        raise PipelineError("\n".join(f"{path}: {p}" for p in problems))
    check_jinja_syntax(template, f"{path}: key '{template_key}'")
    return ChatFormat(template, tuple(special), pad, str(path))


def check_jinja_syntax(template: str, where: str) -> None:
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise PipelineError(f"{where}: jinja syntax error at line {e.lineno}: {e.message}") from None


def install_chat_format(tokenizer, chat: ChatFormat) -> int:
    """Give the tokenizer the template, its special tokens and pad token; returns how many tokens were new.

    The SFT adapter was trained after exactly this step (the reference adds the template file's special_tokens
    the same way), so the embeddings must be resized to len(tokenizer) whenever the result is non-zero.
    """
    tokenizer.chat_template = chat.template
    tokenizer.chat_template_file = chat.source  # named when rendering fails
    added = tokenizer.add_special_tokens(
        {"pad_token": chat.pad_token, "additional_special_tokens": list(chat.special_tokens)}
    )
    # Decoder-only generation of a batch needs the padding on the left.
    tokenizer.padding_side = "left"
    return added


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The exact string the model sees: special tokens kept, no tokenization. With the generation prompt, as the
    reference renders its prompts (the last assistant turn's dialog is then not rendered)."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        where = getattr(tokenizer, "chat_template_file", "") or "the chat template"
        raise PipelineError(f"{where}: the template failed to render a conversation: {e}") from None


# A conversation that shows what a template does with history, system prompt and generation prompt.
PROBE = [{"role": "system", "content": {"emotion": "", "dialog": "be kind ."}},
         {"role": "user", "content": {"emotion": "neutral", "dialog": " hello . "}},
         {"role": "assistant", "content": {"emotion": "happiness", "dialog": "hi !"}},
         {"role": "user", "content": {"emotion": "sadness", "dialog": "i am sad ."}},
         {"role": "assistant", "content": {"emotion": "sadness", "dialog": ""}}]
_warned: set = set()


def warn_if_shipped_template_differs(tokenizer, where: str, chat: ChatFormat) -> None:
    """Once per (tokenizer folder, template file): the tokenizer's own chat template, when it renders the probe
    conversation otherwise than the configured one (the configured one is used)."""
    shipped = getattr(tokenizer, "chat_template", None)
    if not isinstance(shipped, str) or not shipped or (where, chat.source) in _warned:
        return
    try:
        same = (tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True, chat_template=shipped)
                == tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True,
                                                 chat_template=chat.template))
    except Exception:  # noqa: BLE001  (a template that fails on the probe differs too)
        same = False
    if not same:
        _warned.add((where, chat.source))
        warnings.warn(f"{where}: its tokenizer ships a chat template that renders differently from "
                      f"{chat.source}; using {chat.source}. Shipped: {shipped[:200]!r}"
                      + ("..." if len(shipped) > 200 else ""), stacklevel=2)


# ------------------------------------------------------------------ the ids a prompt gives the model

def context_ids(tokenizer, prompt: str) -> list[int]:
    """The ids the model is conditioned on for a rendered prompt: the prompt without its final space.

    The SFT model learned whole conversations, where the generation prompt's final space and the reply's first
    word are one token (`[/EMOTION] ` + `hi` is `[/EMOTION]`, `▁hi` on Llama-2); the prompt alone would end in a
    lone `▁` it never saw before a reply. Without that space the ids are the training sequence's prefix up to
    the reply's first token. The text already holds its BOS (`<s>`), so the tokenizer adds none."""
    return many_context_ids(tokenizer, [prompt])[0]


def many_context_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """context_ids of each prompt, tokenized in one batch."""
    texts = [context_text(prompt) for prompt in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]



def context_text(prompt: str) -> str:
    """The rendered prompt without its final space: the text of context_ids."""
    return prompt[:-1] if prompt.endswith(" ") else prompt


def finished_turn(tokenizer, prompt: str, reply: str) -> str:
    """A rendered generation prompt followed by `reply` as the template renders a finished assistant turn (with
    add_generation_prompt=False: on the reference's template the stripped reply, ' ' + eos + newline), as the SFT
    model saw every reply end. The template renders the last assistant turn the same after any history, so the
    turn's ending is taken from a one-pair conversation: its rendering with the reply, after its rendering as a
    generation prompt."""
    def pair(dialog):
        return [{"role": "user", "content": {"emotion": "neutral", "dialog": "hello ."}},
                {"role": "assistant", "content": {"emotion": "neutral", "dialog": dialog}}]

    opened = render_chat(tokenizer, pair(""), add_generation_prompt=True)
    finished = render_chat(tokenizer, pair(reply), add_generation_prompt=False)
    if not finished.startswith(opened):
        where = getattr(tokenizer, "chat_template_file", "") or "the chat template"
        raise PipelineError(f"{where}: a finished assistant turn does not start as its generation prompt renders "
                            f"({finished[-80:]!r} vs {opened[-80:]!r}); a text reply cannot be placed after a prompt")
    return prompt + finished[len(opened):]


def check_context_ids(tokenizer, prompt: str, where: str) -> None:
    """On one prompt: its context ids are a prefix of prompt + reply, and the reply starts with a word, not with
    a lone space token. Otherwise the tokenizer splits at the boundary in a way this pipeline cannot follow."""
    ids = context_ids(tokenizer, prompt)
    whole = tokenizer(prompt + "word", add_special_tokens=False)["input_ids"]
    if whole[:len(ids)] != ids or len(whole) == len(ids):
        raise PipelineError(
            f"{where}: the prompt's tokens are not a prefix of prompt + reply under this tokenizer "
            f"({tokenizer.convert_ids_to_tokens(ids[-3:])} vs {tokenizer.convert_ids_to_tokens(whole[len(ids) - 3:])})"
        )
    first = whole[len(ids)]
    if not tokenizer.decode([first]).strip():
        raise PipelineError(
            f"{where}: under this tokenizer a reply after the prompt starts with a lone space token "
            f"{tokenizer.convert_ids_to_tokens([first])}; the prompt should end where a reply's first word begins"
        )
