"""chat.py's session: the SFT and DPO adapters side by side on one base model, each reply shown with its classifier
labels and reward parts. Each model keeps its own side of the conversation, windowed and rendered exactly as
generate_preferences builds its prompts (num_turns_history turn pairs, the shared chat template)."""

from __future__ import annotations

import json
import sys
from typing import Iterable

from . import EMOTIONS

MODELS = (("SFT", "default"), ("DPO", "dpo"))  # (shown name, adapter name on the one base)
HELP = ("type a line to talk to both models; /emotion NAME sets the emotion they are asked to reply in "
        f"({', '.join(EMOTIONS)}); /emotion shows it; /reset forgets the conversation; /quit ends")


def turn(role: str, emotion: str, dialog: str) -> dict:
    """One turn in the dialogue datasets' format, which the template renders."""
    return {"role": role, "content": {"emotion": emotion, "dialog": dialog}}


def window(history: list[dict], user_turn: dict, requested: str, num_turns_history: int) -> list[dict]:
    """The last num_turns_history user/assistant pairs, the new user turn and the open reply in the requested
    emotion: the window generate_preferences cuts from a dialogue."""
    kept = history[len(history) - 2 * num_turns_history:] if num_turns_history else []
    return kept + [user_turn, turn("assistant", requested, "")]


def describe(reply) -> str:
    return (f"emotion {reply.emotion_label} {reply.emotion_confidence:.2f} | gibberish {reply.gibberish_label} "
            f"{reply.gibberish_confidence:.2f} | length {reply.length:g} | reward: emotion {reply.emotion_reward:.2f}, "
            f"length {reply.length_reward:.2f}, gibberish {reply.gibberish_reward:.2f}, total {reply.total:.2f}")


def default_emotion(emotion_labels) -> str:
    """What both models are asked for until /emotion: neutral where the labels have it (the reference's first
    label), else the classifier's first output."""
    known = [label.lower() for label in emotion_labels]
    return "neutral" if "neutral" in known else known[0]


class ChatSession:
    def __init__(self, cfg, model, tokenizer, scorer, generation_config, show_prompts: bool = False):
        self.cfg, self.model, self.tokenizer, self.scorer = cfg, model, tokenizer, scorer
        self.generation_config = generation_config
        self.show_prompts = show_prompts
        self.requested = default_emotion(cfg.emotion_labels)
        self.histories = {name: [] for name, _ in MODELS}
        self.turns = 0

    def command(self, line: str) -> bool:
        """A /command; False for /quit."""
        name, _, argument = line.partition(" ")
        argument = argument.strip().lower()
        if name == "/quit":
            return False
        if name == "/emotion" and not argument:
            print(f"requested emotion: {self.requested}")
        elif name == "/emotion":
            known = [label.lower() for label in self.cfg.emotion_labels]
            if argument not in known:
                print(f"error: unknown emotion {argument!r}; choose one of {', '.join(known)}", file=sys.stderr)
            else:
                self.requested = argument
                print(f"requested emotion: {self.requested}")
        elif name == "/reset":
            self.histories = {name: [] for name, _ in MODELS}
            print("conversation forgotten")
        elif name == "/help":
            print(HELP)
        else:
            print(f"error: unknown command {name!r}; {HELP}", file=sys.stderr)
        return True

    def say(self, text: str) -> dict:
        """Both models' scored replies to one user line; each model's history grows by the pair."""
        from transformers import set_seed

        from .template import context_ids, render_chat
        from .generation import generate_candidates
        from .prompts import build_messages

        user = self.scorer.classify(self.scorer.emotion, [text])[0]
        user_turn = turn("user", str(user["label"]).lower(), text)
        print(f"you ({user_turn['content']['emotion']} {user['score']:.2f}): {text}")
        print(f"  requested emotion: {self.requested}")
        self.turns += 1
        replies = {}
        for name, adapter in MODELS:
            messages, _ = build_messages(window(self.histories[name], user_turn, self.requested,
                                                self.cfg.num_turns_history), self.cfg.system_prompt)
            prompt = render_chat(self.tokenizer, messages)
            if self.show_prompts:
                print(f"  {name} prompt: {json.dumps(prompt)}")  # one line: the template's newlines escaped
            self.model.set_adapter(adapter)
            set_seed(self.cfg.seed + self.turns)  # the same sampling noise for both models, as evaluate does
            context = context_ids(self.tokenizer, prompt)  # the ids generate_preferences conditions on
            reply = generate_candidates(self.model, self.tokenizer, [context], 1, self.generation_config)[0][0]
            scored = self.scorer.score([reply], [self.requested])[0]  # reply: (text, token ids)
            print(f"  {name}: {scored.text}\n  {' ' * len(name)}  {describe(scored)}")
            self.histories[name] += [user_turn, turn("assistant", self.requested, scored.text)]
            replies[name] = scored
        return replies

    def run(self, lines: Iterable[str]) -> None:
        for line in lines:
            line = line.strip()
            if not line:
                continue
            if problem := not_text(line):  # the tokenizer would raise a TypeError and end the session
                print(f"error: {problem}; the line is skipped, type it again", file=sys.stderr)
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.say(line)


def not_text(line: str) -> str | None:
    """What makes a line read from standard input not text, or None: bytes that are not UTF-8 arrive as lone
    surrogates (Python's surrogateescape)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = line[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character {bad!r}"
        return f"the line is not UTF-8 text ({byte} at character {e.start + 1})"
    return None


def chat(cfg, lines: Iterable[str], show_prompts: bool = False) -> None:
    from .generation import Scorer, checked_generation_config
    from .models import add_adapter, check_adapter_path, check_classifiers, load_generator

    check_adapter_path(cfg.adapter, "adapter", cfg.source)
    check_adapter_path(cfg.dpo_adapter, "dpo_adapter", cfg.source)
    generation_config = checked_generation_config(cfg.generation, cfg.source)
    check_classifiers(cfg.emotion_classifier, cfg.gibberish_detector, cfg.emotion_labels)
    model, tokenizer = load_generator(cfg)  # the SFT adapter as "default"
    add_adapter(model, cfg.dpo_adapter, "dpo", cfg.source)
    session = ChatSession(cfg, model, tokenizer, Scorer(cfg, tokenizer), generation_config, show_prompts)
    if sys.stdin.isatty():
        print(HELP)
    if hasattr(lines, "reconfigure"):  # a byte that is not UTF-8 becomes a line to refuse, not the session's end
        lines.reconfigure(errors="surrogateescape")
    session.run(lines)
