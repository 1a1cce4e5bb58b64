"""DPO's prefix-shared forward pass (emotion_dpo/dpo_prefix.py) and the reference computed once
(emotion_dpo/dpo_reference.py) give what TRL's own path gives: per-pair log-probs, loss, gradients, trained adapter.

The expected values come from TRL's DPOTrainer itself: its concatenated two-row forward (the model called on TRL's
collated batch, TRL's selective_log_softmax over its completion mask) and its `compute_loss` with prefix sharing
off. fp32 on the CPU, on the demo world's Llama."""

import json
import re
from pathlib import Path

import pytest
import torch

from emotion_dpo.config import TrainConfig, load_config
from emotion_dpo.dpo_data import load_preferences
from emotion_dpo.dpo_prefix import build_layout, compact_inputs, shared_forward, split_pairs
from emotion_dpo.dpo_reference import REFERENCE_LOGPS
from emotion_dpo.dpo_train import build_dpo_config, make_trainer
from emotion_dpo.models import load_generator, load_tokenizer
from emotion_dpo.template import context_ids, load_chat_format

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "args/demo/dpo_arg.json"
NATS = 1e-5  # per pair, chosen and rejected sequence log-probs
RELATIVE = 1e-5  # loss and LoRA gradients of one step

SYSTEM = "[INST]<<SYS>>\nyou are a friendly chat bot .\n<</SYS>>\n\n"
TURN = "<s>[INST] [EMOTION] {e} [/EMOTION] {u} [/INST] [EMOTION] {e} [/EMOTION] {a} </s>\n"
ASK = "<s>[INST] [EMOTION] {e} [/EMOTION] {u} [/INST] [EMOTION] happiness [/EMOTION]"
# (history turns, user line, chosen, rejected): prompts of different lengths, a reply of one token (EOS alone)
PAIRS = [
    (0, "hello .", "hi , nice to meet you .", "what ?"),
    (2, "i got the job today !", "that is wonderful news , congratulations !", ""),
    (1, "how was your weekend ?", "", "it was boring and i hated it ."),
    (0, "do you like music ?", "yes , i love it .", "no no no no no no no no no no ."),
    (2, "we should go out for dinner .", "good idea , i know a great place .", "whatever ."),
    (1, "i am tired .", "you should get some rest , then .", "so what ."),
]


def rendered_prompt(history: int, user: str) -> str:
    turns = "".join(TURN.format(e="neutral", u=f"turn {i} of the talk .", a="i see , tell me more .")
                    for i in range(history))
    first = ASK.format(e="neutral", u=user)
    return (turns + first).replace("<s>[INST] ", "<s>" + SYSTEM, 1) if history else first


def write_pairs(path: Path, tokenizer) -> Path:
    rows = []
    for history, user, chosen, rejected in PAIRS:
        prompt = rendered_prompt(history, user)

        def reply_ids(text):
            return (tokenizer(" " + text, add_special_tokens=False)["input_ids"] if text else []) + [
                tokenizer.eos_token_id]

        rows.append({"prompt": prompt, "chosen": chosen or "<eos>", "rejected": rejected or "<eos>",
                     "prompt_ids": context_ids(tokenizer, prompt), "chosen_ids": reply_ids(chosen),
                     "rejected_ids": reply_ids(rejected)})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_config(demo_world, tmp_path, *extra):
    sets = [f"base_model={demo_world / 'base'}", f"adapter={demo_world / 'sft_adapter'}",
            f"chat_template={ROOT / 'args/chat_template.json'}", "dataset=PLACEHOLDER", f"output_dir={tmp_path / 'run'}",
            "wandb.mode=disabled", 'dpo.loss_type=["sigmoid"]', "eval_fraction=0.0", "dpo.max_length=512",
            f"dpo.per_device_train_batch_size={len(PAIRS)}", *extra]
    cfg = load_config(TrainConfig, DEMO_CONFIG, sets)
    chat = load_chat_format(cfg.chat_template)
    dataset = write_pairs(tmp_path / "pairs.jsonl", load_tokenizer(cfg.base_model, cfg.adapter, chat))
    return cfg.model_copy(update={"dataset": str(dataset)}), chat


def build(demo_world, tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg, chat = make_config(demo_world, tmp_path, *extra)
    train_set, _ = load_preferences(cfg, chat.special_tokens)
    model, tokenizer = load_generator(cfg, trainable=True)
    return make_trainer(cfg, model, tokenizer, build_dpo_config(cfg, False), train_set, None)


def whole_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


@pytest.fixture(scope="module")
def trainer(demo_world, tmp_path_factory):
    return build(demo_world, tmp_path_factory.mktemp("prefix"))


@pytest.fixture(scope="module")
def trainer_4bit(demo_world, tmp_path_factory):
    return build(demo_world, tmp_path_factory.mktemp("prefix4"), "load_in_4bit=true")


def sequence_logps(trainer, batch, adapter):
    """Per sequence (chosen rows, then rejected rows): the summed completion log-probs the way TRL's _compute_loss
    computes them from a model call on `batch` (the sum in float64)."""
    from trl.trainer.utils import selective_log_softmax, use_adapter

    model = trainer.model
    kwargs = {k: v for k, v in batch.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    with torch.no_grad(), use_adapter(model, adapter):
        logits = model(**kwargs, use_cache=False).logits[..., :-1, :]
    per_token = selective_log_softmax(logits, batch["input_ids"][..., 1:], row_mask=batch["completion_mask"][..., 1:])
    # summed in float64: a float32 sum of over 128 nats has a last bit of 1.5e-5, whichever pass fed it
    return per_token.double().sum(1)


def shared_logps(trainer, batch, adapter, padding_side="right", pack_tokens=0, block=None):
    pairs, why = split_pairs(batch)
    assert why is None
    rule = {} if block is None else {"block_rejected_from_chosen": block}
    layout = build_layout(pairs, trainer.data_collator.pad_token_id, padding_side, pack_tokens, **rule)
    with shared_forward(trainer.model, layout, trainer.accelerator.autocast):
        return sequence_logps(trainer, compact_inputs(batch, layout), adapter)


def test_the_batch_holds_prompts_of_different_lengths_and_a_reply_of_one_token(trainer):
    rows = trainer.train_dataset
    assert len({len(p) for p in rows["prompt_ids"]}) >= 3
    assert min(len(c) for c in list(rows["chosen_ids"]) + list(rows["rejected_ids"])) == 1


@pytest.mark.parametrize("adapter", ["default", "ref"])
@pytest.mark.parametrize("padding_side,pack_tokens", [("right", 0), ("left", 0), ("right", 400), ("left", 10_000)])
def test_shared_pass_log_probs_equal_trls_concatenated_forward(trainer, adapter, padding_side, pack_tokens):
    trainer.model.eval()
    batch = whole_batch(trainer)
    expected = sequence_logps(trainer, batch, adapter)
    got = shared_logps(trainer, batch, adapter, padding_side, pack_tokens)
    assert (got - expected).abs().max() <= NATS, (got - expected)


def test_packing_puts_several_pairs_in_one_row(trainer):
    pairs, _ = split_pairs(whole_batch(trainer))
    assert build_layout(pairs, 0, pack_tokens=10_000).input_ids.shape[0] == 1
    assert build_layout(pairs, 0).input_ids.shape[0] == len(PAIRS)


@pytest.mark.parametrize("adapter", ["default", "ref"])
def test_shared_pass_on_a_4bit_base_equals_trls_concatenated_forward(trainer_4bit, adapter):
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer_4bit.model.modules())
    trainer_4bit.model.eval()
    batch = whole_batch(trainer_4bit)
    expected = sequence_logps(trainer_4bit, batch, adapter)
    got = shared_logps(trainer_4bit, batch, adapter)
    assert (got - expected).abs().max() <= NATS, (got - expected)


def test_the_trainers_reference_pass_equals_trls(trainer):
    trainer.model.eval()
    batch = whole_batch(trainer)
    trainer.prefix_sharing_on = False
    expected = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    trainer.prefix_sharing_on = True
    got = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    # TRL sums in float32: up to its last bit (1.5e-5 above 128 nats) besides
    assert ((got - expected).abs() <= NATS + torch.finfo(torch.float32).eps * expected.abs()).all()


def test_a_mask_that_lets_rejected_see_chosen_is_caught(trainer):
    """The exactness check has the power to see a broken mask: only the rejected replies move."""
    trainer.model.eval()
    batch = whole_batch(trainer)
    expected = sequence_logps(trainer, batch, "default")
    broken = shared_logps(trainer, batch, "default", block=False)
    chosen, rejected = (broken - expected).abs().chunk(2)
    assert chosen.max() <= NATS and rejected.max() > 100 * NATS


def loss_and_lora_grads(trainer, batch, shared: bool):
    trainer.prefix_sharing_on = shared
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
             if p.grad is not None and "lora_" in n}
    trainer.model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_steps_loss_and_lora_gradients_equal_trls(trainer, checkpointing):
    trainer.prefix_sharing_on = True  # the module fixture's other tests expect it on
    inner = trainer.model.base_model.model
    if checkpointing:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        trainer.model.enable_input_require_grads()
    try:
        batch = whole_batch(trainer)
        # a step away from the start, so the loss is not ln 2 and the reference differs from the policy
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if ".default." in name and "lora_B" in name:
                    param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
        loss_trl, grads_trl = loss_and_lora_grads(trainer, batch, shared=False)
        loss, grads = loss_and_lora_grads(trainer, batch, shared=True)
    finally:
        trainer.prefix_sharing_on = True
        if checkpointing:
            inner.gradient_checkpointing_disable()
    assert abs(float(loss - loss_trl)) <= RELATIVE * abs(float(loss_trl))
    assert grads.keys() == grads_trl.keys() and grads
    assert any(g.abs().max() > 0 for g in grads_trl.values())
    for name, expected in grads_trl.items():
        assert (grads[name] - expected).norm() <= RELATIVE * expected.norm() + 1e-12, name


def trained_adapter(demo_world, tmp_path, *levers):
    trainer = build(demo_world, tmp_path, "dpo.max_steps=8", "dpo.per_device_train_batch_size=3",
                    "dpo.learning_rate=1e-3", "dpo.save_strategy=no", "dpo.logging_steps=1", *levers)
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".default." in n}, trainer


def test_eight_steps_with_the_levers_on_train_the_adapter_the_plain_path_trains(demo_world, tmp_path):
    plain, _ = trained_adapter(demo_world, tmp_path / "plain", "prefix_sharing=false",
                               "dpo.precompute_ref_log_probs=false")
    levers, trainer = trained_adapter(demo_world, tmp_path / "levers", "prefix_sharing=true",
                                      "pack_pairs_tokens=400", "dpo.precompute_ref_log_probs=true")
    assert trainer.state.global_step == 8 and trainer.state.epoch > 1  # the precomputed reference reused per epoch
    assert plain.keys() == levers.keys()
    moved = max(float((levers[n] - plain[n]).abs().max()) for n in plain)
    assert moved <= 1e-4
    sft = build(demo_world, tmp_path / "sft")
    sft_lora = {n: p for n, p in sft.model.named_parameters() if ".default." in n and "lora_B" in n}
    assert any(not torch.allclose(sft_lora[n], levers[n]) for n in sft_lora)  # it did train


def test_the_reference_log_probs_are_kept_in_the_run_folder_and_reused(demo_world, tmp_path, monkeypatch):
    import trl

    first = build(demo_world, tmp_path, "dpo.precompute_ref_log_probs=true")
    saved = Path(first.args.output_dir) / REFERENCE_LOGPS / "train.json"
    record = json.loads(saved.read_text())
    first.model.eval()
    expected = first.compute_ref_log_probs(first.model, whole_batch(first))  # the reference pass itself
    assert torch.allclose(torch.tensor(record["ref_chosen_logps"]), expected[0], atol=NATS, rtol=0)
    assert torch.allclose(torch.tensor(record["ref_rejected_logps"]), expected[1], atol=NATS, rtol=0)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the reference log-probs were computed again")

    monkeypatch.setattr(trl.DPOTrainer, "_precompute_ref_logps", no_second_pass)
    again = build(demo_world, tmp_path, "dpo.precompute_ref_log_probs=true")  # as --resume builds it
    assert again.train_dataset["ref_chosen_logps"] == pytest.approx(record["ref_chosen_logps"], abs=0)
    monkeypatch.undo()
    other = build(demo_world, tmp_path, "dpo.precompute_ref_log_probs=true", "dpo.max_length=500")  # other inputs
    assert json.loads(saved.read_text())["key"] != record["key"] and len(other.train_dataset) > 0


# ---------------------------------------------------------------- the reference log-probs' file: stale or wrong, never used

def reference_file(trainer) -> Path:
    return Path(trainer.args.output_dir) / REFERENCE_LOGPS / "train.json"


def numbers_sha256(record) -> str:
    """The file's checksum by its rule: sha256 of {"ref_chosen_logps": [...], "ref_rejected_logps": [...]} as JSON
    with sorted keys."""
    import hashlib

    numbers = {c: record[c] for c in ("ref_chosen_logps", "ref_rejected_logps")}
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()


def assert_the_reference_pass_gave_them(trainer):
    """The trainer's ref columns are what its own reference pass (TRL's compute_ref_log_probs) gives now."""
    trainer.model.eval()
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, whole_batch(trainer))
    assert torch.allclose(torch.tensor(trainer.train_dataset["ref_chosen_logps"]), chosen, atol=NATS, rtol=0)
    assert torch.allclose(torch.tensor(trainer.train_dataset["ref_rejected_logps"]), rejected, atol=NATS, rtol=0)


@pytest.mark.parametrize("change, named", [("dpo.ld_alpha=0.5", "ld_alpha"), ("load_in_4bit=true", "load_in_4bit")])
def test_reference_log_probs_of_another_ld_alpha_or_base_loading_are_computed_again(demo_world, tmp_path, capsys,
                                                                                   change, named):
    """TRL weights the reference's log-probs past the pair's shared length by ld_alpha, and a 4-bit base gives
    other numbers: the file of a run without them is not theirs."""
    first = build(demo_world, tmp_path, "dpo.precompute_ref_log_probs=true")
    before = json.loads(reference_file(first).read_text())
    capsys.readouterr()
    again = build(demo_world, tmp_path, "dpo.precompute_ref_log_probs=true", change)
    notice = capsys.readouterr().out
    assert f"{reference_file(again)}: computed for other inputs (" in notice and named in notice
    assert "computing the reference log-probs again" in notice
    assert again.train_dataset["ref_chosen_logps"] != before["ref_chosen_logps"]
    assert_the_reference_pass_gave_them(again)


@pytest.mark.parametrize("damage", ["edited", "not finite"])
def test_reference_log_probs_edited_or_not_finite_are_computed_again(demo_world, tmp_path, capsys, damage):
    """A number changed by hand (the checksum as written) or a NaN (even under a checksum that matches it)."""
    first = build(demo_world, tmp_path, "dpo.precompute_ref_log_probs=true")
    path = reference_file(first)
    record = json.loads(path.read_text())
    if damage == "edited":
        record["ref_chosen_logps"][1] += 65.0
        expected = "its numbers do not match the checksum they were written with (edited or damaged)"
    else:
        record["ref_rejected_logps"][2] = float("nan")
        record["sha256"] = numbers_sha256(record)
        expected = "holds a number that is not finite (pair 2, ref_rejected_logps: nan)"
    path.write_text(json.dumps(record))
    capsys.readouterr()
    again = build(demo_world, tmp_path, "dpo.precompute_ref_log_probs=true")
    assert f"{path}: {expected}; computing the reference log-probs again" in capsys.readouterr().out
    assert_the_reference_pass_gave_them(again)
    rewritten = json.loads(path.read_text())
    assert rewritten["sha256"] == numbers_sha256(rewritten)  # the recomputed numbers, under their own checksum


def test_the_guard_names_the_reference_log_probs_file_when_its_numbers_disagree_with_the_reference_pass(
        demo_world, tmp_path):
    """Numbers wrong past their checksum (edited, checksum rewritten): the first-batch guard names the file, not
    the reference pass, which is right."""
    from emotion_dpo.dpo_guard import guard_reference
    from emotion_dpo.errors import PipelineError

    first = build(demo_world, tmp_path, "dpo.precompute_ref_log_probs=true")
    path = reference_file(first)
    record = json.loads(path.read_text())
    record["ref_chosen_logps"][0] -= 65.0
    record["sha256"] = numbers_sha256(record)
    path.write_text(json.dumps(record))
    trainer = build(demo_world, tmp_path, "dpo.precompute_ref_log_probs=true", "dpo.max_steps=1",
                    "dpo.save_strategy=no")
    guard_reference(trainer, Path(trainer.args.output_dir), None, True)
    with pytest.raises(PipelineError, match=re.escape(f"{path} (read from the run folder): on the first batch its "
                                                      "reference log-probs differ from the reference pass by up to "
                                                      "65") + r".*delete it to compute them again"):
        trainer.train()
