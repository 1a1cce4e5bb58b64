"""The reward of one reply: plain functions of plain values (no torch, no model), exactly as the reference.

total = weights . [emotion, length, gibberish] + bias, with reference weights [0.4, 0.25, 0.35], bias 0.001.
"""

from __future__ import annotations

from typing import Sequence


def emotion_reward(label: str, confidence: float, target: str) -> float:
    """Classifier agrees with the target emotion: confidence x 10, else 0."""
    return confidence * 10 if label.lower() == target.lower() else 0.0


def length_reward(length: float, shortest: float = 5, longest: float = 20) -> float:
    """The reference's banded length shaping (lengths in the configured unit; reference: characters)."""
    from_shortest = (length - shortest) / shortest
    from_longest = (length - longest) / longest
    if abs(from_shortest) < 1:
        return from_shortest * 0.0001
    if abs(from_shortest) > 1 > abs(from_longest):
        return abs(from_shortest + from_longest) * 10
    return from_longest * 0.9


def flat_length_reward(length: float, shortest: float = 5, longest: float = 20) -> float:
    """The reference's rule up to `longest`, then held at its value there: no cliff at 2 x longest, which makes the
    longest replies just under it win everywhere (docs/selection.md, "Diversity-aware selection")."""
    return length_reward(min(length, longest), shortest, longest)


LENGTH_RULES = {"reference": length_reward, "flat_above_max": flat_length_reward}


def gibberish_reward(label: str, confidence: float) -> float:
    """Detector says clean: confidence x 10; mild gibberish: x 5; anything else: confidence - 2."""
    label = label.lower()
    if label == "clean":
        return confidence * 10
    if label == "mild gibberish":
        return confidence * 5
    return confidence - 2


def total_reward(emotion: float, length: float, gibberish: float, weights: Sequence[float], bias: float) -> float:
    w_emotion, w_length, w_gibberish = weights
    return w_emotion * emotion + w_length * length + w_gibberish * gibberish + bias


def reply_length(reply: str, unit: str, count_tokens=None) -> int:
    """Length of a reply in 'characters' (the reference's len(reply)), 'words' or 'tokens'."""
    if unit == "characters":
        return len(reply)
    if unit == "words":
        return len(reply.split())
    if unit == "tokens":
        return count_tokens(reply)
    raise ValueError(f"unknown length unit {unit!r}")
