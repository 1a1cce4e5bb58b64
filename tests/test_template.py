"""The chat template file and the ids a prompt gives the model (docs/data.md, "The prompt format, byte for byte"):
what a template file must hold, what installing it does to a tokenizer, and the boundary between prompt and reply
that check_context_ids guards. The boundary rules are shown on two tiny hand-written tokenizers whose splits can
be worked out by eye."""

import json
from pathlib import Path

import pytest

from emotion_dpo.errors import PipelineError
from emotion_dpo.template import check_context_ids, context_ids, load_chat_format, render_chat

PROJECT = json.loads(Path("args/chat_template.json").read_text())


class CharacterTokenizer:
    """One token per character, the space included: a reply after the prompt starts with a lone space token."""

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):  # a batch, as transformers' tokenizers take it
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [chr(i) for i in ids]


class WordTokenizer:
    """One token per word, a space joined to the word after it (as Llama-2's `▁word`)."""

    def __init__(self):
        self.vocabulary = {}

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        words = text.split(" ")
        pieces = [words[0]] + ["▁" + w for w in words[1:]]
        return {"input_ids": [self.vocabulary.setdefault(p, len(self.vocabulary)) for p in pieces if p]}

    def decode(self, ids):
        return "".join(self.convert_ids_to_tokens(ids)).replace("▁", " ")

    def convert_ids_to_tokens(self, ids):
        names = {i: p for p, i in self.vocabulary.items()}
        return [names[i] for i in ids]


def test_the_context_is_the_prompt_without_its_final_space():
    tokenizer = WordTokenizer()
    assert context_ids(tokenizer, "<s> hi [/EMOTION] ") == tokenizer("<s> hi [/EMOTION]")["input_ids"]
    check_context_ids(tokenizer, "<s> hi [/EMOTION] ", "cfg.json")  # then "▁word" follows: accepted


def test_a_tokenizer_that_makes_the_space_before_a_reply_its_own_token_is_refused():
    with pytest.raises(PipelineError, match="cfg.json: under this tokenizer a reply after the prompt starts with a "
                                            r"lone space token \[' '\]"):
        check_context_ids(CharacterTokenizer(), "hi ", "cfg.json")


def test_a_prompt_whose_tokens_merge_with_the_reply_is_refused():
    # no final space: "[/EMOTION]" + "word" is one word, so the prompt's last token is not in prompt + reply
    with pytest.raises(PipelineError, match="cfg.json: the prompt's tokens are not a prefix of prompt \\+ reply"):
        check_context_ids(WordTokenizer(), "<s> hi [/EMOTION]", "cfg.json")


@pytest.fixture
def tokenizer(demo_tokenizer):
    return demo_tokenizer


def test_the_installed_tokenizer_pads_on_the_left_with_the_templates_pad_token(tokenizer):
    assert (tokenizer.padding_side, tokenizer.pad_token) == ("left", PROJECT["pad_token"])
    batch = tokenizer(["a", "a b c"], padding=True, add_special_tokens=False)["input_ids"]
    assert batch[0][0] == tokenizer.pad_token_id and batch[1][0] != tokenizer.pad_token_id


def test_the_context_ids_hold_one_bos(tokenizer):
    ids = context_ids(tokenizer, "<s>[INST] hi . [/INST] [EMOTION] neutral [/EMOTION] ")
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_rendering_adds_the_generation_prompt_unless_told_not_to(tokenizer):
    messages = [{"role": "user", "content": {"emotion": "neutral", "dialog": "hi ."}},
                {"role": "assistant", "content": {"emotion": "happiness", "dialog": ""}}]
    assert render_chat(tokenizer, messages).endswith(" [/INST] [EMOTION] happiness [/EMOTION] ")
    assert not render_chat(tokenizer, messages, add_generation_prompt=False).endswith("[/EMOTION] ")


def write(tmp_path, doc):
    path = tmp_path / "template.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_file_with_both_formats_keys_is_read_as_the_projects(tmp_path):
    chat = load_chat_format(write(tmp_path, {**PROJECT, "template": "{{ 'theirs' }}"}))
    assert chat.template == PROJECT["chat_template"]


@pytest.mark.parametrize("change, message", [
    ({"pad_token": ""}, "key 'pad_token': expected a non-empty string"),
    ({"special_tokens": ["[INST]", ""]}, "key 'special_tokens': expected a list of non-empty strings"),
    ({"special_tokens": ["[INST]", 3]}, "key 'special_tokens': expected a list of non-empty strings"),
    ({"chat_template": "{% if x %}"}, "key 'chat_template': jinja syntax error"),
])
def test_a_template_file_with_a_bad_key_is_refused_naming_it(tmp_path, change, message):
    with pytest.raises(PipelineError, match=f"template.json: {message}"):
        load_chat_format(write(tmp_path, {**PROJECT, **change}))


def test_a_missing_template_file_is_one_clear_line(tmp_path):
    with pytest.raises(PipelineError, match="nope.json: chat template file not found"):
        load_chat_format(tmp_path / "nope.json")


class TableTokenizer:
    """The ids of each text as a table says: a boundary behaviour written out by hand."""

    def __init__(self, table):
        self.table = table

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):
            return {"input_ids": [self.table[t] for t in text]}
        return {"input_ids": self.table[text]}

    def decode(self, ids):
        return "w"

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


def test_a_prompt_whose_last_token_splits_differently_before_a_reply_is_refused():
    # "ab" alone ends in token 2; in "ab word" the same letters end in token 3: not a prefix, though longer
    with pytest.raises(PipelineError, match="cfg.json: the prompt's tokens are not a prefix of prompt \\+ reply"):
        check_context_ids(TableTokenizer({"ab": [1, 2], "ab word": [1, 3, 4]}), "ab ", "cfg.json")
    check_context_ids(TableTokenizer({"ab": [1, 2], "ab word": [1, 2, 4]}), "ab ", "cfg.json")  # a prefix: accepted


def test_installing_a_format_sets_its_pad_token_and_special_tokens(tokenizer):
    import copy

    from emotion_dpo.template import ChatFormat, install_chat_format

    fresh = copy.deepcopy(tokenizer)
    added = install_chat_format(fresh, ChatFormat(PROJECT["chat_template"], ("[INST]", "[NEW]"), "<mypad>"))
    assert added == 2  # <mypad> and [NEW]
    assert (fresh.pad_token, fresh.padding_side, fresh.chat_template) == ("<mypad>", "left", PROJECT["chat_template"])
    assert fresh.convert_tokens_to_ids("[NEW]") == len(fresh) - 1  # the newest token: added, not split
