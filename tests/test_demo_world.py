"""The offline demo world: deterministic, in the real formats, and as good (and as flawed) as it says."""

import json
import os
import random
import select
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from emotion_dpo import EMOTIONS
from emotion_dpo.demo_world import DEMO_SYSTEM_PROMPT, _vocabulary, build_demo_world, classifier_accuracy, classifier_texts


def test_building_twice_with_the_same_seed_gives_identical_files(tmp_path):
    build_demo_world(tmp_path / "a", seed=3, small=True)
    build_demo_world(tmp_path / "b", seed=3, small=True)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for name in files_a:
        if name.name == "state.json":
            continue  # datasets writes a random fingerprint into it; the rows are compared below
        if name.name == "figures.json":
            figures_a, figures_b = (json.loads((tmp_path / d / name).read_text()) for d in "ab")
            assert figures_a.pop("build_seconds") > 0 and figures_b.pop("build_seconds") > 0
            assert figures_a == figures_b
            continue
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    rows_a = datasets.load_from_disk(str(tmp_path / "a" / "dialogues"))["train"]["prompt"]
    rows_b = datasets.load_from_disk(str(tmp_path / "b" / "dialogues"))["train"]["prompt"]
    assert rows_a == rows_b


def test_dialogues_are_in_the_reference_format(demo_world):
    splits = datasets.load_from_disk(str(demo_world / "dialogues"))
    assert set(splits) == {"train", "validation", "test"}
    for turns in splits["test"]["prompt"][:50]:
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        for turn in turns:
            assert set(turn["content"]) == {"emotion", "dialog"}
            assert turn["content"]["emotion"] in EMOTIONS
            assert turn["content"]["dialog"].strip()[-1] in "!.?"


# The emotion classifier is saved with generic names (ids in the reference's order), so that the pipeline's label
# mapping runs in every demo and test; the gibberish detector with its own.
@pytest.mark.parametrize("name, column, labels", [("emotion_classifier", 0, tuple(f"LABEL_{i}" for i in range(7))),
                                                   ("gibberish_detector", 2, ("clean", "mild gibberish", "word salad", "noise"))])
def test_classifiers_reach_their_reported_accuracy_on_fresh_held_out_text(demo_world, name, column, labels):
    figures = json.loads((demo_world / "figures.json").read_text())
    assert figures[f"{name}_accuracy"] >= 0.9
    fresh = classifier_texts(random.Random(12345), 300, _vocabulary())
    accuracy = classifier_accuracy(demo_world / name, fresh[column], fresh[column + 1])
    assert accuracy >= figures[f"{name}_accuracy"] - 0.05
    config = json.loads((demo_world / name / "config.json").read_text())
    assert tuple(config["id2label"][str(i)] for i in range(len(labels))) == tuple(labels)


def test_sft_adapter_loads_on_the_base_and_replies_in_the_template_format(demo_world):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emotion_dpo.template import install_chat_format, load_chat_format, render_chat

    tokenizer = AutoTokenizer.from_pretrained(demo_world / "sft_adapter")
    install_chat_format(tokenizer, load_chat_format("args/chat_template.json"))
    base = AutoModelForCausalLM.from_pretrained(demo_world / "base")
    assert base.get_input_embeddings().num_embeddings < len(tokenizer)  # the base lacks the template tokens
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, demo_world / "sft_adapter").eval()
    messages = [{"role": "system", "content": {"emotion": "", "dialog": DEMO_SYSTEM_PROMPT}},
                {"role": "user", "content": {"emotion": "happiness", "dialog": "you made my day !"}},
                {"role": "assistant", "content": {"emotion": "happiness", "dialog": ""}}]
    prompt = render_chat(tokenizer, messages)
    assert prompt.endswith("[/INST] [EMOTION] happiness [/EMOTION] ")
    batch = tokenizer([prompt[:-1]] * 8, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    vocabulary = set(_vocabulary())
    complete = 0
    for reply in replies:
        words = reply.split()
        assert words and set(words) <= vocabulary  # plain words: no template tokens leak into replies
        complete += words[-1] in ("!", ".", "?")
    assert complete >= 4


def test_the_base_tokenizer_behaves_like_llama_2_where_it_matters(demo_world):
    """A BOS added by default, and SentencePiece-style spaces: a space at the prompt/reply boundary changes the
    tokens, so a prompt that ends in its space gives the model a lone `▁` it never saw before a reply."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(demo_world / "base")
    assert type(base).__name__ == "LlamaTokenizer"
    assert base("i am so happy")["input_ids"] == [base.bos_token_id] + base.convert_tokens_to_ids(
        ["▁i", "▁am", "▁so", "▁happy"])
    sft = AutoTokenizer.from_pretrained(demo_world / "sft_adapter")
    assert sft.convert_ids_to_tokens(sft("[/EMOTION] ", add_special_tokens=False)["input_ids"]) == ["[/EMOTION]", "▁"]
    assert sft.convert_ids_to_tokens(sft("[/EMOTION] i am", add_special_tokens=False)["input_ids"]) == [
        "[/EMOTION]", "▁i", "▁am"]
    # the template's BOS text is the BOS token: with the tokenizer's defaults a second one is added
    assert sft("<s>[INST]")["input_ids"][:2] == [sft.bos_token_id] * 2


def test_sft_model_matches_the_requested_emotion_only_part_of_the_time(demo_world):
    """Measured here, not read from figures.json: one sampled reply for each of 100 held-out prompts, from
    transformers' generate on the prompt's ids, labelled by the classifier with the reference's names by position."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from emotion_dpo.template import install_chat_format, load_chat_format
    from emotion_dpo.prompts import build_prompts

    tokenizer = AutoTokenizer.from_pretrained(demo_world / "sft_adapter")
    install_chat_format(tokenizer, load_chat_format("args/chat_template.json"))
    base = AutoModelForCausalLM.from_pretrained(demo_world / "base")
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, demo_world / "sft_adapter").eval()
    test = datasets.load_from_disk(str(demo_world / "dialogues"))["test"]
    prompts = build_prompts(test, tokenizer, DEMO_SYSTEM_PROMPT, 1, num_prompts=100)
    torch.manual_seed(0)
    replies = []
    for prompt in prompts:
        ids = torch.tensor([prompt.ids])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 max_new_tokens=20, min_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    names = ["neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"]  # the reference's order
    classify = pipeline("text-classification", model=str(demo_world / "emotion_classifier"), device="cpu",
                        model_kwargs={"id2label": dict(enumerate(names)),
                                      "label2id": {name: i for i, name in enumerate(names)}})
    labels = [result["label"] for result in classify(replies, batch_size=50)]
    accuracy = sum(label == p.target_emotion for label, p in zip(labels, prompts)) / len(prompts)
    assert 0.2 <= accuracy <= 0.65, accuracy  # right only part of the time: DPO has work to do


BUILDER = """
import os, signal
from emotion_dpo.demo_world import second_process

def busy():  # the classifier branch, working when its build is killed
    print(os.getpid(), flush=True)
    signal.pause()

if __name__ == "__main__":
    second_process().submit(busy)
    signal.pause()
"""


def test_the_builds_second_process_dies_when_the_build_is_killed(tmp_path):
    """kill -9 of a build must leave nothing writing into its staging folder (the next build makes it again)."""
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    root = str(Path(__file__).resolve().parents[1])
    builder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
    line = builder.stdout.readline()  # the second process says its PID from inside its work
    assert line.strip().isdigit(), builder.stderr.read()[-3000:]
    worker = int(line)
    exited, ready = os.pidfd_open(worker), False
    try:
        builder.kill()
        builder.wait()
        ready, _, _ = select.select([exited], [], [], 120)  # readable once the worker has exited
        assert ready, "the second process worked on after its build was killed"
    finally:
        os.close(exited)
        if not ready:
            os.kill(worker, signal.SIGKILL)
