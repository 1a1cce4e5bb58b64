"""chat.py, piped: the SFT and DPO adapters answer side by side on one base, each reply with its classifier labels
and reward parts; /emotion switches the requested emotion; an unknown emotion is a clear error and the session goes
on; each model's history is kept as num_turns_history says, in the chat template."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "you are a friendly chatbot , reply in the requested emotion ."  # args/demo/evaluate_arg.json
REPLY = re.compile(r"^  (SFT|DPO): (.*)\n +emotion (\S+) ([\d.]+) \| gibberish (.+?) ([\d.]+) \| length (\S+) \| "
                   r"reward: emotion (\S+), length (\S+), gibberish (\S+), total (\S+)$", re.M)


@pytest.fixture(scope="module")
def other_adapter(demo_world, tmp_path_factory):
    """A second adapter that answers differently: the SFT adapter with its LoRA B matrices moved (seeded)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("adapters") / "other"
    shutil.copytree(demo_world / "sft_adapter", folder)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = tensor + 0.5 * torch.randn(tensor.shape, generator=generator)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def session(demo_world, other_adapter):
    w = demo_world
    lines = ["hello there , how are you ?", "/emotion happiness", "what a nice day !", "/emotion joyful", "/emotion",
             "see you tomorrow ."]
    args = [sys.executable, str(ROOT / "chat.py"), "--config", str(ROOT / "args/demo/evaluate_arg.json"),
            "--show-prompts"]
    for override in [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dpo_adapter={other_adapter}",
                     f"emotion_classifier={w / 'emotion_classifier'}", f"gibberish_detector={w / 'gibberish_detector'}",
                     f"chat_template={ROOT / 'args/chat_template.json'}", "wandb.mode=disabled"]:
        args += ["--set", override]
    result = subprocess.run(args, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def turns_of(stdout: str) -> list[str]:
    return re.split(r"^you \(", stdout, flags=re.M)[1:]


def test_each_line_gets_a_reply_from_both_adapters_with_labels_and_reward_parts(session):
    turns = turns_of(session.stdout)
    assert len(turns) == 3
    replies = []
    for text in turns:
        found = REPLY.findall(text)
        assert [f[0] for f in found] == ["SFT", "DPO"], text
        replies.append({f[0]: f for f in found})
    requested = ["neutral", "happiness", "happiness"]
    for turn, want in zip(replies, requested):
        for name, text, label, conf, glabel, gconf, length, emotion, length_part, gibberish, total in turn.values():
            # the printed parts follow the reward rules (args/demo/evaluate_arg.json: [0.4, 0.25, 0.35] + 0.001)
            assert float(emotion) == pytest.approx(float(conf) * 10 if label == want else 0.0, abs=0.06)
            if glabel == "clean":
                assert float(gibberish) == pytest.approx(float(gconf) * 10, abs=0.06)
            assert float(total) == pytest.approx(0.4 * float(emotion) + 0.25 * float(length_part)
                                                 + 0.35 * float(gibberish) + 0.001, abs=0.02)
            assert int(length) == len(text)
    assert any(t["SFT"][1] != t["DPO"][1] for t in replies)  # two adapters, two models


def test_the_emotion_command_switches_what_both_models_are_asked_for(session):
    turns = turns_of(session.stdout)
    assert "  requested emotion: neutral" in turns[0]
    assert "  requested emotion: happiness" in turns[1] and "  requested emotion: happiness" in turns[2]
    for turn in turns[1:]:
        for name in ("SFT", "DPO"):
            prompt = json.loads(re.search(rf"^  {name} prompt: (.*)$", turn, re.M).group(1))
            assert prompt.endswith(" [/INST] [EMOTION] happiness [/EMOTION] ")


def test_an_unknown_emotion_is_a_clear_error_and_the_session_goes_on(session):
    assert "error: unknown emotion 'joyful'; choose one of neutral, anger, disgust, fear, happiness, sadness, " \
           "surprise" in session.stderr
    assert "Traceback" not in session.stderr
    # "/emotion happiness", then "/emotion" after the error: still happiness
    assert [line for line in session.stdout.splitlines() if line == "requested emotion: happiness"] == \
        ["requested emotion: happiness"] * 2
    assert "see you tomorrow ." in turns_of(session.stdout)[2]


def test_each_model_keeps_its_own_history_in_the_template_as_num_turns_history_says(session):
    turns = turns_of(session.stdout)
    user = [re.match(r"(\S+) [\d.]+\): (.*)", t).groups() for t in turns]  # (classified emotion, text)
    said = [{f[0]: f[1] for f in REPLY.findall(t)} for t in turns]
    for name in ("SFT", "DPO"):
        prompts = [json.loads(re.search(rf"^  {name} prompt: (.*)$", t, re.M).group(1)) for t in turns]
        # the reference template's rules written out by hand (hermeschen1116/emotion-chat-bot 288acc1,
        # Llama2_OUT_INST_UNI.json): the system prompt inside the first [INST], BOS before every user turn,
        # ' ' + EOS + newline after a reply, the generation prompt ending in a space
        opening = f"<s>[INST]<<SYS>>\n{SYSTEM}\n<</SYS>>\n\n"
        # turn 1: the system prompt, the user turn, the open reply header
        assert prompts[0] == f"{opening}[EMOTION] {user[0][0]} [/EMOTION] {user[0][1]} [/INST] [EMOTION] neutral [/EMOTION] "
        # turn 2: one earlier pair (num_turns_history 1), with this model's own reply
        assert prompts[1] == (f"{opening}[EMOTION] {user[0][0]} [/EMOTION] {user[0][1]} "
                              f"[/INST] [EMOTION] neutral [/EMOTION] {said[0][name]} </s>\n"
                              f"<s>[INST] [EMOTION] {user[1][0]} [/EMOTION] {user[1][1]} [/INST] [EMOTION] happiness "
                              "[/EMOTION] ")
        # turn 3: the first pair has left the window
        assert user[0][1] not in prompts[2] and f"{user[1][1]} [/INST] [EMOTION] happiness [/EMOTION] " \
                                                f"{said[1][name]} </s>\n" in prompts[2]


def test_the_emotion_asked_for_first_is_neutral_or_else_the_first_label():
    from emotion_dpo.chat import default_emotion

    assert default_emotion(["anger", "Neutral", "joy"]) == "neutral"
    assert default_emotion(["Joy", "anger"]) == "joy"  # no neutral: the classifier's output 0
