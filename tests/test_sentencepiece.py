"""The Llama-2 tokenizer: every folder layout conditions exactly as SentencePiece tokenizes the training-format
conversation (the ids the SFT adapter was trained on), or is refused before any model loads; text-only preference
pairs end as SFT saw every reply end.

SentencePiece's side is computed here with the `sentencepiece` library itself: the text split at the added special
tokens, each piece encoded by SentencePiece, the dummy `▁` prefix only at the start of the text (what the reference's
SFT tokenizer, converted from the slow one with legacy=False, does)."""

import json
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from emotion_dpo.dpo_data import text_row_ids
from emotion_dpo.errors import PipelineError
from emotion_dpo.models import load_tokenizer
from emotion_dpo.template import context_ids, load_chat_format, render_chat

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "args" / "chat_template.json"
# The reference's special tokens: pad_token and additional_special_tokens of
# hermeschen1116/emotion-chat-bot, commit 1228505, src/scripts/response_generator/chat_templates/Llama2_OUT_INST_UNI.json
REFERENCE_SPECIAL = ["<pad>", "[INST]", "[/INST]", "[EMOTION]", "[/EMOTION]"]


def turn(role, emotion, dialog):
    return {"role": role, "content": {"emotion": emotion, "dialog": dialog}}


# Each has a doubled space, a newline inside a turn, punctuation right after a marker, non-ASCII text and an emoji.
DIALOGUES = [
    ([turn("system", "", "you are a friendly chatbot , reply in the requested emotion ."),
      turn("user", "neutral", "the meeting  is at ten ."), turn("assistant", "happiness", "great ,\nsee you there !"),
      turn("user", "surprise", "?! café at nine 😀")],
     "anger", "!  that is outrageous ,\ni hate it 😀 über"),
    ([turn("system", "", ""), turn("user", "fear", "!i am  scared\nof the dark . naïve 🙂")],
     "sadness", "oh dear ,  i miss her . 🐶\ncafé"),
]


def sentencepiece_ids(model_file: Path, text: str, special: dict) -> list[int]:
    """SentencePiece's own ids for a text in the training format (legacy=False's rule, written out)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    first = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    proto.normalizer_spec.add_dummy_prefix = False
    inner = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    pieces = [p for p in re.split("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")", text) if p]
    ids, at = [], 0
    for piece in pieces:
        ids += [special[piece]] if piece in special else (first if at == 0 else inner).encode(piece)
        at += len(piece)
    return ids


def sentencepiece_folder(demo_world, folder: Path, layout: str) -> Path:
    """A tokenizer folder laid out as transformers 4.45 / the Hub would leave it, from the demo world's tokenizer.model
    with the reference's special tokens."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    model_file = demo_world / "base" / "tokenizer.model"
    shutil.copytree(demo_world / "sft_adapter", folder)  # tokenizer.json (legacy=False) + tokenizer.model, tokens added
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if layout.startswith("hub llama-2 tokenizer.json"):  # normalizer Prepend ▁ + Replace, no pre-tokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                                      normalizers.Replace(" ", "▁")])
        tokenizer.backend_tokenizer.pre_tokenizer = None
        (folder / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str())
        config.pop("legacy", None)
        if layout.endswith("as it is"):  # a generic class: transformers keeps the file's normalizer
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        config["legacy"] = layout.endswith("legacy: true")
    if layout.startswith("slow"):
        (folder / "tokenizer.json").unlink()
    config_file.write_text(json.dumps(config))
    assert (folder / "tokenizer.model").read_bytes() == model_file.read_bytes()
    return folder


LAYOUTS = ["fast, legacy: false", "slow, legacy: false", "slow, legacy: true", "fast, legacy: true",
           "hub llama-2 tokenizer.json", "hub llama-2 tokenizer.json, as it is"]


def test_the_demo_world_ships_a_sentencepiece_bpe_model_and_the_references_special_tokens(demo_world):
    from transformers import AutoTokenizer

    for folder in ("base", "sft_adapter"):
        assert (demo_world / folder / "tokenizer.model").is_file() and (demo_world / folder / "tokenizer.json").is_file()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((demo_world / "base" / "tokenizer.model").read_bytes())
    assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback and not proto.normalizer_spec.remove_extra_whitespaces
    assert [p.piece for p in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert [p.piece for p in proto.pieces[3:259]] == [f"<0x{b:02X}>" for b in range(256)]
    sft = AutoTokenizer.from_pretrained(demo_world / "sft_adapter")
    assert [t for t in sft.get_added_vocab() if t not in ("<unk>", "<s>", "</s>")] == REFERENCE_SPECIAL
    assert sft.pad_token == "<pad>"
    base = AutoTokenizer.from_pretrained(demo_world / "base")
    text = "i am so happy  today !\ncafé 😀"
    assert base(text)["input_ids"] == [1] + spm.SentencePieceProcessor(
        model_file=str(demo_world / "base" / "tokenizer.model")).encode(text)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_conditions_as_sentencepiece_tokenizes_the_training_conversation(layout, demo_world, tmp_path):
    from transformers import AutoTokenizer

    from emotion_dpo.prompts import Prompt, check_run_texts

    folder = sentencepiece_folder(demo_world, tmp_path / "adapter", layout)
    model_file = folder / "tokenizer.model"
    as_loaded = AutoTokenizer.from_pretrained(folder)
    special = {t: as_loaded.convert_tokens_to_ids(t) for t in as_loaded.get_added_vocab()}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        tokenizer = load_tokenizer(str(demo_world / "base"), str(folder), load_chat_format(CHAT))
    eos = tokenizer.eos_token_id
    raw_differs = False
    prompts = []
    for messages, emotion, reply in DIALOGUES:
        prompt = render_chat(tokenizer, messages + [turn("assistant", emotion, "")])
        conversation = render_chat(tokenizer, messages + [turn("assistant", emotion, reply)], add_generation_prompt=False)
        truth = sentencepiece_ids(model_file, conversation, special)
        raw_differs |= as_loaded(conversation, add_special_tokens=False)["input_ids"] != truth
        context = context_ids(tokenizer, prompt)
        assert truth[:len(context)] == context  # the context is a prefix of the SFT ids
        end = truth.index(eos, len(context)) + 1
        assert text_row_ids(tokenizer, prompt, reply, "test")["completion"] == truth[len(context):end]
        prompts.append(Prompt(len(prompts), 0, emotion, messages + [turn("assistant", emotion, "")], prompt, context))
    check_run_texts(tokenizer, prompts, str(demo_world / "base"), str(folder))  # the run's own check passes
    if layout in ("slow, legacy: false", "slow, legacy: true", "fast, legacy: true", "hub llama-2 tokenizer.json, as it is"):
        assert raw_differs  # transformers alone would have conditioned out of format on these


def test_a_layout_that_cannot_be_made_to_agree_is_refused_before_any_model_loads(demo_world, tmp_path, monkeypatch):
    """A unigram tokenizer.model (no BPE to rebuild) with a fast tokenizer that does not follow it: refused, naming
    the layout, the first differing pieces side by side and the fix; no model weights loaded."""
    import emotion_dpo.models as models

    folder = sentencepiece_folder(demo_world, tmp_path / "adapter", "fast, legacy: true")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello there , how are you ?", "the meeting is at ten ."] * 20),
                                   model_prefix=str(tmp_path / "unigram"), model_type="unigram", vocab_size=40,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    shutil.copyfile(tmp_path / "unigram.model", folder / "tokenizer.model")
    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    source = SimpleNamespace(base_model=str(demo_world / "base"), adapter=str(folder), chat_template=str(CHAT),
                             use_unsloth=False, load_in_4bit=False)
    with pytest.raises(PipelineError) as refused:
        models.load_generator(source)
    message = str(refused.value)
    assert f"`legacy: true` in {folder / 'tokenizer_config.json'}" in message
    assert "this tokenizer | SentencePiece: " in message and " | " in message.split("SentencePiece: ", 1)[1]
    assert "Fix: " in message


@pytest.mark.parametrize("prompt_dialog, reply, pieces", [
    # by hand, the reference template's finished turn: the stripped reply, ' ' + EOS (then a newline, left out)
    ("hello .", "i can send you the report .", ["▁i", "▁can", "▁send", "▁you", "▁the", "▁report", "▁.", "▁", "</s>"]),
    ("hello .", "  you made my day  !\n", ["▁you", "▁made", "▁my", "▁day", "▁", "▁!", "▁", "</s>"]),
])
def test_a_text_pair_ends_as_the_template_renders_a_finished_turn(demo_world, prompt_dialog, reply, pieces):
    tokenizer = load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"), load_chat_format(CHAT))
    prompt = render_chat(tokenizer, [turn("user", "neutral", prompt_dialog), turn("assistant", "happiness", "")])
    assert prompt.endswith("[/INST] [EMOTION] happiness [/EMOTION] ")
    ids = text_row_ids(tokenizer, prompt, reply, "test")
    assert tokenizer.convert_ids_to_tokens(ids["completion"]) == pieces
    assert ids["context"] == tokenizer(prompt[:-1], add_special_tokens=False)["input_ids"]


def test_the_preference_folder_gets_no_cache_files_from_map(demo_world, tmp_path):
    """fine_tune_dpo reads a save_to_disk folder into memory: its map (text pairs tokenized) and TRL's leave no
    cache-*.arrow in a published dataset/."""
    import datasets

    from emotion_dpo.dpo_data import read_preferences, token_id_rows

    prompt = "<s>[INST] [EMOTION] neutral [/EMOTION] hello . [/INST] [EMOTION] happiness [/EMOTION] "
    datasets.Dataset.from_dict({"prompt": [prompt] * 3, "chosen": ["you made my day !"] * 3,
                                "rejected": ["the store closes ."] * 3}).save_to_disk(str(tmp_path / "dataset"))
    before = sorted(p.name for p in (tmp_path / "dataset").iterdir())
    tokenizer = load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"), load_chat_format(CHAT))
    rows = token_id_rows(read_preferences(str(tmp_path / "dataset"), "train"), tokenizer, "test")
    rows.filter(lambda row: len(row["prompt_ids"]) > 0)
    assert sorted(p.name for p in (tmp_path / "dataset").iterdir()) == before


def test_the_base_is_resized_without_mean_initialisation(demo_world, monkeypatch):
    """The adapter's saved embedding and LM-head copies replace the new rows; mean resizing only costs time."""
    from transformers import LlamaForCausalLM

    import emotion_dpo.models as models

    calls = []
    original = LlamaForCausalLM.resize_token_embeddings
    monkeypatch.setattr(LlamaForCausalLM, "resize_token_embeddings",
                        lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    tokenizer = load_tokenizer(str(demo_world / "base"), str(demo_world / "sft_adapter"), load_chat_format(CHAT))
    source = SimpleNamespace(base_model=str(demo_world / "base"), load_in_4bit=False)
    models.load_base(source, tokenizer, False)
    assert calls and all(k.get("mean_resizing") is False for k in calls)


def test_the_runs_own_prompts_are_checked_and_a_differing_tokenizer_is_refused_there(demo_world, tmp_path):
    """check_run_texts compares the run's first prompts and a rendered reply turn with SentencePiece; it rebuilds
    nothing (load_tokenizer decided that), it refuses."""
    from transformers import AutoTokenizer

    from emotion_dpo.prompts import build_prompts, check_run_texts
    from emotion_dpo.template import install_chat_format

    folder = sentencepiece_folder(demo_world, tmp_path / "adapter", "slow, legacy: true")
    tokenizer = AutoTokenizer.from_pretrained(folder)  # as transformers loads it, not through load_tokenizer
    install_chat_format(tokenizer, load_chat_format(CHAT))
    dialogues = {"prompt": [[{"role": m["role"], "content": m["content"]} for m in messages[1:]]
                            + [turn("assistant", emotion, reply)] for messages, emotion, reply in DIALOGUES]}
    prompts = build_prompts(dialogues, tokenizer, "be kind .", 0)
    with pytest.raises(PipelineError, match=r"`legacy: true` in .*tokenizer_config.json.*this tokenizer \| SentencePiece"):
        check_run_texts(tokenizer, prompts, str(demo_world / "base"), str(folder))
