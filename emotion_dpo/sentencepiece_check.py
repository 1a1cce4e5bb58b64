"""A Llama-2 tokenizer against its own SentencePiece model: the ids the SFT model was trained on.

The reference's SFT ran on a tokenizer converted from the slow one with `legacy=False` (unsloth): the text split at
the added special tokens, each piece encoded by SentencePiece, the dummy `▁` prefix only at the very start of the
text. transformers 5 does not reproduce that from every folder layout (a `legacy: true` config, a folder without
tokenizer.json, ...), and a tokenizer compared only with itself cannot notice. So, whenever the tokenizer comes with
its `tokenizer.model`, its ids are compared with SentencePiece's own on text in the training format; a tokenizer that
differs is rebuilt from the SentencePiece model (as transformers 4.45's converter did with legacy=False) and used only
when it then agrees; otherwise the run is refused, naming the folder's layout, the first differing pieces and the fix.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from .errors import PipelineError

MODEL_FILE = "tokenizer.model"
# Text the template renders from dialogues with what splits differently under a wrong layout: a doubled space, a
# newline inside a turn, punctuation right after a marker, non-ASCII letters and an emoji.
PROBE_DIALOGS = ("double  spaces here", "a line\nand the next", "!? right after the marker", "café naïve über",
                 "so happy 😀 today")


def sentencepiece_file(tokenizer, folders) -> Path | None:
    """The SentencePiece model the tokenizer came with: the one it was loaded from, else one in `folders` (local
    folders or Hub ids, in order); None without one."""
    own = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
    if own and Path(own).name == MODEL_FILE and Path(own).is_file():
        return Path(own)
    from transformers.utils import cached_file

    for folder in folders:
        try:
            found = cached_file(str(folder), MODEL_FILE, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        except (OSError, ValueError):
            found = None
        if found:
            return Path(found)
    return None


class SentencePieceReference:
    """SentencePiece's own tokenization of a text in the training format."""

    def __init__(self, model_file: Path):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.file = Path(model_file)
        self.proto = sentencepiece_model_pb2.ModelProto()
        self.proto.ParseFromString(self.file.read_bytes())
        self.with_prefix = spm.SentencePieceProcessor(model_proto=self.proto.SerializeToString())
        inner = sentencepiece_model_pb2.ModelProto()
        inner.CopyFrom(self.proto)
        inner.normalizer_spec.add_dummy_prefix = False  # what legacy=False does to every piece but the first
        self.without_prefix = spm.SentencePieceProcessor(model_proto=inner.SerializeToString())

    def ids(self, text: str, special_ids: dict[str, int]) -> list[int]:
        """The text split at the added special tokens (the longest first), each piece encoded by SentencePiece; the
        dummy `▁` prefix only for a piece at the start of the text."""
        if not special_ids:
            return self.with_prefix.encode(text)
        pattern = "(" + "|".join(re.escape(s) for s in sorted(special_ids, key=len, reverse=True)) + ")"
        out, at = [], 0
        for piece in re.split(pattern, text):
            if piece in special_ids:
                out.append(special_ids[piece])
            elif piece:
                out += (self.with_prefix if at == 0 else self.without_prefix).encode(piece)
            at += len(piece)
        return out

    def vocab_and_merges(self):
        """The BPE vocabulary and merges as transformers 4.45's converter built them (SentencePieceExtractor): every
        split of a piece into two pieces is a merge, ranked by the merged piece's score, highest first."""
        if self.proto.trainer_spec.model_type != 2:  # sentencepiece_model.proto: 1 unigram, 2 BPE
            return None
        vocab = {p.piece: i for i, p in enumerate(self.proto.pieces)}
        merges = []
        for piece in self.proto.pieces:
            text = piece.piece
            local = [(text[:k], text[k:]) for k in range(1, len(text)) if text[:k] in vocab and text[k:] in vocab]
            merges += [(left, right, piece.score) for left, right in sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))]
        merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep the vocabulary's order
        return vocab, [(left, right) for left, right, _ in merges]


def llama_tokenizer_from_sentencepiece(model_file: Path, **kwargs):
    """A LlamaTokenizer (transformers' fast one) that tokenizes as SentencePiece with legacy=False does."""
    from transformers import LlamaTokenizer

    vocab, merges = SentencePieceReference(model_file).vocab_and_merges()
    return LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, **kwargs)


def rebuild_backend(tokenizer, reference: SentencePieceReference) -> bool:
    """Give the tokenizer the BPE model and `▁` handling rebuilt from the SentencePiece model (its added tokens and
    their ids stay); False when the model is no BPE this rebuild reproduces."""
    from tokenizers import decoders, models, pre_tokenizers

    built = reference.vocab_and_merges()
    if built is None:
        return False
    vocab, merges = built
    backend = tokenizer.backend_tokenizer
    backend.model = models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                               unk_token=reference.proto.pieces[reference.with_prefix.unk_id()].piece)
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return True


def probe_texts(tokenizer) -> list[str]:
    """The training format, rendered by the tokenizer's template from dialogues that hold PROBE_DIALOGS: a generation
    prompt without its final space (what the model is conditioned on) and a whole conversation."""
    from .template import context_text, render_chat

    def turn(role, emotion, dialog):
        return {"role": role, "content": {"emotion": emotion, "dialog": dialog}}

    history = [turn("system", "", "be kind ,  always ."),
               turn("user", "neutral", PROBE_DIALOGS[0]), turn("assistant", "happiness", PROBE_DIALOGS[1]),
               turn("user", "fear", PROBE_DIALOGS[2]), turn("assistant", "sadness", PROBE_DIALOGS[3]),
               turn("user", "surprise", PROBE_DIALOGS[4])]
    prompt = render_chat(tokenizer, history + [turn("assistant", "anger", "")])
    whole = render_chat(tokenizer, history + [turn("assistant", "anger", "! wow  ok\nfine 😀")], add_generation_prompt=False)
    return [context_text(prompt), whole]


def first_difference(tokenizer, got: list[int], want: list[int], reference) -> str:
    """The first differing pieces side by side: this tokenizer | SentencePiece."""
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    start = max(0, at - 2)

    def pieces(ids, own):
        return " ".join(own(i) for i in ids[start:at + 4])

    return (f"{pieces(got, lambda i: tokenizer.convert_ids_to_tokens(i))} | "
            f"{pieces(want, lambda i: tokenizer.convert_ids_to_tokens(i) if i >= reference.with_prefix.get_piece_size() else reference.with_prefix.id_to_piece(i))}")


def describe_layout(tokenizer, where: str) -> str:
    """What of the folder's layout makes transformers tokenize otherwise, in words."""
    folder = Path(where)
    if not folder.is_dir():
        return f"the tokenizer of {where}"
    parts = []
    config_file = folder / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("legacy") is True:
        parts.append(f"`legacy: true` in {config_file}")
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        parts.append(f"no tokenizer.json in {folder} (transformers rebuilt the tokenizer from {MODEL_FILE})")
    else:
        try:
            normalizer = json.loads(tokenizer_json.read_text()).get("normalizer") or {}
        except (OSError, ValueError):
            normalizer = {}
        kinds = [n.get("type") for n in normalizer.get("normalizers", [normalizer])] if normalizer else []
        if "Prepend" in kinds:
            parts.append(f"{tokenizer_json} in the Hub's Llama-2 style (normalizer Prepend ▁ + Replace)")
    return "; ".join(parts) or f"the tokenizer files in {folder}"


_notified: set = set()


def conform_to_sentencepiece(tokenizer, where: str, folders=(), texts=(), rebuild: bool = True) -> None:
    """When the tokenizer comes with tokenizer.model: its ids on `texts` (default: probe_texts) equal
    SentencePiece's. A tokenizer that differs is rebuilt from the model in place (rebuild=True) and kept when it
    then agrees; otherwise PipelineError naming the layout, the first differing pieces and the fix."""
    model_file = sentencepiece_file(tokenizer, [where, *folders])
    if model_file is None:
        return
    reference = SentencePieceReference(model_file)
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.get_added_vocab()}
    texts = list(texts) or probe_texts(tokenizer)

    def first_mismatch():
        for text in texts:
            got = tokenizer(text, add_special_tokens=False)["input_ids"]
            want = reference.ids(text, special)
            if got != want:
                return first_difference(tokenizer, got, want, reference)
        return None

    mismatch = first_mismatch()
    if mismatch is None:
        return
    layout = describe_layout(tokenizer, where)
    if rebuild and rebuild_backend(tokenizer, reference) and first_mismatch() is None:
        if (where, str(model_file)) not in _notified:
            _notified.add((where, str(model_file)))
            warnings.warn(f"{where}: the tokenizer as loaded splits text otherwise than its SentencePiece model "
                          f"{model_file} ({layout}; first difference, loaded | SentencePiece: {mismatch}); tokenizing "
                          f"through a tokenizer rebuilt from {model_file}, which agrees with it", stacklevel=2)
        return
    raise PipelineError(
        f"{where}: the tokenizer splits text otherwise than its SentencePiece model {model_file}, with which the SFT "
        f"model was trained ({layout}); first difference, this tokenizer | SentencePiece: {mismatch}. "
        f"Fix: save a tokenizer.json that tokenizes as {model_file} with legacy=False into {where} (for a BPE model: "
        f"emotion_dpo.sentencepiece_check.llama_tokenizer_from_sentencepiece({str(model_file)!r}) and its "
        "save_pretrained, then add the chat template's special tokens), and set `legacy: false` in its "
        "tokenizer_config.json")
