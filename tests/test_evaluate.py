"""evaluate.py: metrics checked by hand, a model compared with itself, and bad input refused early."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from emotion_dpo.config import EvaluateConfig, load_config
from emotion_dpo.errors import PipelineError
from emotion_dpo.evaluation import evaluate, model_metrics, prepare_output_dir, win_rate
from emotion_dpo.models import check_adapter_path
from conftest import demo_evaluation_overrides

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "args/demo/evaluate_arg.json"


def reply(text, emotion, gibberish="clean", gconf=0.9, total=10.0):
    return SimpleNamespace(text=text, emotion_label=emotion, gibberish_label=gibberish, gibberish_confidence=gconf,
                           length=len(text), total=total, emotion_reward=1.0, length_reward=2.0, gibberish_reward=3.0)


def test_metrics_on_hand_made_replies():
    targets = ["happiness", "happiness", "anger", "sadness"]
    replies = [reply("yay !", "happiness"), reply("oh no", "sadness", gconf=0.5),
               reply("grr !", "anger", gibberish="word salad"), reply("sigh .", "happiness")]
    m = model_metrics(targets, replies, clean_confidence=0.8, endings=["!", ".", "?"])
    assert m["emotion_accuracy"] == pytest.approx(2 / 4)
    # F1 by class: happiness P=1/2 R=1/2 -> 0.5; anger 1.0; sadness P=0 R=0 -> 0; macro over the 3 targets
    assert m["emotion_macro_f1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["per_emotion_accuracy"] == {"anger": 1.0, "happiness": 0.5, "sadness": 0.0}
    assert m["clean_rate"] == pytest.approx(2 / 4)  # "oh no" is clean but only 0.5 sure; "grr !" is word salad
    assert m["cutoff_rate"] == pytest.approx(1 / 4)  # "oh no"
    assert m["mean_length"] == pytest.approx((5 + 5 + 5 + 6) / 4)
    assert m["mean_total_reward"] == 10.0 and m["mean_gibberish_reward"] == 3.0


def test_a_reply_is_cut_off_unless_it_ends_in_a_complete_ending():
    replies = [reply("fine .", "neutral"), reply("what ?!", "neutral"), reply("and then", "neutral"),
               reply("", "neutral"), reply("wait ...", "neutral")]
    m = model_metrics(["neutral"] * 5, replies, clean_confidence=0.8, endings=["!", ".", "?"])
    assert m["cutoff_rate"] == pytest.approx(2 / 5)  # "and then" and the empty reply


def test_win_rate_counts_ties_as_half():
    w = win_rate([3, 2, 1, 5], [1, 2, 3, 4], samples=500, seed=0)
    assert w["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert (w["wins"], w["ties"], w["losses"]) == (2, 1, 1)
    assert 0 <= w["ci95"][0] <= w["win_rate"] <= w["ci95"][1] <= 1


def test_win_rate_of_identical_totals_is_one_half_with_no_spread():
    w = win_rate([1.0, 2.5, 7.0], [1.0, 2.5, 7.0], samples=200, seed=3)
    assert w["win_rate"] == 0.5 and w["ci95"] == [0.5, 0.5] and w["ties"] == 3


def test_adapter_paths_are_checked_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "not_an_adapter").mkdir(parents=True)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    check_adapter_path("adapter", "adapter", "cfg.json")  # a local adapter folder
    check_adapter_path("hermeschen1116/response_generator_for_emotion_chat_bot", "adapter", "cfg.json")  # Hub id
    with pytest.raises(PipelineError, match="cfg.json: key dpo_adapter: adapter folder outputs/final_adapter does not"):
        check_adapter_path("outputs/final_adapter", "dpo_adapter", "cfg.json")  # 'outputs' is a local folder
    with pytest.raises(PipelineError, match="key adapter: adapter folder ./sft does not exist"):
        check_adapter_path("./sft", "adapter", "cfg.json")
    with pytest.raises(PipelineError, match="has no adapter_config.json"):
        check_adapter_path("outputs/not_an_adapter", "dpo_adapter", "cfg.json")


def test_earlier_results_are_never_overwritten_silently(tmp_path):
    cfg = load_config(EvaluateConfig, DEMO_CONFIG, [f"output_dir={tmp_path / 'eval'}"])
    prepare_output_dir(cfg)
    prepare_output_dir(cfg)  # an unfinished run (config.json alone) is taken over
    (tmp_path / "eval" / "results.json").write_text("{}")
    with pytest.raises(PipelineError, match="already holds results; .* --fresh"):
        prepare_output_dir(cfg)
    prepare_output_dir(cfg, fresh=True)
    assert not (tmp_path / "eval" / "results.json").exists()
    assert len(list(tmp_path.glob("eval.old-*/results.json"))) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="holds no evaluation"):
        prepare_output_dir(load_config(EvaluateConfig, DEMO_CONFIG, [f"output_dir={tmp_path / 'other'}"]))
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "config.json").write_text(json.dumps({"dpo": {}, "output_dir": "dpo"}))  # another stage's
    with pytest.raises(PipelineError, match="holds no evaluation"):
        prepare_output_dir(load_config(EvaluateConfig, DEMO_CONFIG, [f"output_dir={tmp_path / 'dpo'}"]))


def demo_config(demo_world, output_dir, *extra):
    w = demo_world
    sets = [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dataset={w / 'dialogues'}",
            f"emotion_classifier={w / 'emotion_classifier'}", f"gibberish_detector={w / 'gibberish_detector'}",
            f"chat_template={ROOT / 'args/chat_template.json'}", f"output_dir={output_dir}", "wandb.mode=disabled",
            "include_base=false", "num_prompts=24", "replies_per_prompt=1", *demo_evaluation_overrides(w), *extra]
    return load_config(EvaluateConfig, DEMO_CONFIG, sets)


def test_a_model_compared_with_itself_under_the_same_seed_ties(demo_world, tmp_path):
    cfg = demo_config(demo_world, tmp_path / "eval", f"dpo_adapter={demo_world / 'sft_adapter'}")
    results = evaluate(cfg)
    sft, dpo = results["models"]["SFT"], results["models"]["DPO"]
    assert sft == dpo
    w = results["dpo_vs_sft"]
    assert w["ci95"][0] <= 0.5 <= w["ci95"][1]
    assert w["win_rate"] == 0.5
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / "eval" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "eval" / "config.json").read_text())["dpo_adapter"] == str(demo_world / "sft_adapter")
    assert "DPO vs SFT win rate by total reward: 0.500" in (tmp_path / "eval" / "results.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "eval" / "replies.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["SFT"]["text"] == r["DPO"]["text"] for r in rows)
    # the degeneration figures count the replies written: distinct texts and the most frequent one, by Counter
    from collections import Counter

    counts = Counter(r["SFT"]["text"].strip() for r in rows)
    figures = results["diversity"]
    assert figures["models"]["SFT"]["distinct_replies"] == len(counts) == figures["models"]["DPO"]["distinct_replies"]
    assert figures["models"]["SFT"]["most_frequent_count"] == counts.most_common(1)[0][1]
    assert figures["collapse"] == {"DPO": []}
    assert results["kl_to_sft"]["DPO"]["kl"] == pytest.approx(0, abs=1e-6)  # the DPO adapter is the SFT adapter
    assert "| distinct replies | " in (tmp_path / "eval" / "results.md").read_text()


@pytest.mark.parametrize("key", ["adapter", "dpo_adapter"])
def test_a_missing_adapter_path_is_a_clear_error(demo_world, tmp_path, key):
    cfg = demo_config(demo_world, tmp_path / "eval", f"dpo_adapter={demo_world / 'sft_adapter'}",
                      f"{key}={tmp_path / 'no/such/final_adapter'}")
    with pytest.raises(PipelineError, match=f"key {key}: adapter folder .*no/such/final_adapter does not exist"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()  # refused before any output, let alone a model


def test_a_test_split_with_no_usable_prompts_is_a_clear_error(demo_world, tmp_path):
    cfg = demo_config(demo_world, tmp_path / "eval", f"dpo_adapter={demo_world / 'sft_adapter'}", "num_turns_history=9")
    with pytest.raises(PipelineError, match="split 'test' has no dialogue with the 20 turns"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()


def test_a_test_split_of_too_short_dialogues_is_a_clear_error(demo_world, tmp_path):
    import datasets

    dialogues = datasets.load_from_disk(str(demo_world / "dialogues"))
    short = dialogues["test"].map(lambda row: {"prompt": row["prompt"][:2]})  # one user/assistant pair each
    datasets.DatasetDict({"train": dialogues["train"], "test": short}).save_to_disk(str(tmp_path / "dialogues"))
    cfg = demo_config(demo_world, tmp_path / "eval", f"dpo_adapter={demo_world / 'sft_adapter'}",
                      f"dataset={tmp_path / 'dialogues'}")
    with pytest.raises(PipelineError, match="dialogues: split 'test' has no dialogue with the 4 turns that "
                                            "num_turns_history=1 needs"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()


def test_the_cut_off_rate_uses_selections_ending_rule():
    # the reference's rule (selection.ending_of): the last character once spaces, and only spaces, are stripped
    replies = [reply("fine . ", "neutral"), reply("fine .\n", "neutral"), reply("ok", "neutral")]
    m = model_metrics(["neutral"] * 3, replies, clean_confidence=0.8, endings=["!", ".", "?"])
    assert m["cutoff_rate"] == pytest.approx(2 / 3)  # "fine .\n" and "ok"


def test_an_evaluation_folder_of_another_version_is_still_an_evaluation(tmp_path):
    from emotion_dpo.evaluation import is_evaluation_folder

    cfg = load_config(EvaluateConfig, DEMO_CONFIG, [f"output_dir={tmp_path / 'eval'}"])
    prepare_output_dir(cfg)
    saved = json.loads((tmp_path / "eval" / "config.json").read_text())
    (tmp_path / "eval" / "config.json").write_text(json.dumps({**saved, "a_key_of_a_later_version": 1}))
    assert is_evaluation_folder(tmp_path / "eval")
    del saved["bootstrap_samples"]  # a key an older version did not have
    (tmp_path / "eval" / "config.json").write_text(json.dumps(saved))
    assert is_evaluation_folder(tmp_path / "eval")
    (tmp_path / "eval" / "results.json").write_text("{}")
    with pytest.raises(PipelineError, match="already holds results"):  # not "holds no evaluation"
        prepare_output_dir(cfg)


def test_kl_to_sft_on_a_tiny_case_equals_the_log_prob_difference_computed_token_by_token(demo_world, tmp_path):
    """Two prompts, one reply each (one ended by EOS, one cut by max_new_tokens), an adapter 0.01 away from SFT:
    the estimate equals log p_dpo(y|x) - log p_SFT(y|x) summed here one token at a time, one sequence at a time."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from emotion_dpo.evaluation import kl_to_sft
    from emotion_dpo.models import add_adapter, load_generator
    from emotion_dpo.prompts import load_prompts

    moved = tmp_path / "moved"
    shutil.copytree(demo_world / "sft_adapter", moved)
    tensors = load_file(str(moved / "adapter_model.safetensors"))
    save_file({k: v + 0.01 if "lora_B" in k else v for k, v in tensors.items()},
              str(moved / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = demo_config(demo_world, tmp_path / "eval", f"dpo_adapter={moved}", "num_prompts=2")
    tokenizer, prompts = load_prompts(cfg)
    model, tokenizer = load_generator(cfg)
    add_adapter(model, str(moved), "dpo", cfg.source)
    eos = tokenizer.eos_token_id
    words = tokenizer("i am so happy .", add_special_tokens=False)["input_ids"]
    replies = [SimpleNamespace(token_ids=words), SimpleNamespace(token_ids=words[:3])]
    # both shorter than max_new_tokens 6: both were ended by an EOS, which counts as sampled
    estimate = kl_to_sft(model, "dpo", prompts, replies, eos, 6, batch_size=2)

    def by_hand(adapter, context, reply):
        model.set_adapter(adapter)
        total, ids = 0.0, list(context)
        with torch.no_grad():
            for token in reply:
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                total += float(logits.log_softmax(-1)[token])
                ids.append(token)
        return total

    differences = [by_hand("dpo", p.ids, r.token_ids + [eos]) - by_hand("default", p.ids, r.token_ids + [eos])
                   for p, r in zip(prompts, replies)]
    assert estimate["kl"] == pytest.approx(sum(differences) / 2, abs=1e-4)
    assert abs(estimate["kl"]) > 1e-3  # the adapters differ: not a trivial 0
    # a reply cut at max_new_tokens has no EOS: only its own ids count
    cut = kl_to_sft(model, "dpo", prompts[:1], replies[1:], eos, 3, batch_size=1)
    assert cut["kl"] == pytest.approx(by_hand("dpo", prompts[0].ids, words[:3])
                                      - by_hand("default", prompts[0].ids, words[:3]), abs=1e-4)


def test_a_bootstrap_interval_over_prompts_has_the_spread_worked_out_by_hand():
    from emotion_dpo.evaluation import bootstrap_interval

    constant = bootstrap_interval([[1, 1], [1, 1], [1, 1]], lambda v: sum(v) / len(v), 500, 0)
    assert constant == {"value": 1.0, "ci95": [1.0, 1.0]}
    # two prompts, one right (1) and one wrong (0): a resample of 2 prompts has mean 0, 1/2, 1/2 or 1 with equal
    # chance, so its SD is sqrt((1/4 + 0 + 0 + 1/4) / 4) = sqrt(1/8) = 0.354; the interval 0.5 +- 1.96 x 0.354
    spread = bootstrap_interval([[1], [0]], lambda v: sum(v) / len(v), 20000, 0)
    assert spread["value"] == 0.5
    assert spread["ci95"][1] - 0.5 == pytest.approx(1.96 * 0.125 ** 0.5, rel=0.03)


def test_the_worst_top_share_is_the_largest_share_one_text_takes_of_an_emotions_replies():
    from emotion_dpo.evaluation import worst_mean_top_share

    # one draw per prompt; sadness: "oh no ." 2 of 3 (0.667); happiness: 1 of 2 each (0.5)
    pairs = [("sadness", "oh no ."), ("sadness", " oh no . "), ("sadness", "sigh ."), ("happiness", "yay !"),
             ("happiness", "great !")]
    assert worst_mean_top_share(pairs, 1) == pytest.approx(2 / 3)
    assert worst_mean_top_share([], 1) == 0.0


def test_with_several_draws_the_worst_emotion_is_the_largest_of_the_emotions_shares_averaged_over_draws():
    from emotion_dpo.evaluation import worst_mean_top_share

    # 2 prompts per emotion, 2 draws each, prompt by prompt:
    # sadness, draw 0: "oh ." "oh ." -> 1.0; draw 1: "oh ." "no ." -> 0.5; mean 0.75
    # happiness, draw 0: "yay !" "fun !" -> 0.5; draw 1: "yay !" "yay !" -> 1.0; mean 0.75
    # -> 0.75, where the largest share within each draw (1.0 in both) would say 1.0
    pairs = [("sadness", "oh ."), ("sadness", "oh ."), ("sadness", "oh ."), ("sadness", "no ."),
             ("happiness", "yay !"), ("happiness", "yay !"), ("happiness", "fun !"), ("happiness", "yay !")]
    assert worst_mean_top_share(pairs, 2) == 0.75


def test_several_replies_per_prompt_are_drawn_and_every_figure_gets_its_interval(demo_world, tmp_path):
    cfg = demo_config(demo_world, tmp_path / "eval", f"dpo_adapter={demo_world / 'sft_adapter'}", "num_prompts=12",
                      "replies_per_prompt=3", "bootstrap_samples=200")
    results = evaluate(cfg)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "replies.jsonl").read_text().splitlines()]
    assert len(rows) == 36 and [r["index"] for r in rows[:6]] == [rows[0]["index"]] * 3 + [rows[3]["index"]] * 3
    assert results["setup"]["prompts"] == 12 and results["setup"]["replies_per_prompt"] == 3
    # accuracy over the 36 replies, counted from the file
    right = sum(r["SFT"]["emotion_label"].lower() == r["target_emotion"].lower() for r in rows) / 36
    intervals = results["intervals"]
    assert intervals["SFT"]["emotion_accuracy"]["value"] == pytest.approx(right)
    assert intervals["SFT"] == intervals["DPO"]  # one adapter under one seed
    assert set(intervals["SFT"]) == {"emotion_accuracy", "distinct_replies", "worst_top_share", "judge: demo judge"}
    for figure in intervals["SFT"].values():
        assert figure["ci95"][0] <= figure["value"] <= figure["ci95"][1]
    # distinct replies per draw (the j-th reply of every prompt), averaged over the 3 draws
    per_draw = [len({r["SFT"]["text"].strip() for r in rows[j::3]}) for j in range(3)]
    assert intervals["SFT"]["distinct_replies"]["value"] == pytest.approx(sum(per_draw) / 3)
    assert results["diversity"]["models"]["SFT"]["distinct_replies"] == pytest.approx(sum(per_draw) / 3)
    assert results["diversity"]["models"]["SFT"]["replies"] == 12
    # the interval's worst top share is the degeneration table's: the largest per-emotion share averaged over draws
    table_worst = max(g["most_frequent_share"] for g in results["diversity"]["models"]["SFT"]["by_group"].values())
    assert intervals["SFT"]["worst_top_share"]["value"] == pytest.approx(table_worst)
    assert "with its 95 % interval over prompts" in (tmp_path / "eval" / "results.md").read_text()
