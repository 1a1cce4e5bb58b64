"""For every pair, the token ids DPO trains on are exactly what generation did: the prompt ids TRL's DPOTrainer
builds equal the ids the generator was conditioned on (one BOS), and prompt + chosen / prompt + rejected are those
ids, the reply's generated ids and the EOS. The same for evaluate and for --reselect.

The generator's side is read from the model's own `generate` calls (its inputs and outputs, recorded here); the
trainer's side from TRL's prepared dataset and its DataCollatorForPreference. Two tokenizers: the demo world's
Llama-like one (LlamaTokenizer: BOS added by default, `▁` spaces) and a generic PreTrainedTokenizerFast whose BOS
comes from a TemplateProcessing post-processor."""

import json
import shutil
from pathlib import Path

import datasets
import pytest

from emotion_dpo.config import EvaluateConfig, GenerateConfig, TrainConfig, load_config
from emotion_dpo.dpo_data import load_preferences
from emotion_dpo.dpo_train import build_dpo_config, make_trainer
from emotion_dpo.models import load_generator

ROOT = Path(__file__).resolve().parents[1]


def post_processor_adapter(demo_world, folder: Path) -> Path:
    """The SFT adapter with its tokenizer saved as a generic PreTrainedTokenizerFast whose BOS comes from an
    explicit TemplateProcessing post-processor (same vocabulary, so the model fits)."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    shutil.copytree(demo_world / "sft_adapter", folder)
    llama = AutoTokenizer.from_pretrained(folder)
    core = Tokenizer.from_str(llama.backend_tokenizer.to_str())
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", llama.bos_token_id)])
    # the template's tokens come with the tokenizer's added tokens (load_tokenizer marks them special again)
    generic = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token=llama.pad_token)
    generic.chat_template = llama.chat_template
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    generic.save_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    assert type(loaded).__name__ != "LlamaTokenizer"  # transformers 5's generic tokenizers class
    assert "TemplateProcessing" in repr(loaded.backend_tokenizer.post_processor)
    assert loaded("hi")["input_ids"][0] == loaded.bos_token_id
    return folder


@pytest.fixture(scope="module", params=["llama-like", "bos post-processor"])
def adapter(request, demo_world, tmp_path_factory):
    if request.param == "llama-like":
        return demo_world / "sft_adapter"
    return post_processor_adapter(demo_world, tmp_path_factory.mktemp("generic") / "sft_adapter")


class GenerateSpy:
    """Records every `generate` call: each row's unpadded input ids and its new ids up to and including the first
    EOS (all of them when generation was cut off at max_new_tokens)."""

    def __init__(self, monkeypatch):
        from peft import PeftModelForCausalLM

        self.calls = []
        original = PeftModelForCausalLM.generate

        def generate(model, *args, **kwargs):
            output = original(model, *args, **kwargs)
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            eos = kwargs["generation_config"].eos_token_id
            for row, new in zip(range(len(ids)), output[:, ids.shape[1]:].tolist()):
                context = ids[row][mask[row].bool()].tolist()
                self.calls.append((tuple(context), tuple(new[:new.index(eos) + 1] if eos in new else new)))
            return output

        monkeypatch.setattr(PeftModelForCausalLM, "generate", generate)

    def replies_by_context(self) -> dict:
        seen = {}
        for context, reply in self.calls:
            seen.setdefault(context, set()).add(reply)
        return seen


def overrides(demo_world, adapter, output_dir, *extra):
    w = demo_world
    return [f"base_model={w / 'base'}", f"adapter={adapter}", f"dataset={w / 'dialogues'}",
            f"emotion_classifier={w / 'emotion_classifier'}", f"gibberish_detector={w / 'gibberish_detector'}",
            f"chat_template={ROOT / 'args/chat_template.json'}", f"output_dir={output_dir}", "wandb.mode=disabled",
            *extra]


@pytest.fixture(scope="module")
def generated(demo_world, adapter, tmp_path_factory):
    from emotion_dpo.generate import generate

    out = tmp_path_factory.mktemp("exact") / "preferences"
    cfg = load_config(GenerateConfig, ROOT / "args/demo/generate_preferences_arg.json",
                      overrides(demo_world, adapter, out, "num_prompts=12", "max_retries=4"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = GenerateSpy(monkeypatch)
        generate(cfg)
    return cfg, out, spy


def trainer_on(demo_world, adapter, dataset, tmp_path):
    cfg = load_config(TrainConfig, ROOT / "args/demo/dpo_arg.json", [
        f"base_model={demo_world / 'base'}", f"adapter={adapter}", f"dataset={dataset}", "eval_fraction=0.0",
        f"chat_template={ROOT / 'args/chat_template.json'}", f"output_dir={tmp_path / 'dpo'}", "wandb.mode=disabled"])
    train_set, _ = load_preferences(cfg)
    model, tokenizer = load_generator(cfg, trainable=True)
    return make_trainer(cfg, model, tokenizer, build_dpo_config(cfg, False), train_set, None), tokenizer


def assert_trains_on_what_was_generated(trainer, tokenizer, spy):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    bos = tokenizer.bos_token_id
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert rows, "no preference pair to check"
    replies = spy.replies_by_context()
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    for row in rows:
        prompt = row["prompt_ids"]
        assert tuple(prompt) in replies, "DPO's prompt ids are not ids the generator was conditioned on"
        assert prompt[0] == bos and prompt[1] != bos  # one BOS
        batch = collator([{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        for sequence, mask, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
            ids = sequence[mask.bool()].tolist()
            reply = ids[len(prompt):]
            assert ids[:len(prompt)] == prompt
            # the generated ids, with the EOS when generation stopped on it (a cut-off reply has none)
            assert tuple(reply) in replies[tuple(prompt)]
            assert completion[mask.bool()].tolist() == [0] * len(prompt) + [1] * len(reply)


def test_dpo_trains_on_the_ids_generate_preferences_sampled(generated, demo_world, adapter, tmp_path):
    cfg, out, spy = generated
    trainer, tokenizer = trainer_on(demo_world, adapter, out / "dataset", tmp_path)
    assert_trains_on_what_was_generated(trainer, tokenizer, spy)
    stored = datasets.load_from_disk(str(out / "dataset"))
    assert len(trainer.train_dataset) == len(stored)  # no pair dropped or re-cut


def test_a_reselected_dataset_trains_on_the_same_ids(generated, demo_world, adapter, tmp_path):
    from emotion_dpo.generate import reselect_run

    cfg, out, spy = generated
    lenient = load_config(GenerateConfig, ROOT / "args/demo/generate_preferences_arg.json",
                          overrides(demo_world, adapter, out, "num_prompts=12", "max_retries=4",
                                    "target_score_range=1.0", "min_chosen_score=0.0"))
    reselect_run(lenient, str(tmp_path / "reselected"))
    trainer, tokenizer = trainer_on(demo_world, adapter, tmp_path / "reselected" / "dataset", tmp_path)
    assert len(trainer.train_dataset) >= len(datasets.load_from_disk(str(out / "dataset")))
    assert_trains_on_what_was_generated(trainer, tokenizer, spy)


def test_evaluate_conditions_on_the_ids_generation_and_dpo_use(generated, demo_world, adapter, tmp_path,
                                                                monkeypatch):
    from emotion_dpo.evaluation import evaluate

    cfg, out, generate_spy = generated
    spy = GenerateSpy(monkeypatch)
    evaluate(load_config(EvaluateConfig, ROOT / "args/demo/evaluate_arg.json", overrides(
        demo_world, adapter, tmp_path / "eval", "dataset_split=train+validation", "num_prompts=12",
        "include_base=false", "replies_per_prompt=1", f"dpo_adapter={adapter}")))
    contexts = [context for context, _ in spy.calls]
    assert len(contexts) == 2 * 12  # SFT and "DPO", one reply per prompt
    # the generator's first round conditioned on the same 12 contexts, in the same order
    first_round = list(dict.fromkeys(context for context, _ in generate_spy.calls))[:12]
    assert contexts[:12] == contexts[12:] == first_round
    trainer, tokenizer = trainer_on(demo_world, adapter, out / "dataset", tmp_path)
    assert {tuple(row["prompt_ids"]) for row in trainer.train_dataset} <= set(contexts)
    assert all(c[0] == tokenizer.bos_token_id and c[1] != tokenizer.bos_token_id for c in contexts)
    stored = [json.loads(line) for line in (tmp_path / "eval" / "replies.jsonl").read_text().splitlines()]
    assert [tuple(r["prompt_ids"]) for r in stored] == contexts[:12]


def test_a_text_only_dataset_is_tokenized_as_generation_conditions_and_continues(generated, demo_world, adapter,
                                                                                  tmp_path):
    """Preference data without ids (another tool's, or the Hub's): the prompt's context ids, then the reply's ids as
    the reference template ends a reply (the stripped reply, ' ' + EOS), up to the EOS; never a second BOS, never a
    lone space token before the reply."""
    _, out, _ = generated
    text_only = datasets.load_from_disk(str(out / "dataset")).select_columns(["prompt", "chosen", "rejected"])
    text_only.save_to_disk(str(tmp_path / "text_only"))
    trainer, tokenizer = trainer_on(demo_world, adapter, tmp_path / "text_only", tmp_path)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for row, text in zip(trainer.train_dataset, text_only):
        assert text["prompt"].endswith("[/EMOTION] ")
        # by hand, the reference's rule for a finished reply: dialog.strip() + ' ' + eos_token (then a newline)
        whole = tokenizer(text["prompt"] + text["chosen"].strip() + " " + tokenizer.eos_token,
                          add_special_tokens=False)["input_ids"]
        # by hand: the tokens of the prompt with its final space dropped are where prompt + reply starts
        assert row["prompt_ids"] == tokenizer(text["prompt"][:-1], add_special_tokens=False)["input_ids"]
        assert row["prompt_ids"] + row["chosen_ids"] == whole and whole[-1] == eos
        assert row["prompt_ids"][:2] == [bos, tokenizer.convert_tokens_to_ids("[INST]")]
        assert tokenizer.decode(row["chosen_ids"][:1]).strip()  # the reply starts with a word
