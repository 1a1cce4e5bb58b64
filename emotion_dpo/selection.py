"""Which replies of a round become the (chosen, rejected) pair, and whether the round passes.

Pure functions over ScoredReply records, so every rule can be checked by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from .rewards import emotion_reward, gibberish_reward, length_reward, total_reward


@dataclass(frozen=True)
class ScoredReply:
    text: str
    emotion_label: str
    emotion_confidence: float
    gibberish_label: str
    gibberish_confidence: float
    length: float
    emotion_reward: float
    length_reward: float
    gibberish_reward: float
    total: float
    token_ids: list | None = None  # the generated ids, EOS excluded: what DPO trains on
    # True: generation stopped on EOS; False: cut off at max_new_tokens; None: not recorded (older journals)
    ended_on_eos: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def score_reply(text, emotion_label, emotion_confidence, gibberish_label, gibberish_confidence, length,
                target, rewards, token_ids=None, ended_on_eos=None) -> ScoredReply:
    """`rewards` is a RewardConfig (weights, bias, length_min, length_max)."""
    emotion = emotion_reward(emotion_label, emotion_confidence, target)
    length_part = length_reward(length, rewards.length_min, rewards.length_max)
    gibberish = gibberish_reward(gibberish_label, gibberish_confidence)
    total = total_reward(emotion, length_part, gibberish, rewards.reward_weights, rewards.reward_bias)
    return ScoredReply(text, emotion_label, emotion_confidence, gibberish_label, gibberish_confidence, length,
                       emotion, length_part, gibberish, total, token_ids, ended_on_eos)


def rescore(reply: ScoredReply, target, rewards) -> ScoredReply:
    """The same reply under other reward settings, from its stored classifier outputs."""
    return score_reply(reply.text, reply.emotion_label, reply.emotion_confidence, reply.gibberish_label,
                       reply.gibberish_confidence, reply.length, target, rewards, reply.token_ids,
                       reply.ended_on_eos)


def pick_pair(replies: Sequence[ScoredReply]) -> tuple[int, int]:
    """Indices of chosen (highest total) and rejected (lowest total); the first one wins ties."""
    totals = [r.total for r in replies]
    return totals.index(max(totals)), totals.index(min(totals))


def round_failure(replies: Sequence[ScoredReply], target: str, selection) -> str | None:
    """Why this round fails (None if it passes). `selection` is a SelectionConfig.

    Checked in the reference's order: score range, best score, then the chosen filters; the classifier
    outputs of the chosen reply are the ones already computed, never re-run.
    """
    chosen_at, rejected_at = pick_pair(replies)
    chosen, best, worst = replies[chosen_at], replies[chosen_at].total, replies[rejected_at].total
    if best - worst < selection.target_score_range:
        return "score range below target_score_range"
    if best < selection.min_chosen_score:
        return "best score below min_chosen_score"
    return chosen_failure(chosen, target, selection)


def chosen_failure(chosen: ScoredReply, target: str, selection) -> str | None:
    if chosen.emotion_label.lower() != target.lower():
        return "chosen emotion is not the target"
    if chosen.gibberish_label.lower() != "clean":
        return "chosen is not clean"
    if chosen.gibberish_confidence < selection.min_chosen_gibberish_confidence:
        return "chosen clean confidence too low"
    if is_cut_off(chosen.text, selection.chosen_endings):
        return "chosen is cut off"
    return None


def ending_of(text: str) -> str:
    """The character a reply ends in, spaces aside, as the reference reads it (hermeschen1116/emotion-chat-bot
    @1228505, src/scripts/response_generator/data_process_dpo.py: `chosen.strip(" ")[-1:] not in ["!", ".", "?"]`).
    The config takes only single characters as endings (chosen_endings, complete_endings)."""
    return text.strip(" ")[-1:]


def is_cut_off(text: str, endings) -> bool:
    """Selection's chosen filter and evaluation's cut-off rate alike."""
    return ending_of(text) not in endings


def gives_up(rounds_done: int, max_retries: int) -> bool:
    """After a failed round: a prompt is given up once 1 + max_retries rounds have all failed."""
    return rounds_done >= 1 + max_retries
