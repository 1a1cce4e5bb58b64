"""The reward rules of the reference, checked against hand-computed values (no torch, no model)."""

import pytest

from emotion_dpo.rewards import emotion_reward, gibberish_reward, length_reward, reply_length, total_reward

REFERENCE_WEIGHTS, REFERENCE_BIAS = [0.4, 0.25, 0.35], 0.001


def test_emotion_reward_is_ten_times_confidence_when_the_label_is_the_target():
    assert emotion_reward("happiness", 0.9, "happiness") == pytest.approx(9.0)
    assert emotion_reward("Happiness", 0.9, "happiness") == pytest.approx(9.0)  # case-insensitive


def test_emotion_reward_is_zero_for_another_emotion():
    assert emotion_reward("anger", 0.99, "happiness") == 0.0


@pytest.mark.parametrize(
    "length, expected",
    [
        (5, 0.0),  # |a| = 0 < 1: a x 0.0001
        (7, 0.4 * 0.0001),  # a = 0.4
        (3, -0.4 * 0.0001),  # a = -0.4
        (30, 55.0),  # a = 5, b = 0.5: |a| > 1 > |b| -> |a + b| x 10
        (11, 7.5),  # a = 1.2, b = -0.45 -> 0.75 x 10
        (39, 77.5),  # a = 6.8, b = 0.95 -> 7.75 x 10
        (10, -0.45),  # a = 1 exactly: neither band -> b x 0.9 = -0.5 x 0.9
        (0, -0.9),  # a = -1, b = -1 -> b x 0.9
        (40, 0.9),  # b = 1 exactly -> b x 0.9
        (50, 1.35),  # b = 1.5 -> b x 0.9
    ],
)
def test_length_reward_every_branch(length, expected):
    assert length_reward(length) == pytest.approx(expected)


def test_length_reward_bounds_are_configurable():
    # shortest 10, longest 40, length 30: a = 2, b = -0.25 -> |1.75| x 10
    assert length_reward(30, shortest=10, longest=40) == pytest.approx(17.5)


@pytest.mark.parametrize(
    "label, confidence, expected",
    [("clean", 0.95, 9.5), ("Clean", 0.5, 5.0), ("mild gibberish", 0.8, 4.0), ("word salad", 0.7, -1.3),
     ("noise", 0.9, -1.1)],
)
def test_gibberish_reward(label, confidence, expected):
    assert gibberish_reward(label, confidence) == pytest.approx(expected)


def test_total_reward_with_the_reference_weights():
    # 0.4 x 9 + 0.25 x 55 + 0.35 x 9.5 + 0.001
    assert total_reward(9.0, 55.0, 9.5, REFERENCE_WEIGHTS, REFERENCE_BIAS) == pytest.approx(20.676)


def test_reply_length_units():
    assert reply_length("i am glad !", "characters") == 11
    assert reply_length("i am glad !", "words") == 4
    assert reply_length("i am glad !", "tokens", count_tokens=lambda text: 6) == 6


def test_rewards_module_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, emotion_dpo.rewards, emotion_dpo.selection; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_words_are_separated_by_any_run_of_whitespace():
    assert reply_length(" i  am\tglad ! ", "words") == 4


def test_an_unknown_length_unit_is_an_error():
    with pytest.raises(ValueError, match="unknown length unit 'lines'"):
        reply_length("i am glad !", "lines")
