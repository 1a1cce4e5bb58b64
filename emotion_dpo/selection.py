"""Which replies of a round become the (chosen, rejected) pair, and whether the round passes.

Pure functions over ScoredReply records, so every rule can be checked by hand.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

from .rewards import LENGTH_RULES, emotion_reward, gibberish_reward, total_reward


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
    length_rule = LENGTH_RULES[getattr(rewards, "length_rule", "reference")]
    length_part = length_rule(length, rewards.length_min, rewards.length_max)
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


# ------------------------------------------------------------------ diversity-aware selection
#
# The reference takes each prompt's best reply on its own, and a few stock sentences win everywhere (docs/selection.md,
# "Diversity-aware selection"). These rules choose over a prompt's whole pool (every candidate of every round) and
# over the run: a cap on one text's share of an emotion's chosen replies, counted in prompt order, and DivPO's
# rarest-passing-text rule (Lanchantin et al. 2025, arXiv 2501.18101). Counting happens at finalize time over the
# journal's stored candidates, so the pairs are the same with 1 process or N, after a resume, and with --reselect.

REFERENCE_RULES = {"chosen_text_cap": None, "min_distinct_passing": 1, "chosen_rule": "best", "rejected_rule": "worst"}


def uses_pool(selection) -> bool:
    """True when any diversity key leaves the reference's rule (each round on its own, its best reply chosen)."""
    return any(getattr(selection, key, default) != default for key, default in REFERENCE_RULES.items())


def pool_of(rounds: Sequence[Sequence]) -> list[tuple[int, int]]:
    """(round, position) of every candidate of a prompt, in sampling order."""
    return [(r, i) for r, round_ in enumerate(rounds) for i in range(len(round_))]


def passing_in_pool(rounds: Sequence[Sequence[ScoredReply]], target: str, selection) -> list[tuple[int, int]]:
    """The candidates that may be chosen: the round rules applied to the whole pool (the gap measured to the pool's
    lowest total), in sampling order."""
    worst = min(reply.total for round_ in rounds for reply in round_)
    return [(r, i) for r, i in pool_of(rounds)
            if (reply := rounds[r][i]).total >= selection.min_chosen_score
            and reply.total - worst >= selection.target_score_range
            and chosen_failure(reply, target, selection) is None]


def distinct_texts(rounds, places) -> int:
    return len({rounds[r][i].text.strip() for r, i in places})


def pool_settles(rounds, target: str, selection) -> bool:
    """Whether a prompt's rounds so far are enough: min_distinct_passing different passing texts."""
    return distinct_texts(rounds, passing_in_pool(rounds, target, selection)) >= selection.min_distinct_passing


def chosen_order(rounds, places, rarity: dict | None) -> list[tuple[int, int]]:
    """Passing candidates, most wanted first. rule 'best' (rarity None): highest total; 'rarest': fewest copies of
    its text among the run's candidates for the emotion (`rarity`: text -> count), then highest total. Ties keep
    sampling order."""
    def key(place):
        reply = rounds[place[0]][place[1]]
        return (rarity[reply.text.strip()] if rarity is not None else 0, -reply.total)

    return sorted(places, key=key)


def rejected_place(rounds, chosen: ScoredReply, passing, rarity: dict | None, gap: float) -> tuple[int, int]:
    """rule 'worst' (rarity None): the pool's lowest total, first in sampling order on ties. 'most_common' (DivPO's
    rejected side): among the candidates that do not pass and score at least `gap` below the chosen, the most copied
    text, then the lowest total; the lowest total when there is none."""
    places = pool_of(rounds)
    lowest = min(places, key=lambda p: rounds[p[0]][p[1]].total)
    if rarity is None:
        return lowest
    passing = set(passing)
    others = [p for p in places if p not in passing and chosen.total - rounds[p[0]][p[1]].total >= gap]
    if not others:
        return lowest
    return min(others, key=lambda p: (-rarity[rounds[p[0]][p[1]].text.strip()], rounds[p[0]][p[1]].total))


def text_cap(share: float | None, prompts: int, minimum: int) -> float:
    """How many of an emotion's chosen replies one text may be: share x its prompts with a passing reply, rounded
    down, never below `minimum`; no cap (infinity) for share None."""
    return float("inf") if share is None else max(minimum, int(share * prompts))


def top_share(texts: Sequence[str]) -> tuple[str, float]:
    """The most frequent text and its share (first seen wins ties); ("", 0.0) for none."""
    if not texts:
        return "", 0.0
    best, count = Counter(texts).most_common(1)[0]  # equal counts keep the order first seen
    return best, count / len(texts)
