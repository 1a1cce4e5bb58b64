"""Dialogue rows -> generation prompts: the windows, the target emotion and the exact rendered string."""

import datasets
import pytest

from emotion_dpo.chat import load_chat_format
from emotion_dpo.errors import PipelineError
from emotion_dpo.models import load_tokenizer, use_unsloth
from emotion_dpo.prompts import build_prompts, window_starts


def turn(role, emotion, dialog):
    return {"role": role, "content": {"emotion": emotion, "dialog": dialog}}


DIALOGUE = [
    turn("user", "neutral", "where is the station ?"),
    turn("assistant", "neutral", "it is on the second floor ."),
    turn("user", "sadness", "my dog died last week ."),
    turn("assistant", "sadness", "i am so sad , i miss her every day ."),
    turn("user", "happiness", "you made my day !"),
    turn("assistant", "happiness", "i love it , thank you so much !"),
]


@pytest.fixture(scope="module")
def tokenizer(demo_world):
    return load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"),
                          load_chat_format("args/chat_template.json"))


def test_the_rendered_prompt_is_exactly_the_template_output(tokenizer):
    data = datasets.Dataset.from_list([{"prompt": DIALOGUE}])
    (prompt,) = build_prompts(data, tokenizer, "be kind .", num_turns_history=1)
    assert prompt.target_emotion == "happiness"
    assert prompt.text == (
        "<s><<SYS>> be kind . <</SYS>> "
        "[INST] [EMOTION] sadness [/EMOTION] my dog died last week . [/INST] "
        "[EMOTION] sadness [/EMOTION] i am so sad , i miss her every day . </s>"
        "[INST] [EMOTION] happiness [/EMOTION] you made my day ! [/INST] "
        "[EMOTION] happiness [/EMOTION]"
    )


def test_history_length_follows_num_turns_history(tokenizer):
    data = datasets.Dataset.from_list([{"prompt": DIALOGUE}])
    (prompt,) = build_prompts(data, tokenizer, "", num_turns_history=0)
    assert prompt.text == ("<s>[INST] [EMOTION] happiness [/EMOTION] you made my day ! [/INST] "
                           "[EMOTION] happiness [/EMOTION]")
    (prompt,) = build_prompts(data, tokenizer, "", num_turns_history=2)
    assert prompt.text.startswith("<s>[INST] [EMOTION] neutral [/EMOTION] where is the station ?")


def test_short_dialogues_are_skipped_and_num_prompts_caps_the_count(tokenizer):
    data = datasets.Dataset.from_list([{"prompt": DIALOGUE[:2]}, {"prompt": DIALOGUE}, {"prompt": DIALOGUE}])
    prompts = build_prompts(data, tokenizer, "", num_turns_history=2, num_prompts=1)
    assert [(p.index, p.dialogue) for p in prompts] == [(0, 1)]


def test_the_last_window_by_default_or_every_window():
    assert window_starts(DIALOGUE, 4, all_windows=False) == [2]
    assert window_starts(DIALOGUE, 4, all_windows=True) == [0, 2]
    assert window_starts(DIALOGUE[:5], 4, all_windows=True) == [0]  # must end on an assistant turn
    assert window_starts(DIALOGUE[:3], 4, all_windows=True) == []


def test_unsloth_true_without_unsloth_installed_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PipelineError, match="use_unsloth is true but unsloth is not installed"):
        use_unsloth(True)
    assert use_unsloth("auto") is False
    assert use_unsloth(False) is False
