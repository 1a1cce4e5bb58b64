"""Dialogue rows -> generation prompts: the windows, the target emotion and the exact rendered string, as the
reference project's template renders it."""

import json
import subprocess
from pathlib import Path

import datasets
import pytest

from emotion_dpo.template import load_chat_format
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


# Golden strings, derived by hand from the rules of the reference's template Llama2_OUT_INST_UNI.json
# (hermeschen1116/emotion-chat-bot, commit 288acc1, src/bot/response_generator/chat_template/; the same template at
# src/scripts/response_generator/chat_templates/ at HEAD), rendered with add_generation_prompt as its
# data_process_dpo.py does:
#   user turn:        bos + '[INST] [EMOTION] ' + emotion + ' [/EMOTION] ' + dialog.strip()
#   first user turn with a non-empty system prompt:
#                     bos + '[INST]<<SYS>>\n' + system + '\n<</SYS>>\n\n' + '[EMOTION] ' + emotion + ' [/EMOTION] ' + dialog.strip()
#   assistant turn:   ' [/INST] [EMOTION] ' + emotion + ' [/EMOTION] ' + dialog.strip() + ' ' + eos + '\n'
#   generation prompt (the last assistant turn): ' [/INST] [EMOTION] ' + target + ' [/EMOTION] '
PADDED = [turn(t["role"], t["content"]["emotion"], f"  {t['content']['dialog']} \n") for t in DIALOGUE]
GOLDEN = {
    (1, "be kind ."): "<s>[INST]<<SYS>>\nbe kind .\n<</SYS>>\n\n[EMOTION] sadness [/EMOTION] my dog died last week ."
                      " [/INST] [EMOTION] sadness [/EMOTION] i am so sad , i miss her every day . </s>\n"
                      "<s>[INST] [EMOTION] happiness [/EMOTION] you made my day ! [/INST] [EMOTION] happiness [/EMOTION] ",
    (1, ""): "<s>[INST] [EMOTION] sadness [/EMOTION] my dog died last week ."
             " [/INST] [EMOTION] sadness [/EMOTION] i am so sad , i miss her every day . </s>\n"
             "<s>[INST] [EMOTION] happiness [/EMOTION] you made my day ! [/INST] [EMOTION] happiness [/EMOTION] ",
    (2, "be kind ."): "<s>[INST]<<SYS>>\nbe kind .\n<</SYS>>\n\n[EMOTION] neutral [/EMOTION] where is the station ?"
                      " [/INST] [EMOTION] neutral [/EMOTION] it is on the second floor . </s>\n"
                      "<s>[INST] [EMOTION] sadness [/EMOTION] my dog died last week ."
                      " [/INST] [EMOTION] sadness [/EMOTION] i am so sad , i miss her every day . </s>\n"
                      "<s>[INST] [EMOTION] happiness [/EMOTION] you made my day ! [/INST] [EMOTION] happiness [/EMOTION] ",
    (2, ""): "<s>[INST] [EMOTION] neutral [/EMOTION] where is the station ?"
             " [/INST] [EMOTION] neutral [/EMOTION] it is on the second floor . </s>\n"
             "<s>[INST] [EMOTION] sadness [/EMOTION] my dog died last week ."
             " [/INST] [EMOTION] sadness [/EMOTION] i am so sad , i miss her every day . </s>\n"
             "<s>[INST] [EMOTION] happiness [/EMOTION] you made my day ! [/INST] [EMOTION] happiness [/EMOTION] ",
}


@pytest.mark.parametrize("history, system", list(GOLDEN))
@pytest.mark.parametrize("dialogue", [DIALOGUE, PADDED], ids=["plain", "dialog needing stripping"])
def test_the_rendered_prompt_is_the_reference_templates_rendering(tokenizer, history, system, dialogue):
    data = datasets.Dataset.from_list([{"prompt": dialogue}])
    (prompt,) = build_prompts(data, tokenizer, system, num_turns_history=history)
    assert prompt.target_emotion == "happiness"
    assert prompt.text == GOLDEN[history, system]


def reference_format_file(path, template):
    """A chat template file in the reference's own format (the keys of Llama2_OUT_INST_UNI.json, commit 288acc1)."""
    path.write_text(json.dumps({"template": template, "instruction": "[INST]", "response": "[/EMOTION]",
                                "special_tokens": {"pad_token": "<pad>", "additional_special_tokens":
                                                   ["[INST]", "[/INST]", "[EMOTION]", "[/EMOTION]"]}}))
    return path


REFERENCE_MIRROR = Path("/work/.mirror/hermeschen1116+emotion-chat-bot/repo")


def reference_files(tmp_path):
    """The project's jinja in the reference's file format; and, where a mirror of the reference is at hand, the
    reference's own file as it is (not in CI: the test does not depend on it)."""
    files = [reference_format_file(tmp_path / "ours_in_their_format.json",
                                   load_chat_format("args/chat_template.json").template)]
    if REFERENCE_MIRROR.exists():
        shown = subprocess.run(["git", "-C", str(REFERENCE_MIRROR), "show", "288acc1:src/bot/response_generator/"
                                "chat_template/Llama2_OUT_INST_UNI.json"], capture_output=True, text=True)
        if shown.returncode == 0:
            (tmp_path / "Llama2_OUT_INST_UNI.json").write_text(shown.stdout)
            files.append(tmp_path / "Llama2_OUT_INST_UNI.json")
    return files


def test_a_template_file_in_the_reference_format_loads_and_renders_as_the_projects(demo_world, tmp_path):
    data = datasets.Dataset.from_list([{"prompt": PADDED}, {"prompt": DIALOGUE[:4]}])
    for path in reference_files(tmp_path):
        chat = load_chat_format(path)
        assert (chat.special_tokens, chat.pad_token) == (("[INST]", "[/INST]", "[EMOTION]", "[/EMOTION]"), "<pad>")
        theirs = load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"), chat)
        ours = load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"),
                              load_chat_format("args/chat_template.json"))
        for history, system in GOLDEN:
            mine = build_prompts(data, ours, system, num_turns_history=history, all_windows=True)
            them = build_prompts(data, theirs, system, num_turns_history=history, all_windows=True)
            assert [p.text for p in mine] == [p.text for p in them] and mine
            assert [p.ids for p in mine] == [p.ids for p in them]


def test_a_jinja_error_in_the_template_file_names_the_file(demo_world, tmp_path):
    broken = reference_format_file(tmp_path / "broken.json", "{% for m in messages %}{{ m['role'] }")
    with pytest.raises(PipelineError, match=r"broken.json: key 'template': jinja syntax error"):
        load_chat_format(broken)
    project = json.loads(Path("args/chat_template.json").read_text())
    (tmp_path / "unclosed.json").write_text(json.dumps({**project, "chat_template": "{% if messages %}x"}))
    with pytest.raises(PipelineError, match=r"unclosed.json: key 'chat_template': jinja syntax error"):
        load_chat_format(tmp_path / "unclosed.json")
    # a runtime error: the template's own check that roles alternate
    tokenizer = load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"),
                               load_chat_format("args/chat_template.json"))
    data = datasets.Dataset.from_list([{"prompt": [DIALOGUE[0], DIALOGUE[2], *DIALOGUE[2:4]]}])
    with pytest.raises(PipelineError, match=r"args/chat_template.json: the template failed to render a conversation: "
                                            r"the turns after the system prompt must alternate"):
        build_prompts(data, tokenizer, "", num_turns_history=1)


def test_an_adapter_tokenizer_shipping_another_template_warns_once_naming_both(demo_world, tmp_path):
    import shutil
    import warnings

    adapter = tmp_path / "adapter"
    shutil.copytree(demo_world / "sft_adapter", adapter)
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    (adapter / "chat_template.jinja").unlink(missing_ok=True)
    config["chat_template"] = "{% for m in messages %}{{ m['content']['dialog'] }}{% endfor %}"
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            load_tokenizer(str(demo_world / "base"), str(adapter), load_chat_format("args/chat_template.json"))
    shipped = [w for w in caught if "ships a chat template" in str(w.message)]
    assert len(shipped) == 1
    assert str(adapter) in str(shipped[0].message) and "args/chat_template.json" in str(shipped[0].message)
    with warnings.catch_warnings(record=True) as caught:  # the demo adapter ships the configured one: no warning
        warnings.simplefilter("always")
        load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"),
                       load_chat_format("args/chat_template.json"))
    assert not [w for w in caught if "ships a chat template" in str(w.message)]


def test_history_length_follows_num_turns_history(tokenizer):
    data = datasets.Dataset.from_list([{"prompt": DIALOGUE}])
    (prompt,) = build_prompts(data, tokenizer, "", num_turns_history=0)
    assert prompt.text == "<s>[INST] [EMOTION] happiness [/EMOTION] you made my day ! [/INST] [EMOTION] happiness [/EMOTION] "


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
