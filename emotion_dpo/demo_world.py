"""The offline demo world: tiny models and data in the real formats, built here, never downloaded.

    python -m emotion_dpo.demo_world [--out demo_world] [--seed 0] [--force]

It holds what the real pipeline loads from the Hub, saved with the real `save_pretrained` / `save_to_disk`, in the
reference's formats, so that it fails where the real world would:
dialogues/ (DatasetDict, reference format), base/ (a tiny Llama whose tokenizer is laid out as Llama-2's: a
SentencePiece BPE tokenizer.model with byte fallback, trained here, next to the tokenizer.json that tokenizes as it
does; `▁` spaces, a BOS added by default; no template tokens), sft_adapter/ (LoRA
with modules_to_save, trained on args/chat_template.json's whole-conversation rendering after adding the template's
special tokens as the reference does, + that tokenizer), emotion_classifier/ (saved with generic labels LABEL_0...
LABEL_6, as a Hub classifier may be: the pipeline applies the reference's order by position) and
gibberish_detector/ (sequence classifiers), figures.json. The SFT data pair the requested emotion with the
reply's emotion only part of the time, so the SFT model is right only part of the time: DPO has work to do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from . import EMOTIONS
from .distributed import die_with_parent
from .template import context_ids, install_chat_format, load_chat_format, render_chat

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "demo_world"
CHAT_TEMPLATE = ROOT / "args" / "chat_template.json"
DEMO_SYSTEM_PROMPT = "you are a friendly chatbot , reply in the requested emotion ."
GIBBERISH = ("clean", "mild gibberish", "word salad", "noise")
# The emotion classifier's names as saved: generic, ids in the reference's order (EMOTIONS)
GENERIC_LABELS = tuple(f"LABEL_{i}" for i in range(len(EMOTIONS)))

# ------------------------------------------------------------------ the recipe
RECIPE = {
    "dialogues": {"train": 1500, "validation": 200, "test": 300},
    "neutral_share": 0.4,  # DailyDialog is mostly neutral
    "sft_match": 0.45,  # P(reply emotion is forced to the requested one) in the SFT data; else a random one (may match)
    "sft_cut_off": 0.1,
    "sft_garbled": 0.1,
    "base": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "base_steps": 300,
    "sft_steps": 500,
    "lora_r": 16,
    # Telling mild gibberish from clean text needs word order: a deeper model than emotion words do.
    "emotion_classifier": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    "emotion_classifier_steps": 300,
    "gibberish_detector": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "gibberish_detector_steps": 1200,
    "classifier_examples": 6000,  # generated texts per classifier; 500 more, fresh, are held out
    "eval_prompts": 200,
}
SMALL = {"dialogues": {"train": 200, "validation": 20, "test": 40}, "base_steps": 30, "sft_steps": 30,
         "emotion_classifier_steps": 30, "gibberish_detector_steps": 30, "classifier_examples": 600,
         "eval_prompts": 20}

# Openers and cores per emotion; a reply is an optional opener plus one core (15-60 characters).
LANGUAGE = {
    "neutral": (["well ,", "okay ,", "sure ,"], [
        "i will check the schedule and call you later .", "the meeting is at ten tomorrow .",
        "i can send you the report .", "let me see when the train leaves .", "the store closes at nine .",
        "i think we should take the bus .", "it is on the second floor ."]),
    "anger": (["hey ,", "listen ,", "enough ,"], [
        "this is outrageous , i am furious about it !", "how dare you talk to me like that !",
        "i am so angry , stop lying to me !", "that is unacceptable and i hate it !",
        "you ruined everything again !", "i am sick of your excuses !", "get out of my room !"]),
    "disgust": (["ugh ,", "yuck ,", "eww ,"], [
        "that smell is disgusting , i feel sick .", "the food here is revolting .",
        "that is gross , take it away .", "i can not stand this filthy room .",
        "there is hair in my soup .", "his behavior is repulsive .", "that toilet is nasty ."]),
    "fear": (["oh no ,", "help ,", "wait ,"], [
        "i am scared , what if something goes wrong ?", "i am afraid of the dark .",
        "i am terrified of the exam tomorrow .", "what was that noise ? i am frightened .",
        "i am nervous about flying alone .", "i think someone is following me .", "please do not leave me ."]),
    "happiness": (["yay ,", "great ,", "oh ,"], [
        "that is wonderful news , i am so happy for you !", "i love it , thank you so much !",
        "what a lovely day , i feel fantastic !", "congratulations , that is amazing !",
        "i am glad you came , this is fun !", "you made my day !", "i am so excited to see you !"]),
    "sadness": (["sigh ,", "oh dear ,", "sorry ,"], [
        "i am so sad , i miss her every day .", "i feel lonely since he moved away .",
        "that is terrible news , i am heartbroken .", "i failed again , i feel so down .",
        "it is so sad to hear that .", "nobody came to my party .", "my dog died last week ."]),
    "surprise": (["wow ,", "really ?", "what ?"], [
        "i can not believe it !", "what a surprise , i did not expect that !", "are you serious about that ?",
        "you are here already ?", "she won the lottery ?", "i never knew that !", "is that really true ?"]),
}


def _vocabulary() -> list[str]:
    words = set(DEMO_SYSTEM_PROMPT.split())
    for openers, cores in LANGUAGE.values():
        for text in openers + cores:
            words.update(text.split())
    return sorted(words | set(EMOTIONS))


def sentence(rng: random.Random, emotion: str) -> str:
    openers, cores = LANGUAGE[emotion]
    core = rng.choice(cores)
    return f"{rng.choice(openers)} {core}" if rng.random() < 0.4 else core


def garble(rng: random.Random, text: str, vocab: list[str]) -> str:
    """Mild gibberish: a few words replaced or repeated."""
    words = text.split()
    for _ in range(2):
        i = rng.randrange(len(words))
        words[i] = rng.choice(vocab) if rng.random() < 0.5 else words[i] + " " + words[i]
    return " ".join(words)


def cut_off(rng: random.Random, text: str) -> str:
    words = text.split()
    return " ".join(words[: max(2, len(words) - rng.randint(1, 3))])


def random_emotion(rng: random.Random, neutral_share: float) -> str:
    return "neutral" if rng.random() < neutral_share else rng.choice(EMOTIONS[1:])


# ------------------------------------------------------------------ artefacts

def make_dialogues(rng: random.Random, recipe: dict):
    import datasets

    def dialogue():
        turns = []
        for i in range(rng.choice([2, 4, 4, 6, 6, 8])):
            emotion = random_emotion(rng, recipe["neutral_share"])
            turns.append({"role": "user" if i % 2 == 0 else "assistant",
                          "content": {"emotion": emotion, "dialog": sentence(rng, emotion)}})
        return {"prompt": turns}

    return datasets.DatasetDict({
        split: datasets.Dataset.from_list([dialogue() for _ in range(n)])
        for split, n in recipe["dialogues"].items()
    })


def make_tokenizer(vocab: list[str], specials: list[str], **special_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {token: i for i, token in enumerate(specials + vocab)}
    core = Tokenizer(models.WordLevel(table, unk_token=special_tokens["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return core, PreTrainedTokenizerFast(tokenizer_object=core, **special_tokens)


def _train(model, batches, steps: int, lr: float, seed: int) -> float:
    import torch

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**batches(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def lm_batches(tokenizer, encoded: list[list[int]], prompt_lengths: list[int] | None, batch_size: int, seed: int):
    """Causal-LM batches of token ids; with prompt_lengths the loss covers only what follows the prompt."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def batch(step):
        rng = random.Random(seed * 100003 + step)
        chosen = [rng.randrange(len(encoded)) for _ in range(batch_size)]
        width = max(len(encoded[i]) for i in chosen)
        ids = torch.full((batch_size, width), pad)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(chosen):
            n = len(encoded[i])
            ids[row, :n] = torch.tensor(encoded[i])
            mask[row, :n] = 1
            start = prompt_lengths[i] if prompt_lengths else 0
            labels[row, start:n] = ids[row, start:n]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return batch


def bpe_corpus() -> list[str]:
    """Every text the demo speaks, for the base tokenizer's BPE."""
    lines = [DEMO_SYSTEM_PROMPT, " ".join(EMOTIONS), "<<SYS>> <</SYS>>"]
    for openers, cores in LANGUAGE.values():
        lines += openers + cores
    return lines


# Llama-2's tokenizer.model: BPE, byte fallback, digits split, whitespace-only pieces allowed, no normalization, no
# removal of extra spaces, a dummy `▁` prefix; <unk>, <s>, </s> at 0, 1, 2, no pad (pad_id -1).
SENTENCEPIECE_SETTINGS = {"model_type": "bpe", "vocab_size": 1000, "hard_vocab_limit": False, "byte_fallback": True,
                          "split_digits": True, "allow_whitespace_only_pieces": True, "remove_extra_whitespaces": False,
                          "normalization_rule_name": "identity", "add_dummy_prefix": True, "character_coverage": 1.0,
                          "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, "num_threads": 1, "minloglevel": 2}
# Runs of spaces as single pieces at the lowest score, right after the byte pieces, as Llama-2's model holds them
# (`▁▁` is its id 259): a tokenizer rebuilt with merges in id order joins `▁▁` before `▁word`, SentencePiece never.
WHITESPACE_PIECES = ("▁▁", "▁▁▁▁")


def train_sentencepiece(lines: list[str]) -> bytes:
    """A real SentencePiece BPE model (the `sentencepiece` trainer), serialized as tokenizer.model is."""
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    written = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=written, **SENTENCEPIECE_SETTINGS)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(written.getvalue())
    pieces = [p for p in proto.pieces if p.piece not in WHITESPACE_PIECES]
    first_normal = next(i for i, p in enumerate(pieces) if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL)
    runs = [sentencepiece_model_pb2.ModelProto.SentencePiece(piece=w, score=-1e9) for w in WHITESPACE_PIECES]
    del proto.pieces[:]
    proto.pieces.extend(pieces[:first_normal] + runs + pieces[first_normal:])
    return proto.SerializeToString()


def make_base_tokenizer(folder: Path):
    """A Llama-2 tokenizer as Meta ships it: a SentencePiece BPE model with byte fallback (tokenizer.model, trained
    here on the demo's language; <unk>, <s>, </s>, the 256 byte pieces, then the pieces) and next to it the
    tokenizer.json that tokenizes as it does (legacy=False, BOS added by default). Written into `folder`."""
    from .sentencepiece_check import MODEL_FILE, llama_tokenizer_from_sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(train_sentencepiece(bpe_corpus()))
    return llama_tokenizer_from_sentencepiece(folder / MODEL_FILE, add_bos_token=True)


def save_tokenizer(tokenizer, folder: Path, model_file: Path) -> None:
    """tokenizer.json and its config, with the SentencePiece model next to them, as a Llama-2 folder holds them."""
    tokenizer.save_pretrained(folder)
    if model_file.resolve() != (folder / model_file.name).resolve():
        shutil.copyfile(model_file, folder / model_file.name)


def make_base(root: Path, dialogues, recipe: dict, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_base_tokenizer(root / "base")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                         num_key_value_heads=recipe["base"]["num_attention_heads"], max_position_embeddings=256,
                         **recipe["base"])
    model = LlamaForCausalLM(config)
    # plain text: the tokenizer adds the BOS itself
    encoded = [tokenizer(" ".join(t["content"]["dialog"] for t in d))["input_ids"] + [tokenizer.eos_token_id]
               for d in dialogues["train"]["prompt"]]
    _train(model, lm_batches(tokenizer, encoded, None, 32, seed), recipe["base_steps"], 3e-3, seed)
    model.save_pretrained(root / "base")
    save_tokenizer(tokenizer, root / "base", root / "base" / "tokenizer.model")
    return model, tokenizer


def sft_examples(rng: random.Random, dialogues, tokenizer, recipe: dict, vocab: list[str]):
    """(token ids, context length): a window rendered whole by the template, as the reference trained its SFT
    model (the reply, then ' ' + eos + newline), the loss on what follows the generation context; the reply
    matches the requested emotion only sometimes."""
    encoded, context_lengths = [], []
    for turns in dialogues["prompt"]:
        for end in range(1, len(turns), 2):
            history = turns[max(0, end - 3):end]
            asked = turns[end]["content"]["emotion"]
            spoken = asked if rng.random() < recipe["sft_match"] else rng.choice(EMOTIONS)
            reply = sentence(rng, spoken)
            roll = rng.random()
            if roll < recipe["sft_cut_off"]:
                reply = cut_off(rng, reply)
            elif roll < recipe["sft_cut_off"] + recipe["sft_garbled"]:
                reply = garble(rng, reply, vocab)
            messages = [{"role": "system", "content": {"emotion": "", "dialog": DEMO_SYSTEM_PROMPT}}] + history
            context = context_ids(tokenizer, render_chat(
                tokenizer, messages + [{"role": "assistant", "content": {"emotion": asked, "dialog": ""}}]))
            whole = tokenizer(render_chat(
                tokenizer, messages + [{"role": "assistant", "content": {"emotion": asked, "dialog": reply}}],
                add_generation_prompt=False), add_special_tokens=False)["input_ids"]
            assert whole[:len(context)] == context, "the generation context is not a prefix of the conversation"
            encoded.append(whole)
            context_lengths.append(len(context))
    return encoded, context_lengths


def make_sft_adapter(root: Path, base, tokenizer, dialogues, recipe: dict, seed: int, vocab: list[str]):
    from peft import LoraConfig, get_peft_model

    install_chat_format(tokenizer, load_chat_format(CHAT_TEMPLATE))
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    lora = LoraConfig(r=recipe["lora_r"], lora_alpha=2 * recipe["lora_r"], lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      modules_to_save=["embed_tokens", "lm_head"])
    model = get_peft_model(base, lora)
    encoded, context_lengths = sft_examples(random.Random(seed + 1), dialogues["train"], tokenizer, recipe, vocab)
    _train(model, lm_batches(tokenizer, encoded, context_lengths, 32, seed + 1), recipe["sft_steps"], 3e-3, seed + 1)
    model.save_pretrained(root / "sft_adapter")
    save_tokenizer(tokenizer, root / "sft_adapter", root / "base" / "tokenizer.model")
    return model


def classifier_texts(rng: random.Random, n: int, vocab: list[str]):
    """(emotion texts, emotion labels, gibberish texts, gibberish labels), freshly generated."""
    emotion_texts, emotion_labels, gib_texts, gib_labels = [], [], [], []
    for _ in range(n):
        emotion = rng.choice(EMOTIONS)
        text = sentence(rng, emotion)
        emotion_texts.append(cut_off(rng, text) if rng.random() < 0.2 else text)
        emotion_labels.append(EMOTIONS.index(emotion))
        kind = rng.randrange(4)
        if kind == 0:
            sample = text
        elif kind == 1:
            sample = garble(rng, text, vocab)
        elif kind == 2:
            sample = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 10)))
        else:
            sample = " ".join("".join(rng.choice("qxzjkvw#@%&*") for _ in range(rng.randint(2, 6)))
                              for _ in range(rng.randint(2, 6)))
        gib_texts.append(sample)
        gib_labels.append(kind)
    return emotion_texts, emotion_labels, gib_texts, gib_labels


def classifier_tokenizer(vocab: list[str]):
    """The word-level tokenizer of the demo's classifiers and judge: [CLS] text [SEP], padded with [PAD]."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    core, _ = make_tokenizer(vocab, ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], unk_token="[UNK]")
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=64)


def train_classifier(folder: Path, model, tokenizer, texts: list[str], targets: list[int], steps: int, seed: int):
    """Train `model` on batches of 128 texts drawn afresh each step (seed + step), then save it with its tokenizer."""
    import torch

    encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    labels = torch.tensor(targets)

    def batch(step):
        rows = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + step))[:128]
        return {"input_ids": encoded["input_ids"][rows], "attention_mask": encoded["attention_mask"][rows],
                "labels": labels[rows]}

    _train(model, batch, steps, 3e-3, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_classifier(folder: Path, vocab: list[str], labels, texts, targets, recipe: dict, seed: int):
    """A tiny BERT text classifier with a word-level tokenizer; recipe[folder.name] gives its shape."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = classifier_tokenizer(vocab)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, max_position_embeddings=64, **recipe[folder.name]))
    train_classifier(folder, model, tokenizer, texts, targets, recipe[f"{folder.name}_steps"], seed)


def classifier_accuracy(folder: Path, texts: list[str], targets: list[int]) -> float:
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(folder), device="cpu")
    labels = classify.model.config.id2label
    predicted = classify(texts, batch_size=64)
    return sum(p["label"] == labels[t] for p, t in zip(predicted, targets)) / len(texts)


def sft_emotion_accuracy(root: Path, recipe: dict, seed: int) -> float:
    """Share of sampled SFT replies to held-out prompts that the demo classifier labels as the target, sampled and
    classified by the pipeline's own functions."""
    import datasets
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .generation import generate_candidates
    from .models import load_classifier
    from .prompts import build_prompts

    tokenizer = AutoTokenizer.from_pretrained(root / "sft_adapter")
    install_chat_format(tokenizer, load_chat_format(CHAT_TEMPLATE))  # left padding for batched generation
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = PeftModel.from_pretrained(base, root / "sft_adapter").eval()
    test = datasets.load_from_disk(str(root / "dialogues"))["test"]
    prompts = build_prompts(test, tokenizer, DEMO_SYSTEM_PROMPT, 1, num_prompts=recipe["eval_prompts"])
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=20,
                                min_new_tokens=3)
    torch.manual_seed(seed)
    replies = []
    for i in range(0, len(prompts), 50):
        replies += [group[0][0] for group in generate_candidates(model, tokenizer, [p.ids for p in prompts[i:i + 50]],
                                                                1, settings)]
    classify = load_classifier(str(root / "emotion_classifier"), 64, EMOTIONS)  # labels by position, as the Scorer's
    labels = classify(replies)
    return sum(label["label"] == p.target_emotion for label, p in zip(labels, prompts)) / len(prompts)


# ------------------------------------------------------------------ the held-out judge and the language's ceiling

# The held-out judge's names and order: those of j-hartmann/emotion-english-distilroberta-base (joy for happiness),
# so that the demo exercises a judge whose labels need a mapping to emotion_labels.
JUDGE_LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
JUDGE_LABEL_MAP = {"joy": "happiness"}
JUDGE = {"shape": {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 2}, "steps": 300, "examples": 6000}
WELL_FORMED_REPLIES = "well_formed_replies.json"


def well_formed_replies() -> dict:
    """Every well-formed reply of each emotion: each core alone or after one of its openers (4 x 7 = 28)."""
    return {emotion: sorted(cores + [f"{opener} {core}" for opener in openers for core in cores])
            for emotion, (openers, cores) in LANGUAGE.items()}


def judge_texts(rng: random.Random, n: int, vocab: list[str]):
    """The judge's own training texts, drawn from another seed than the training classifier's (a disjoint sample):
    well-formed, cut off or mildly garbled replies, each labelled with the emotion it was written in."""
    texts, labels = [], []
    for _ in range(n):
        emotion = rng.choice(EMOTIONS)
        text = sentence(rng, emotion)
        roll = rng.random()
        texts.append(cut_off(rng, text) if roll < 0.2 else garble(rng, text, vocab) if roll < 0.35 else text)
        judge_names = {ours: theirs for theirs, ours in JUDGE_LABEL_MAP.items()}
        labels.append(JUDGE_LABELS.index(judge_names.get(emotion, emotion)))
    return texts, labels


def make_judge(folder: Path, vocab: list[str], seed: int, small: bool = False) -> float:
    """A held-out emotion judge the pipeline never trains against: another architecture (DistilBERT, not BERT),
    another training sample (garbled replies included) and another label set (JUDGE_LABELS); returns its accuracy
    on fresh texts."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tokenizer = classifier_tokenizer(vocab)
    texts, targets = judge_texts(random.Random(seed + 7), JUDGE["examples"] // (10 if small else 1), vocab)
    torch.manual_seed(seed)
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(tokenizer), max_position_embeddings=64, id2label=dict(enumerate(JUDGE_LABELS)),
        label2id={label: i for i, label in enumerate(JUDGE_LABELS)}, **JUDGE["shape"]))
    train_classifier(folder, model, tokenizer, texts, targets, JUDGE["steps"] // (10 if small else 1), seed)
    held_out = judge_texts(random.Random(seed + 8), 500, vocab)
    return classifier_accuracy(folder, *held_out)


def add_judge_and_ceiling(staging: Path, seed: int, small: bool) -> dict:
    """The judge (judge/) and the language's well-formed replies (the ceiling evaluate reports against)."""
    (staging / WELL_FORMED_REPLIES).write_text(json.dumps(well_formed_replies(), indent=1) + "\n")
    return {"judge_accuracy": make_judge(staging / "judge", _vocabulary(), seed + 9, small)}


# ------------------------------------------------------------------ building and caching

def recipe_hash(seed: int, small: bool) -> str:
    source = Path(__file__).read_bytes() + (CHAT_TEMPLATE.read_bytes())
    return hashlib.sha256(source + json.dumps([RECIPE, seed, small], sort_keys=True).encode()).hexdigest()[:16]


def build_demo_world(root: str | Path, seed: int = 0, small: bool = False) -> dict:
    """Build every artefact into `root` (replaced whole: built aside, then renamed); returns the figures."""
    root = Path(root)
    staging = root.with_name(root.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    figures = _build(staging, seed, small)
    (staging / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)  # an interrupted build leaves only the .building folder, never a half world
    return figures


def _one_thread(build, *args):
    """Run one branch of the build on one thread: the same float sums on any machine (identical files), and tiny
    matrices run faster so."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build(*args)
    finally:
        torch.set_num_threads(threads)


def second_process():
    """One worker process, spawned (no forked OpenMP state), that dies with this one: a build killed with `kill -9`
    leaves nothing writing into its staging folder, which the next build removes and makes again."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent)


def _build(staging: Path, seed: int, small: bool) -> dict:
    """Two independent branches, each seeding every random step itself: the classifiers and the judge in a second
    process, the base and SFT models here; then the SFT model's accuracy, which needs both."""
    recipe = {**RECIPE, **(SMALL if small else {})}
    started = time.time()
    with second_process() as pool:
        classifiers = pool.submit(_one_thread, _build_classifiers_and_judge, staging, seed, small, recipe)
        _one_thread(_build_base_and_sft, staging, seed, recipe)
        classifier_figures = classifiers.result()
    return {
        "seed": seed,
        "small": small,
        "recipe_hash": recipe_hash(seed, small),
        "emotion_classifier_accuracy": classifier_figures["emotion_classifier_accuracy"],
        "gibberish_detector_accuracy": classifier_figures["gibberish_detector_accuracy"],
        "sft_emotion_accuracy": _one_thread(sft_emotion_accuracy, staging, recipe, seed),
        "judge_accuracy": classifier_figures["judge_accuracy"],
        "build_seconds": round(time.time() - started, 1),  # the one field that differs between identical builds
    }


def _build_base_and_sft(staging: Path, seed: int, recipe: dict) -> None:
    import numpy as np
    import torch

    np.random.seed(seed)  # nothing here draws from numpy on purpose; seeded so a library that does stays repeatable
    torch.manual_seed(seed)
    dialogues = make_dialogues(random.Random(seed), recipe)
    dialogues.save_to_disk(str(staging / "dialogues"))
    base, tokenizer = make_base(staging, dialogues, recipe, seed)
    make_sft_adapter(staging, base, tokenizer, dialogues, recipe, seed, _vocabulary())


def _build_classifiers_and_judge(staging: Path, seed: int, small: bool, recipe: dict) -> dict:
    import numpy as np

    np.random.seed(seed)
    vocab = _vocabulary()
    e_texts, e_labels, g_texts, g_labels = classifier_texts(random.Random(seed + 2), recipe["classifier_examples"], vocab)
    make_classifier(staging / "emotion_classifier", vocab, GENERIC_LABELS, e_texts, e_labels, recipe, seed + 3)
    make_classifier(staging / "gibberish_detector", vocab, GIBBERISH, g_texts, g_labels, recipe, seed + 4)
    held_out = classifier_texts(random.Random(seed + 5), 500, vocab)
    return {
        "emotion_classifier_accuracy": classifier_accuracy(staging / "emotion_classifier", held_out[0], held_out[1]),
        "gibberish_detector_accuracy": classifier_accuracy(staging / "gibberish_detector", held_out[2], held_out[3]),
        **add_judge_and_ceiling(staging, seed, small),
    }


def ensure_demo_world(root: str | Path = DEFAULT_DIR, seed: int = 0, force: bool = False) -> Path:
    """The cached world at `root`, rebuilt only when its recipe (or this module) changed."""
    import fcntl

    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)

    def current() -> bool:
        figures_file = root / "figures.json"
        return figures_file.exists() and json.loads(figures_file.read_text()).get("recipe_hash") == recipe_hash(seed, False)

    if not force and current():
        return root
    # Two test sessions may ask at once: the second waits for the first build and then reuses it.
    # The lock lives in the temp folder, keyed by the world's path, so the repository gets no stray file.
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"demo_world-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not current():
            print(f"building the demo world in {root} (about 2 minutes on 2 CPU cores) ...", flush=True)
            build_demo_world(root, seed)
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the offline demo world.")
    parser.add_argument("--out", default=str(DEFAULT_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached world is current")
    args = parser.parse_args(argv)
    root = ensure_demo_world(args.out, args.seed, args.force)
    print((root / "figures.json").read_text())


if __name__ == "__main__":
    main()
