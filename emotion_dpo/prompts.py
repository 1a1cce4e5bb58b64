"""Dialogue rows -> chat-templated generation prompts with their target emotion."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from .template import check_context_ids, context_ids, context_text, render_chat
from .errors import PipelineError


@dataclass(frozen=True)
class Prompt:
    index: int  # position among the prompts of this run: the journal's key
    dialogue: int  # row of the dialogue dataset it came from
    target_emotion: str
    messages: list  # system + history + the target's assistant turn (dialog empty)
    text: str  # the rendered prompt, chat-templated with the generation prompt, special tokens kept
    ids: list  # what the model is conditioned on: template.context_ids(text), one BOS


def load_rows(source: str, split: str, what: str, keep_in_memory: bool = False):
    """A `datasets.Dataset` from a local save_to_disk folder (split "a+b" joins splits), a JSONL file, or a Hub id.
    A local file is JSON lines whatever its suffix (.jsonl, .json, ...), checked line by line (check_jsonl): pyarrow
    takes a byte that is not UTF-8 without a word, and reading that row fails later, deep in datasets.
    `keep_in_memory`: a folder is read into memory, so that map/filter write no cache-*.arrow files into it."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=keep_in_memory)
            if isinstance(loaded, datasets.DatasetDict):
                names = [s.strip() for s in split.split("+")]
                missing = [n for n in names if n not in loaded]
                if missing:
                    raise PipelineError(f"{source}: no split {missing[0]!r} (has {', '.join(loaded)})")
                return datasets.concatenate_datasets([loaded[n] for n in names])
            return loaded
        if path.is_file() or path.suffix in (".jsonl", ".json"):
            if not path.exists():
                raise PipelineError(f"{source}: {what} file not found")
            if not has_a_line(path):  # datasets' json loader raises StopIteration on it
                raise PipelineError(f"{source}: 0 rows: the {what} file is empty")
            check_jsonl(path, what)
            return datasets.load_dataset("json", data_files=str(path), split="train")
        return datasets.load_dataset(source, split=split)
    except PipelineError:
        raise
    except Exception as e:  # the Hub, a corrupt folder: say which source failed and why, briefly
        raise PipelineError(f"{source}: cannot load {what} ({type(e).__name__}: {e})") from None


def check_jsonl(path: Path, what: str) -> None:
    """Every line UTF-8 and one JSON object, or an error naming the line; pyarrow would say only "Invalid octet" or
    "JSON parse error ... in row N" of some block, from deep in datasets."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    for n, raw in enumerate(lines):
        if not raw.strip():
            continue
        where = f"{path}:{n + 1}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PipelineError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the "
                                f"{what} file as UTF-8") from None
        try:
            row = json.loads(text)
        except ValueError as e:
            cut = (" it is the last line and looks cut short (a copy or write that stopped): complete or remove it"
                   if n == last else " fix or remove that line")
            raise PipelineError(f"{where}: not a JSON object ({e.msg} at column {e.colno});{cut}") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{where}: expected a JSON object per line, got {type(row).__name__}")


def has_a_line(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(line.strip() for line in f)


def load_dialogues(source: str, split: str):
    return load_rows(source, split, "dialogues")


# A chat turn is a sentence or a few; one this long is a data error more likely than a turn, and fills the prompt.
LONG_TURN_CHARACTERS = 2000


def check_dialogues(dialogues, source: str, emotions) -> None:
    """Every row has a 'prompt' list of {role, content: {emotion, dialog}} turns with known emotions, text for
    every dialog, and user and assistant turns alternating (the reference template refuses anything else)."""
    if "prompt" not in dialogues.column_names:
        raise PipelineError(f"{source}: missing column 'prompt' (has {', '.join(dialogues.column_names)})")
    known = {e.lower() for e in emotions}
    long_turns = []
    for row, turns in enumerate(dialogues["prompt"]):
        if not isinstance(turns, list):
            raise PipelineError(f"{source}: row {row}: 'prompt' is {json.dumps(turns)[:40]}, expected a list of turns")
        for turn_at, turn in enumerate(turns):
            where = f"{source}: row {row}, turn {turn_at}"
            content = turn.get("content") if isinstance(turn, dict) else None
            if not isinstance(content, dict) or not {"emotion", "dialog"} <= set(content):
                raise PipelineError(f"{where}: expected {{'role', 'content': {{'emotion', 'dialog'}}}}")
            if turn.get("role") not in ("user", "assistant"):
                raise PipelineError(f"{where}: role {turn.get('role')!r}, expected 'user' or 'assistant'")
            if turn_at and turn["role"] == turns[turn_at - 1]["role"]:
                raise PipelineError(f"{where}: a second {turn['role']!r} turn in a row; roles must alternate "
                                    "user/assistant/user/assistant/... as the chat template expects")
            if not isinstance(content["dialog"], str):
                raise PipelineError(f"{where}: dialog is {json.dumps(content['dialog'])[:40]}, expected the text of the turn")
            if str(content["emotion"]).lower() not in known:
                raise PipelineError(
                    f"{where}: unknown emotion {content['emotion']!r} (emotion_labels: {', '.join(emotions)})"
                )
            if len(content["dialog"]) > LONG_TURN_CHARACTERS:
                long_turns.append((row, turn_at, len(content["dialog"])))
    if long_turns:
        row, turn_at, length = max(long_turns, key=lambda t: t[2])
        warnings.warn(f"{source}: {len(long_turns)} turns are longer than {LONG_TURN_CHARACTERS} characters "
                      f"(longest: row {row}, turn {turn_at}, {length} characters); a prompt holding one may exceed "
                      "what the model or DPO's max_length takes", stacklevel=2)


def window_starts(turns: list, window: int, all_windows: bool) -> list[int]:
    """Starts of the full windows (user turn first, assistant turn last); the last one only by default."""
    starts = [
        s for s in range(len(turns) - window + 1)
        if turns[s]["role"] == "user" and turns[s + window - 1]["role"] == "assistant"
    ]
    return starts if all_windows else starts[-1:]


def build_messages(turns: list, system_prompt: str) -> tuple[list, str]:
    """The window without its last reply's text: (messages, target emotion). As the reference lays them out
    (data_process_dpo.py): always a system message (the template renders it only when non-empty), the
    history, and the last assistant turn with the target emotion and an empty dialog."""
    target = turns[-1]["content"]["emotion"]
    messages = [{"role": "system", "content": {"emotion": "", "dialog": system_prompt}}]
    messages += [{"role": t["role"], "content": dict(t["content"])} for t in turns[:-1]]
    messages.append({"role": "assistant", "content": {"emotion": target, "dialog": ""}})
    return messages, target


def build_prompts(dialogues, tokenizer, system_prompt: str, num_turns_history: int, all_windows: bool = False,
                  num_prompts: int | None = None) -> list[Prompt]:
    window = 2 + 2 * num_turns_history
    prompts: list[Prompt] = []
    for row, turns in enumerate(dialogues["prompt"]):
        for start in window_starts(turns, window, all_windows):
            if num_prompts is not None and len(prompts) >= num_prompts:
                return prompts
            messages, target = build_messages(turns[start:start + window], system_prompt)
            text = render_chat(tokenizer, messages)
            prompts.append(Prompt(len(prompts), row, target, messages, text, context_ids(tokenizer, text)))
    return prompts


def load_prompts(cfg):
    """(tokenizer, prompts) for generate_preferences and evaluate alike: dialogues, their emotions, the
    classifiers' labels and the template checked, prompts rendered; no model weights loaded."""
    from .template import load_chat_format
    from .models import check_classifiers, load_tokenizer

    dialogues = load_dialogues(cfg.dataset, cfg.dataset_split)
    check_dialogues(dialogues, cfg.dataset, cfg.emotion_labels)
    check_classifiers(cfg.emotion_classifier, cfg.gibberish_detector, cfg.emotion_labels)
    tokenizer = load_tokenizer(cfg.base_model, cfg.adapter, load_chat_format(cfg.chat_template))
    wanted = None if cfg.num_prompts is None else cfg.skip_prompts + cfg.num_prompts
    prompts = build_prompts(dialogues, tokenizer, cfg.system_prompt, cfg.num_turns_history, cfg.all_windows, wanted)
    if cfg.skip_prompts:  # the run's own prompts are numbered from 0: the journal's key
        if len(prompts) <= cfg.skip_prompts:
            raise PipelineError(f"{cfg.dataset}: skip_prompts {cfg.skip_prompts} leaves no prompt "
                                f"(split {cfg.dataset_split!r} has {len(prompts)})")
        prompts = [replace(p, index=i) for i, p in enumerate(prompts[cfg.skip_prompts:])]
    if not prompts:
        raise PipelineError(
            f"{cfg.dataset}: split {cfg.dataset_split!r} has no dialogue with the "
            f"{2 + 2 * cfg.num_turns_history} turns that num_turns_history={cfg.num_turns_history} needs"
        )
    check_context_ids(tokenizer, prompts[0].text, f"{cfg.source}: keys chat_template ({cfg.chat_template}), adapter")
    check_run_texts(tokenizer, prompts, cfg.base_model, cfg.adapter)
    return tokenizer, prompts


FIDELITY_PROMPTS = 8  # the run's first prompts checked against SentencePiece


def check_run_texts(tokenizer, prompts, base_model: str, adapter: str) -> None:
    """The run's first prompts (their context ids) and the first one's conversation with a reply, rendered as a
    finished turn, tokenize as the tokenizer's SentencePiece model does (load_tokenizer made sure of it on its probe;
    this is the run's own text). Refused otherwise, before any model loads."""
    from .sentencepiece_check import conform_to_sentencepiece

    replied = [*prompts[0].messages[:-1], {**prompts[0].messages[-1], "content": {
        **prompts[0].messages[-1]["content"], "dialog": "okay ,  sure !"}}]
    texts = [context_text(p.text) for p in prompts[:FIDELITY_PROMPTS]]
    texts.append(render_chat(tokenizer, replied, add_generation_prompt=False))
    conform_to_sentencepiece(tokenizer, getattr(tokenizer, "loaded_from", adapter), folders=[base_model], texts=texts,
                             rebuild=False)
