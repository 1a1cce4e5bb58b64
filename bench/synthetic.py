"""Random-weight models of the real shapes, saved the real way, for benchmarks that need no download.

"7b": a Llama-2-7B-shaped base (hidden 4096, 32 layers, vocab 32000), an SFT-shaped LoRA adapter (r 16, all
projections, embedding and LM head in modules_to_save), a RoBERTa-base-sized emotion classifier (7 labels) and
a DistilBERT-sized gibberish detector (4 labels). "small": the same recipe, tiny, to check the script on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from emotion_dpo import EMOTIONS
from emotion_dpo.template import install_chat_format, load_chat_format

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "7b": {"llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000),
           "roberta": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           vocab_size=50265),
           "distilbert": dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072, vocab_size=30522)},
    "small": {"llama": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=2000),
              "roberta": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                              vocab_size=3000),
              "distilbert": dict(dim=64, n_layers=2, n_heads=2, hidden_dim=128, vocab_size=3000)},
}
SPECIALS = ["<unk>", "<s>", "</s>", "<<SYS>>", "<</SYS>>", ".", "!", "?", *EMOTIONS]


def word_tokenizer(size: int, specials: list[str], **special_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=special_tokens["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if "cls_token" in special_tokens:
        cls, sep = special_tokens["cls_token"], special_tokens["sep_token"]
        core.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}",
                                                            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=512, **special_tokens)


def build_world(folder: Path, shape: str) -> dict:
    """Build (or reuse) the world in `folder`; returns generate_preferences config overrides pointing at it."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import (DistilBertConfig, DistilBertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                              RobertaConfig, RobertaForSequenceClassification)

    folder = Path(folder)
    paths = {"base_model": folder / "base", "adapter": folder / "adapter", "dataset": folder / "dialogues",
             "emotion_classifier": folder / "emotion", "gibberish_detector": folder / "gibberish"}
    overrides = {k: str(v) for k, v in paths.items()}
    overrides.update(system_prompt="", load_in_4bit=json.dumps(torch.cuda.is_available()), use_unsloth="false",
                     num_prompts="null")
    if (folder / "done").exists():
        return overrides
    dims = SHAPES[shape]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    tokenizer = word_tokenizer(dims["llama"]["vocab_size"], SPECIALS, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>")
    with torch.device(device):  # initialising 7B parameters on the GPU takes seconds, on a CPU minutes
        base = LlamaForCausalLM(LlamaConfig(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                            **dims["llama"])).to(torch.bfloat16)
    base.save_pretrained(paths["base_model"], max_shard_size="5GB")
    tokenizer.save_pretrained(paths["base_model"])
    install_chat_format(tokenizer, load_chat_format(ROOT / "args/chat_template.json"))
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    lora = LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM", modules_to_save=["embed_tokens", "lm_head"],
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    adapter = get_peft_model(base, lora)
    adapter.save_pretrained(paths["adapter"])
    tokenizer.save_pretrained(paths["adapter"])
    del adapter, base
    if device == "cuda":
        torch.cuda.empty_cache()

    labels = list(EMOTIONS)
    r = dims["roberta"]
    emotion = RobertaForSequenceClassification(RobertaConfig(
        num_labels=7, id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)},
        pad_token_id=1, max_position_embeddings=514, **r))
    emotion.save_pretrained(paths["emotion_classifier"])
    word_tokenizer(r["vocab_size"], ["<s>", "<pad>", "</s>", "<unk>"], bos_token="<s>", pad_token="<pad>",
                   unk_token="<unk>", cls_token="<s>", sep_token="</s>").save_pretrained(paths["emotion_classifier"])
    gib_labels = ["clean", "mild gibberish", "word salad", "noise"]
    d = dims["distilbert"]
    gibberish = DistilBertForSequenceClassification(DistilBertConfig(
        num_labels=4, id2label=dict(enumerate(gib_labels)), label2id={k: i for i, k in enumerate(gib_labels)}, **d))
    gibberish.save_pretrained(paths["gibberish_detector"])
    word_tokenizer(d["vocab_size"], ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], pad_token="[PAD]", unk_token="[UNK]",
                   cls_token="[CLS]", sep_token="[SEP]").save_pretrained(paths["gibberish_detector"])

    rng = random.Random(0)

    def text():
        return " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randint(12, 24))) + " ."

    rows = [{"prompt": [{"role": role, "content": {"emotion": rng.choice(labels), "dialog": text()}}
                        for role in ["user", "assistant", "user", "assistant"]]} for _ in range(512)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:8])}).save_to_disk(str(paths["dataset"]))
    (folder / "done").write_text("ok\n")
    return overrides
