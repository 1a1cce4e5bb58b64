"""emotion_dpo/sentencepiece_check.py's rules on the demo world's tokenizer.model (a 1000-piece BPE model) without
loading a model or a tokenizer folder: SentencePiece's side of a text in the training format, the tokenizer rebuilt
from the model, the first difference and the folder's layout in words, and when a tokenizer is kept, rebuilt or
refused. Each expectation is the rule written out with the `sentencepiece` library itself. (tests/test_sentencepiece.py
checks every folder layout end to end.)"""

import json
import warnings
from types import SimpleNamespace

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from emotion_dpo import sentencepiece_check as check
from emotion_dpo.errors import PipelineError

SPECIAL = ["[INST]", "[/INST]", "[EMOTION]", "[/EMOTION]"]
TEXT = "[INST] hello  there [/INST] [EMOTION] happiness [/EMOTION] café 😀\nok"


@pytest.fixture(scope="module")
def model_file(demo_world):
    return demo_world / "base" / "tokenizer.model"


@pytest.fixture(scope="module")
def sp(model_file):
    """SentencePiece with its dummy `▁` prefix (first) and without it (inner), made here from the model file."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    first = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    proto.normalizer_spec.add_dummy_prefix = False
    return SimpleNamespace(first=first, inner=spm.SentencePieceProcessor(model_proto=proto.SerializeToString()))


def test_a_text_without_special_tokens_is_sentencepieces_own_encoding(model_file, sp):
    text = "hello  there café"
    assert check.SentencePieceReference(model_file).ids(text, {}) == sp.first.encode(text)
    assert sp.first.encode("hello") != sp.inner.encode("hello")  # the prefix shows: "▁hello" against "hello"


def test_the_text_is_split_at_the_special_tokens_and_only_its_start_gets_the_prefix(model_file, sp):
    special = {"[INST]": 900, "[/INST]": 901}
    reference = check.SentencePieceReference(model_file)
    assert reference.ids("hello[INST]world [/INST] ok", special) == (
        sp.first.encode("hello") + [900] + sp.inner.encode("world ") + [901] + sp.inner.encode(" ok"))
    # a text that starts with a special token: no piece is at the start, none gets the prefix
    assert reference.ids("[INST] hi", special) == [900] + sp.inner.encode(" hi")


def test_the_longest_special_token_is_matched_first(model_file, sp):
    special = {"<a>": 900, "<a><b>": 901}  # "<a>" is a prefix of "<a><b>"
    assert check.SentencePieceReference(model_file).ids("x<a><b>y<a>", special) == (
        sp.first.encode("x") + [901] + sp.inner.encode("y") + [900])


def test_the_tokenizer_rebuilt_from_the_model_tokenizes_as_sentencepiece(model_file, sp):
    tokenizer = check.llama_tokenizer_from_sentencepiece(model_file)
    for text in ("hello  there café 😀\nok", "i can send you the report .", "!? right after"):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.first.encode(text), text


def test_a_unigram_model_has_no_bpe_to_rebuild(tmp_path):
    sentences = ["hello there , how are you ?", "the meeting is at ten ."] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences),
                                   model_prefix=str(tmp_path / "unigram"), model_type="unigram", vocab_size=40,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    reference = check.SentencePieceReference(tmp_path / "unigram.model")
    assert reference.vocab_and_merges() is None
    assert check.rebuild_backend(SimpleNamespace(), reference) is False  # the tokenizer is left as it is


def with_specials(model_file):
    tokenizer = check.llama_tokenizer_from_sentencepiece(model_file)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    return tokenizer


def hub_style(model_file):
    """A tokenizer that adds `▁` after every special token (the Hub's Llama-2 tokenizer.json: Prepend + Replace)."""
    from tokenizers import normalizers

    tokenizer = with_specials(model_file)
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                                  normalizers.Replace(" ", "▁")])
    tokenizer.backend_tokenizer.pre_tokenizer = None
    return tokenizer


def truth(tokenizer, model_file, text=TEXT):
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_added_vocab()}
    return check.SentencePieceReference(model_file).ids(text, special)


def test_a_rebuilt_backend_tokenizes_and_decodes_as_sentencepiece(model_file):
    tokenizer = hub_style(model_file)
    assert tokenizer(TEXT, add_special_tokens=False)["input_ids"] != truth(tokenizer, model_file)
    assert check.rebuild_backend(tokenizer, check.SentencePieceReference(model_file)) is True
    # TEXT starts on a special token; the other starts on a word (the dummy prefix) and has a word right after a
    # special token (no prefix there: "hi", not "▁hi")
    for text in (TEXT, "hello  there [INST]hi"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == truth(tokenizer, model_file, text)
        assert tokenizer.decode(ids) == text  # emoji through byte fallback, the dummy prefix's space taken off


def test_a_tokenizer_that_agrees_is_kept_as_it_is(demo_world, model_file):
    tokenizer = with_specials(model_file)
    backend = tokenizer.backend_tokenizer.to_str()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check.conform_to_sentencepiece(tokenizer, str(demo_world / "base"), texts=[TEXT])
    assert tokenizer.backend_tokenizer.to_str() == backend


def test_a_differing_tokenizer_is_rebuilt_with_one_warning_per_folder(demo_world, model_file, monkeypatch):
    monkeypatch.setattr(check, "_notified", set())
    where = str(demo_world / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two tokenizers of one folder (generate loads one per stage): one warning
            tokenizer = hub_style(model_file)
            check.conform_to_sentencepiece(tokenizer, where, texts=[TEXT])
            assert tokenizer(TEXT, add_special_tokens=False)["input_ids"] == truth(tokenizer, model_file)
    assert [str(w.message).split(":")[0] for w in caught] == [where]
    assert "splits text otherwise than its SentencePiece model" in str(caught[0].message)


def test_a_differing_tokenizer_is_refused_when_not_rebuilt_or_when_the_rebuild_still_differs(demo_world, model_file,
                                                                                           monkeypatch):
    where = str(demo_world / "base")
    with pytest.raises(PipelineError, match=r"the tokenizer splits text otherwise than its SentencePiece model .*"
                                            r"first difference, this tokenizer \| SentencePiece: .*Fix: "):
        check.conform_to_sentencepiece(hub_style(model_file), where, texts=[TEXT], rebuild=False)
    monkeypatch.setattr(check, "rebuild_backend", lambda tokenizer, reference: True)  # a rebuild that changes nothing
    with pytest.raises(PipelineError, match="the tokenizer splits text otherwise"):
        check.conform_to_sentencepiece(hub_style(model_file), where, texts=[TEXT])


class Pieces:
    """A tokenizer and a SentencePiece model of 100 pieces, naming piece i "t<i>" and "p<i>"."""
    def convert_ids_to_tokens(self, i):
        return f"t{i}"

    def get_piece_size(self):
        return 100

    def id_to_piece(self, i):
        return f"p{i}"


def test_the_first_difference_is_shown_from_two_pieces_before_it_to_three_after():
    pieces = Pieces()
    reference = SimpleNamespace(with_prefix=pieces)
    got, want = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 40, 5, 6, 7, 8, 9]
    # first difference at 3: pieces 1 .. 6 (3 - 2 to 3 + 3) of each
    assert check.first_difference(pieces, got, want, reference) == "t2 t3 t4 t5 t6 t7 | p2 p3 p40 p5 p6 p7"
    # one a prefix of the other: the difference is where the shorter ends; an added token (id >= 100) by its name
    assert check.first_difference(pieces, [1, 2, 3], [1, 2, 3, 120], reference) == "t2 t3 | p2 p3 t120"


def test_the_folders_layout_in_words(tmp_path):
    assert check.describe_layout(None, str(tmp_path / "hub/id")) == f"the tokenizer of {tmp_path / 'hub/id'}"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({"normalizer": None}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"legacy": False}))
    assert check.describe_layout(None, str(folder)) == f"the tokenizer files in {folder}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"legacy": True}))
    (folder / "tokenizer.json").write_text(json.dumps({"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace"}]}}))
    assert check.describe_layout(None, str(folder)) == (
        f"`legacy: true` in {folder / 'tokenizer_config.json'}; "
        f"{folder / 'tokenizer.json'} in the Hub's Llama-2 style (normalizer Prepend ▁ + Replace)")
    (folder / "tokenizer.json").write_text(json.dumps({"normalizer": {"type": "Prepend", "prepend": "▁"}}))  # alone
    assert "in the Hub's Llama-2 style" in check.describe_layout(None, str(folder))
    (folder / "tokenizer.json").unlink()
    assert check.describe_layout(None, str(folder)).endswith(
        f"no tokenizer.json in {folder} (transformers rebuilt the tokenizer from tokenizer.model)")


def test_the_sentencepiece_model_is_the_tokenizers_own_else_the_first_folders(tmp_path, model_file):
    empty, first, second = (tmp_path / name for name in ("empty", "first", "second"))
    for folder in (empty, first, second):
        folder.mkdir()
    for folder in (first, second):
        (folder / "tokenizer.model").write_bytes(model_file.read_bytes())
    own = SimpleNamespace(vocab_file=str(second / "tokenizer.model"), init_kwargs={})
    assert check.sentencepiece_file(own, [first]) == second / "tokenizer.model"
    other = SimpleNamespace(vocab_file=str(tmp_path / "vocab.json"), init_kwargs={})  # not a SentencePiece model
    (tmp_path / "vocab.json").write_text("{}")
    assert check.sentencepiece_file(other, [empty, first, second]) == first / "tokenizer.model"
    assert check.sentencepiece_file(SimpleNamespace(vocab_file=None, init_kwargs={}), [empty]) is None
