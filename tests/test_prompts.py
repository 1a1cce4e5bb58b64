"""Dialogue rows -> generation prompts: the windows, the target emotion and the exact rendered string, as the
reference project's template renders it."""

import json
import re
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


@pytest.fixture
def tokenizer(demo_tokenizer):
    return demo_tokenizer


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


# The reference's template file as it is, byte for byte: hermeschen1116/emotion-chat-bot (MIT licence), commit
# 288acc1, src/bot/response_generator/chat_template/Llama2_OUT_INST_UNI.json.
REFERENCE_TEMPLATE = Path(__file__).parent / "data" / "Llama2_OUT_INST_UNI.json"


def reference_files(tmp_path):
    """The reference's own template file, and the project's jinja in the reference's file format."""
    return [REFERENCE_TEMPLATE, reference_format_file(tmp_path / "ours_in_their_format.json",
                                                      load_chat_format("args/chat_template.json").template)]


def test_the_references_own_template_renders_the_hand_written_prompts(demo_world):
    theirs = load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"), load_chat_format(REFERENCE_TEMPLATE))
    for dialogue in (DIALOGUE, PADDED):
        data = datasets.Dataset.from_list([{"prompt": dialogue}])
        for (history, system), golden in GOLDEN.items():
            (prompt,) = build_prompts(data, theirs, system, num_turns_history=history)
            assert prompt.text == golden


def test_a_template_file_in_the_reference_format_loads_and_renders_as_the_projects(demo_world, tokenizer, tmp_path):
    data = datasets.Dataset.from_list([{"prompt": PADDED}, {"prompt": DIALOGUE[:4]}])
    for path in reference_files(tmp_path):
        chat = load_chat_format(path)
        assert (chat.special_tokens, chat.pad_token) == (("[INST]", "[/INST]", "[EMOTION]", "[/EMOTION]"), "<pad>")
        theirs = load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"), chat)
        ours = tokenizer
        for history, system in GOLDEN:
            mine = build_prompts(data, ours, system, num_turns_history=history, all_windows=True)
            them = build_prompts(data, theirs, system, num_turns_history=history, all_windows=True)
            assert [p.text for p in mine] == [p.text for p in them] and mine
            assert [p.ids for p in mine] == [p.ids for p in them]


def test_a_jinja_error_in_the_template_file_names_the_file(tokenizer, tmp_path):
    broken = reference_format_file(tmp_path / "broken.json", "{% for m in messages %}{{ m['role'] }")
    with pytest.raises(PipelineError, match=r"broken.json: key 'template': jinja syntax error"):
        load_chat_format(broken)
    project = json.loads(Path("args/chat_template.json").read_text())
    (tmp_path / "unclosed.json").write_text(json.dumps({**project, "chat_template": "{% if messages %}x"}))
    with pytest.raises(PipelineError, match=r"unclosed.json: key 'chat_template': jinja syntax error"):
        load_chat_format(tmp_path / "unclosed.json")
    # a runtime error: the template's own check that roles alternate
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


# ---------------------------------------------------------------- rows, windows and the run's own prompt numbers

from emotion_dpo.config import GenerateConfig, load_config  # noqa: E402
from emotion_dpo.prompts import build_messages, check_dialogues, has_a_line, load_prompts, load_rows  # noqa: E402

EMOTIONS = ["neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"]


def numbered(n):
    """n dialogues, dialogue i's every dialog saying 'line i .'"""
    return [{"prompt": [turn(t["role"], t["content"]["emotion"], f"line {i} .") for t in DIALOGUE]} for i in range(n)]


def prompts_of(demo_world, tmp_path, rows, *overrides):
    data = tmp_path / "dialogues.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = demo_world
    cfg = load_config(GenerateConfig, "args/demo/generate_preferences_arg.json", [
        f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dataset={data}",
        f"emotion_classifier={w / 'emotion_classifier'}", f"gibberish_detector={w / 'gibberish_detector'}",
        f"output_dir={tmp_path / 'out'}", *overrides])
    return load_prompts(cfg)[1]


def test_skip_prompts_leaves_out_the_first_ones_and_numbers_the_rest_from_0(demo_world, tmp_path):
    prompts = prompts_of(demo_world, tmp_path, numbered(6), "skip_prompts=2", "num_prompts=3")
    assert [(p.index, p.dialogue) for p in prompts] == [(0, 2), (1, 3), (2, 4)]
    assert "line 2 ." in prompts[0].text
    with pytest.raises(PipelineError, match="skip_prompts 6 leaves no prompt"):
        prompts_of(demo_world, tmp_path, numbered(6), "skip_prompts=6", "num_prompts=null")
    assert [p.dialogue for p in prompts_of(demo_world, tmp_path, numbered(6), "skip_prompts=5", "num_prompts=null")] \
        == [5]


def test_dataset_emotions_compare_case_insensitively_with_emotion_labels():
    rows = datasets.Dataset.from_list([{"prompt": [turn("user", "Neutral", "hi ."), turn("assistant", "HAPPINESS", "hey !")]}])
    check_dialogues(rows, "d.jsonl", EMOTIONS)
    check_dialogues(datasets.Dataset.from_list([{"prompt": [turn("user", "neutral", "hi ."),
                                                             turn("assistant", "happiness", "hey !")]}]),
                    "d.jsonl", [e.capitalize() for e in EMOTIONS])  # labels written as the design document does
    with pytest.raises(PipelineError, match="d.jsonl: row 0, turn 1: unknown emotion 'joy'"):
        check_dialogues(datasets.Dataset.from_list([{"prompt": [turn("user", "neutral", "hi ."),
                                                                 turn("assistant", "joy", "hey !")]}]), "d.jsonl", EMOTIONS)


@pytest.mark.parametrize("turns, message", [
    ([turn("user", "neutral", "a ."), turn("user", "neutral", "b .")], "row 0, turn 1: a second 'user' turn in a row"),
    ([turn("user", "neutral", 5), turn("assistant", "neutral", "b .")], "row 0, turn 0: dialog is 5, expected the text"),
])
def test_a_row_breaking_the_dialogue_format_is_refused(turns, message):
    class Rows(dict):  # a dataset's column access; arrow itself would refuse a number among strings
        column_names = ["prompt"]

    with pytest.raises(PipelineError, match=message):
        check_dialogues(Rows(prompt=[turns]), "d.jsonl", EMOTIONS)


def test_a_turn_is_long_above_2000_characters(recwarn):
    at_limit = [turn("user", "neutral", "a" * 2000), turn("assistant", "neutral", "b .")]
    check_dialogues(datasets.Dataset.from_list([{"prompt": at_limit}]), "d.jsonl", EMOTIONS)
    assert not recwarn.list
    with pytest.warns(UserWarning, match="1 turns are longer than 2000 characters .longest: row 0, turn 0, 2001"):
        check_dialogues(datasets.Dataset.from_list([{"prompt": [turn("user", "neutral", "a" * 2001),
                                                                 turn("assistant", "neutral", "b .")]}]), "d.jsonl", EMOTIONS)


def test_split_names_joined_with_plus_may_have_spaces(tmp_path):
    folder = tmp_path / "dialogues"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(numbered(2)),
                          "validation": datasets.Dataset.from_list(numbered(1))}).save_to_disk(str(folder))
    assert len(load_rows(str(folder), "train + validation", "dialogues")) == 3


def test_a_file_of_blank_lines_has_no_line(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    assert not has_a_line(tmp_path / "blank.jsonl")
    (tmp_path / "one.jsonl").write_text("\n{}\n")
    assert has_a_line(tmp_path / "one.jsonl")


@pytest.mark.parametrize("name", ["dialogues.json", "dialogues.txt"])
@pytest.mark.parametrize("second_line, message", [
    ('{"prompt": "caf\xe9"}\n'.encode("latin-1"), r":2: not UTF-8 \(byte 0xe9 at column 16\); save the dialogues file as "
                                                 "UTF-8"),
    (b'{"prompt": [', r":2: not a JSON object \(.*\); it is the last line and looks cut short"),
], ids=["not-utf8", "cut-short"])
def test_a_dialogue_file_of_any_suffix_is_checked_as_json_lines(tmp_path, name, second_line, message):
    data = tmp_path / name
    data.write_text(json.dumps(numbered(1)[0]) + "\n")
    assert len(load_rows(str(data), "train", "dialogues")) == 1  # read as JSON lines, whatever the suffix
    data.write_bytes(json.dumps(numbered(1)[0]).encode() + b"\n" + second_line)
    with pytest.raises(PipelineError, match=re.escape(str(data)) + message):
        load_rows(str(data), "train", "dialogues")


def test_windows_start_on_a_user_turn_and_end_on_an_assistant_turn():
    offset = [turn("assistant", "neutral", "hello .")] + DIALOGUE  # turn 0 is an assistant turn
    assert window_starts(offset, 4, all_windows=True) == [1, 3]
    assert window_starts(DIALOGUE, 6, all_windows=True) == [0]  # the window may end on the very last turn


def test_the_target_is_the_emotion_of_the_reply_not_of_the_user_turn():
    messages, target = build_messages([turn("user", "anger", "why ?"), turn("assistant", "fear", "oh no .")], "be kind .")
    assert target == "fear" and messages[-1] == turn("assistant", "fear", "")
    assert messages[0] == {"role": "system", "content": {"emotion": "", "dialog": "be kind ."}}


def test_the_messages_hold_a_system_turn_the_history_and_the_target_reply_empty():
    messages, target = build_messages(DIALOGUE[2:6], "")
    assert target == "happiness"
    assert messages == [{"role": "system", "content": {"emotion": "", "dialog": ""}}, *DIALOGUE[2:5],
                        {"role": "assistant", "content": {"emotion": "happiness", "dialog": ""}}]


def test_each_prompt_names_its_dialogue_row_and_num_prompts_is_exact(tokenizer):
    data = datasets.Dataset.from_list([{"prompt": DIALOGUE[:3]}, {"prompt": DIALOGUE}, {"prompt": DIALOGUE}])
    prompts = build_prompts(data, tokenizer, "", num_turns_history=1, all_windows=True, num_prompts=3)
    assert [(p.index, p.dialogue) for p in prompts] == [(0, 1), (1, 1), (2, 2)]
    (only,) = build_prompts(datasets.Dataset.from_list([{"prompt": DIALOGUE[:3]}]), tokenizer, "", num_turns_history=0)
    # num_turns_history 0: a window of 2 turns, the user's and the reply asked for
    assert only.text == "<s>[INST] [EMOTION] neutral [/EMOTION] where is the station ? [/INST] [EMOTION] neutral [/EMOTION] "
