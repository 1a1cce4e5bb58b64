"""Loading the response generator (4-bit base + SFT LoRA adapter) and the two reward classifiers."""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from pathlib import Path

from .template import ChatFormat, install_chat_format, load_chat_format, warn_if_shipped_template_differs
from .errors import PipelineError

GIBBERISH_LABELS = ("clean", "mild gibberish")  # the labels the gibberish reward names explicitly


def device_name() -> str:
    import torch

    from accelerate import PartialState

    # Under `accelerate launch` each process owns one GPU; alone it is cuda:0 or the CPU.
    return str(PartialState().device) if torch.cuda.is_available() else "cpu"


def use_unsloth(choice) -> bool:
    """Resolve `use_unsloth`: "auto" means installed and a GPU present; true insists, false never."""
    import torch

    installed = importlib.util.find_spec("unsloth") is not None
    if choice is True and not installed:
        raise PipelineError(
            "use_unsloth is true but unsloth is not installed: pip install --no-deps -r requirements-unsloth.txt, "
            'or set "use_unsloth": "auto"'
        )
    if choice == "auto":
        return installed and torch.cuda.is_available()
    return bool(choice)


def compute_dtype():
    import torch

    if not torch.cuda.is_available():
        return torch.float32  # CPU kernels: full precision
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_tokenizer(base_model: str, adapter: str, chat: ChatFormat):
    """The SFT adapter's own tokenizer when it ships one (it already has the template tokens), else the base's;
    with a SentencePiece model (tokenizer.model), made to tokenize as it does or refused (sentencepiece_check)."""
    from transformers import AutoTokenizer

    from .sentencepiece_check import conform_to_sentencepiece

    try:
        tokenizer, where = AutoTokenizer.from_pretrained(adapter), adapter
    except (OSError, ValueError):
        tokenizer, where = AutoTokenizer.from_pretrained(base_model), base_model
    warn_if_shipped_template_differs(tokenizer, where, chat)
    install_chat_format(tokenizer, chat)
    tokenizer.loaded_from = where  # named in the run's own fidelity check (prompts.check_run_texts)
    conform_to_sentencepiece(tokenizer, where, folders=[base_model] if where == adapter else [])
    return tokenizer


def _import_unsloth():
    os.environ.setdefault("UNSLOTH_SKIP_TORCHVISION_CHECK", "1")  # torchvision is only needed for vision models
    import unsloth  # noqa: F401  (must come before transformers' models are built, to patch them)
    from unsloth import FastLanguageModel

    return FastLanguageModel


def one_4bit_path_on_the_cpu(model) -> None:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a 4-bit layer's weights for a bfloat16 kernel whenever the
    layer runs without gradients in eval mode: the frozen reference's pass (and generation) would then compute in
    bfloat16 while the policy's training pass dequantizes in float32, and before training, when the two are one
    adapter, they would disagree by up to 0.06 nats (the reference guard refuses that). Every layer keeps the one
    float32 path, as on CPUs without the instruction; on a GPU nothing changes."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(source, tokenizer, unsloth: bool):
    """The base LLM in 4-bit (or full precision), its embeddings resized to the tokenizer with template tokens."""
    import torch

    dtype = compute_dtype()
    if unsloth:
        FastLanguageModel = _import_unsloth()
        model, _ = FastLanguageModel.from_pretrained(
            model_name=source.base_model, load_in_4bit=source.load_in_4bit, dtype=dtype,
            max_seq_length=2048, device_map=device_name(),
        )
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = None
        if source.load_in_4bit:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        model = AutoModelForCausalLM.from_pretrained(
            source.base_model, quantization_config=quantization, dtype=dtype,
            device_map={"": device_name()} if torch.cuda.is_available() else None,
        )
    if source.load_in_4bit and not torch.cuda.is_available():
        one_4bit_path_on_the_cpu(model)
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        # The SFT adapter was trained after adding the template tokens; its saved embeddings have this size. Its
        # saved embedding and LM-head copies replace the new rows, so no mean initialisation (on Llama-2-7B that
        # computes a 4096 x 4096 covariance and prints two lines at every load).
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_generator(source, trainable: bool = False):
    """(model, tokenizer): base + SFT adapter (as adapter "default"), ready to generate or to train."""
    import torch
    from peft import PeftModel

    chat = load_chat_format(source.chat_template)
    unsloth = use_unsloth(source.use_unsloth)
    try:
        tokenizer = load_tokenizer(source.base_model, source.adapter, chat)
        base = load_base(source, tokenizer, unsloth)
        model = PeftModel.from_pretrained(base, source.adapter, is_trainable=trainable)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot load the generator (base {source.base_model}, adapter {source.adapter}): {e}") from None
    if not trainable:
        model.eval()
        if unsloth:
            _import_unsloth().for_inference(model)
    # unsloth's CUDA forward hands back no plain transformers cache to share (bench/gpu_unsloth.sh on an H200:
    # prefill_cache declined it), so generation there goes straight to the plain num_return_sequences call
    # instead of paying for a prefill it cannot use. On the CPU unsloth runs transformers' code and shares it.
    model.unsloth_cuda_decode = unsloth and torch.cuda.is_available()
    return model, tokenizer


def add_adapter(model, path: str, name: str, source: str) -> None:
    """A second adapter (the DPO one, key dpo_adapter) on the same base: model.set_adapter(name) switches to it."""
    try:
        model.load_adapter(path, adapter_name=name)
    except (OSError, ValueError, RuntimeError) as e:
        raise PipelineError(f"{source}: key dpo_adapter: cannot load {path} ({type(e).__name__}: {e})") from None


def classifier_labels(path: str) -> list[str]:
    """The classifier's own output names, in output order."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read the classifier's config ({e})") from None
    return [str(config.id2label[i]) for i in sorted(config.id2label)]


def generic_labels(labels) -> bool:
    """transformers' placeholder names (LABEL_0, LABEL_1, ...): a classifier saved without its label names."""
    return all(label == f"LABEL_{i}" for i, label in enumerate(labels))


def check_emotion_labels(path: str, emotion_labels) -> None:
    """emotion_labels names the classifier's outputs by position, as the reference does: one name per output.
    Generic names are replaced silently; other names that disagree are replaced with a warning showing both."""
    own = classifier_labels(path)
    if len(own) != len(emotion_labels):
        raise PipelineError(
            f"{path}: the emotion classifier has {len(own)} outputs ({', '.join(own)}), but emotion_labels names "
            f"{len(emotion_labels)} ({', '.join(emotion_labels)}); emotion_labels must name each output, in order"
        )
    if not generic_labels(own) and [x.lower() for x in own] != [x.lower() for x in emotion_labels]:
        warnings.warn(
            f"{path}: the emotion classifier names its outputs {', '.join(own)}; emotion_labels "
            f"({', '.join(emotion_labels)}) renames them by position, as the reference does", stacklevel=2,
        )


def label_maps(labels) -> dict:
    """id2label/label2id for `labels` by position: what the reference passes every time it loads the classifier."""
    return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_adapter_path(value: str, key: str, source: str) -> None:
    """A local adapter folder must exist and hold adapter_config.json; only a plausible Hub id (`owner/name`
    whose `owner` is no local folder) is left for the Hub to answer."""
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "adapter_config.json").is_file():
            raise PipelineError(f"{source}: key {key}: {value} has no adapter_config.json (not a PEFT adapter folder)")
        return
    if HUB_ID.fullmatch(value) and not Path(value.split("/")[0]).is_dir():
        return
    hint = " (fine_tune_dpo.py writes it: run that first, or point dpo_adapter at its final_adapter)" \
        if key == "dpo_adapter" else ""
    raise PipelineError(f"{source}: key {key}: adapter folder {value} does not exist{hint}")


def check_classifiers(emotion_classifier: str, gibberish_detector: str, emotion_labels) -> None:
    """Before generating: the emotion classifier has one output per emotion_labels entry, and the gibberish
    detector knows the labels the rewards compare against (case-insensitively)."""
    check_emotion_labels(emotion_classifier, emotion_labels)
    have = {label.lower() for label in classifier_labels(gibberish_detector)}
    missing = [label for label in GIBBERISH_LABELS if label not in have]
    if missing:
        raise PipelineError(
            f"{gibberish_detector}: gibberish detector has no label {', '.join(repr(m) for m in missing)} "
            f"(its labels: {', '.join(sorted(have))})"
        )


def load_classifier(path: str, batch_size: int, labels=None):
    """A text-classification pipeline; `labels` (emotion_labels) name the outputs by position."""
    from transformers import pipeline

    model_kwargs = {}
    if labels is not None:
        check_emotion_labels(path, labels)
        model_kwargs = label_maps(labels)
    return pipeline("text-classification", model=path, device=device_name(), batch_size=batch_size,
                    model_kwargs=model_kwargs)
