"""The selection, --reselect and statistics rules on hand-made journals: every expected value below is worked
out by hand from the rules in docs/selection.md ("The rules", the reference's: the demo config with its diversity
keys off, conftest.REFERENCE_SELECTION), never by calling the code under test.

Reward settings unless said otherwise: weights [0.4, 0.25, 0.35], bias 0.001, length in characters against
length_min 5 / length_max 20, target_score_range 5, min_chosen_score 8, clean confidence >= 0.8, endings ! . ?
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from emotion_dpo.config import GenerateConfig, load_config, save_config
from conftest import REFERENCE_SELECTION

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "args/demo/generate_preferences_arg.json"


def reply(text, emotion, emotion_confidence, gibberish, gibberish_confidence, parts, total):
    """A stored candidate as the journal holds it; `parts` = (emotion, length, gibberish) rewards by hand."""
    return {"text": text, "emotion_label": emotion, "emotion_confidence": emotion_confidence,
            "gibberish_label": gibberish, "gibberish_confidence": gibberish_confidence, "length": len(text),
            "emotion_reward": parts[0], "length_reward": parts[1], "gibberish_reward": parts[2], "total": total}


# Round 1, target happiness, worked out by hand with the default weights:
#  A "i am so happy !" (15 chars): emotion 0.9*10 = 9; length a = (15-5)/5 = 2, b = (15-20)/20 = -0.25,
#    |a| > 1 > |b| -> |a+b|*10 = 17.5; clean 0.95 -> 9.5; total 0.4*9 + 0.25*17.5 + 0.35*9.5 + 0.001 = 11.301
#  B "ok" (2 chars): neutral -> 0; a = -0.6, |a| < 1 -> -0.6*0.0001 = -0.00006; clean 0.9 -> 9;
#    total 0.25*-0.00006 + 0.35*9 + 0.001 = 3.150985
#  C "wow wow wow wow wow wow wow wow" (31 chars): emotion 6; a = 5.2, b = 0.55 -> |5.75|*10 = 57.5;
#    mild gibberish 0.7 -> 0.7*5 = 3.5; total 2.4 + 14.375 + 1.225 + 0.001 = 18.001
#  -> chosen C, rejected B, gap 14.850015; C is not clean: the round fails.
ROUND_1 = [
    reply("i am so happy !", "happiness", 0.9, "clean", 0.95, (9.0, 17.5, 9.5), 11.301),
    reply("ok", "neutral", 0.8, "clean", 0.9, (0.0, -0.00006, 9.0), 3.150985),
    reply("wow wow wow wow wow wow wow wow", "happiness", 0.6, "mild gibberish", 0.7, (6.0, 57.5, 3.5), 18.001),
]
# Round 2:
#  D "thank you so much !" (19): emotion 9.5; a = 2.8, b = -0.05 -> 27.5; clean 0.99 -> 9.9;
#    total 3.8 + 6.875 + 3.465 + 0.001 = 14.141
#  E "hmm" (3): sadness -> 0; a = -0.4 -> -0.00004; clean 0.6 -> 6; total -0.00001 + 2.1 + 0.001 = 2.10099
#  F "great day ." (11): emotion 5; a = 1.2, b = -0.45 -> 7.5; clean 0.9 -> 9; total 2 + 1.875 + 3.15 + 0.001 = 7.026
#  -> chosen D, rejected E, gap 12.04001 >= 5, D >= 8, happiness, clean 0.99, ends in "!": accepted.
ROUND_2 = [
    reply("thank you so much !", "happiness", 0.95, "clean", 0.99, (9.5, 27.5, 9.9), 14.141),
    reply("hmm", "sadness", 0.7, "clean", 0.6, (0.0, -0.00004, 6.0), 2.10099),
    reply("great day .", "happiness", 0.5, "clean", 0.9, (5.0, 7.5, 9.0), 7.026),
]


def record(index, rounds, status, reason, chosen_at, rejected_at, target="happiness"):
    return {"index": index, "dialogue": index, "prompt": f"<prompt {index}>", "target_emotion": target,
            "status": status, "reason": reason, "chosen_at": chosen_at, "rejected_at": rejected_at, "rounds": rounds}


def write_run(folder: Path, records: list[dict], overrides=()) -> None:
    """A generate_preferences run folder as the run leaves it: its config.json and its journal."""
    folder.mkdir(parents=True)
    save_config(config(folder, overrides), folder, "config.json")
    (folder / "journal.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def run_cli(folder: Path, *flags, overrides=()):
    args = [sys.executable, str(ROOT / "generate_preferences.py"), "--config", str(DEMO_CONFIG), *flags,
            "--set", f"output_dir={folder}", "--set", "wandb.mode=disabled"]
    for override in [*REFERENCE_SELECTION, *overrides]:
        args += ["--set", override]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def reselected(folder: Path, into: Path, overrides=()) -> None:
    """`generate_preferences.py --reselect INTO` on the run in `folder`, with `overrides` (the stage alone, in this
    process: no model is loaded)."""
    from emotion_dpo.generate import reselect_run

    reselect_run(config(folder, overrides), str(into))


def config(folder: Path, overrides=()) -> GenerateConfig:
    return load_config(GenerateConfig, DEMO_CONFIG, [f"output_dir={folder}", "wandb.mode=disabled", *REFERENCE_SELECTION,
                                                     *overrides])


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "preferences.jsonl").read_text().splitlines()]


def test_reselect_with_other_weights_picks_the_pair_worked_out_by_hand(tmp_path):
    run = tmp_path / "run"
    write_run(run, [record(0, [ROUND_1, ROUND_2], "accepted", None, 0, 1)])
    reselected(run, tmp_path / "emotion_heavy", overrides=["reward_weights=[1.0, 0.0, 0.35]"])
    # Weights [1.0, 0.0, 0.35]: A = 9 + 3.325 + 0.001 = 12.326, B = 3.15 + 0.001 = 3.151, C = 6 + 1.225 + 0.001
    # = 7.226. Round 1 now passes (chosen A: happiness, clean 0.95, "!"; gap 9.175; 12.326 >= 8), so it decides.
    (row,) = rows(tmp_path / "emotion_heavy")
    assert (row["chosen"], row["rejected"], row["rounds"]) == ("i am so happy !", "ok", 1)
    assert row["chosen_score"] == pytest.approx(12.326)
    assert row["rejected_score"] == pytest.approx(3.151)
    assert row["chosen_length_reward"] == pytest.approx(17.5)  # the parts stay; only the weights changed


def test_reselect_with_the_run_settings_keeps_the_second_round_pair(tmp_path):
    run = tmp_path / "run"
    write_run(run, [record(0, [ROUND_1, ROUND_2], "accepted", None, 0, 1)])
    reselected(run, tmp_path / "same")
    (row,) = rows(tmp_path / "same")
    assert (row["chosen"], row["rejected"], row["rounds"]) == ("thank you so much !", "hmm", 2)
    assert row["chosen_score"] == pytest.approx(14.141)
    assert row["rejected_score"] == pytest.approx(2.10099)


def test_reselect_with_no_retries_gives_up_a_prompt_whose_first_round_failed(tmp_path):
    run = tmp_path / "run"
    write_run(run, [record(0, [ROUND_1, ROUND_2], "accepted", None, 0, 1)])
    reselected(run, tmp_path / "no_retries", overrides=["max_retries=0"])
    assert rows(tmp_path / "no_retries") == []
    (failed,) = [json.loads(line) for line in (tmp_path / "no_retries/failed.jsonl").read_text().splitlines()]
    assert (failed["index"], failed["reason"], failed["rounds"]) == (0, "chosen is not clean", 1)


def pair_round(chosen_total, rejected_total):
    """A round of two clean, on-target, complete replies whose totals are given (only totals matter here)."""
    return [reply("good !", "happiness", 1.0, "clean", 1.0, (10, 0, 10), chosen_total),
            reply("bad .", "happiness", 1.0, "clean", 1.0, (10, 0, 10), rejected_total)]


def test_statistics_of_a_hand_made_journal(tmp_path):
    run = tmp_path / "run"
    failing = pair_round(9.0, 7.0)
    write_run(run, [
        record(0, [pair_round(15.0, 5.0)], "accepted", None, 0, 1),                      # gap 10, 1 round
        record(1, [failing, pair_round(8.0, 2.0)], "accepted", None, 0, 1),             # gap 6, 2 rounds
        record(2, [failing, failing, pair_round(21.0, 1.0)], "accepted", None, 0, 1),   # gap 20, 3 rounds
        record(3, [failing] * 3, "failed", "score range below target_score_range", None, None),  # 3 rounds
    ])
    from emotion_dpo.generate import finalize_run

    finalize_run(config(run))  # generate_preferences.py --finalize
    stats = json.loads((run / "statistics.json").read_text())
    # gaps 10, 6, 20: median 10, mean 12, sample SD sqrt(((10-12)^2 + (6-12)^2 + (20-12)^2) / 2) = sqrt(52)
    assert stats["score_gap"]["median"] == pytest.approx(10.0)
    assert stats["score_gap"]["mean"] == pytest.approx(12.0)
    assert stats["score_gap"]["sd"] == pytest.approx(math.sqrt(52))
    assert (stats["score_gap"]["min"], stats["score_gap"]["max"]) == (pytest.approx(6.0), pytest.approx(20.0))
    assert stats["rounds_per_prompt"]["histogram"] == {"1": 1, "2": 1, "3": 2}
    assert stats["rounds_per_prompt"]["mean"] == pytest.approx((1 + 2 + 3 + 3) / 4)
    assert (stats["accepted"], stats["failed"], stats["acceptance_rate"]) == (3, 1, pytest.approx(0.75))
    assert stats["failure_reasons"] == {"score range below target_score_range": 1}
    assert [r["index"] for r in rows(run)] == [0, 1, 2]


def test_fresh_on_the_command_line_moves_the_earlier_run_aside_and_starts_again(demo_world, tmp_path):
    run = tmp_path / "run"
    write_run(run, [record(0, [pair_round(15.0, 5.0)], "accepted", None, 0, 1)], overrides=["n_candidates=3"])
    earlier_journal = (run / "journal.rank0.jsonl").read_text()
    w = demo_world
    world = [f"base_model={w / 'base'}", f"adapter={w / 'sft_adapter'}", f"dataset={w / 'dialogues'}",
             f"emotion_classifier={w / 'emotion_classifier'}", f"gibberish_detector={w / 'gibberish_detector'}",
             f"chat_template={ROOT / 'args/chat_template.json'}", "num_prompts=2", "max_retries=1"]
    refused = run_cli(run, overrides=world)
    assert refused.returncode == 2 and "n_candidates: 3 -> 6" in refused.stderr  # without --fresh: refused
    result = run_cli(run, "--fresh", overrides=world)
    assert result.returncode == 0, result.stderr[-3000:]
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "journal.rank0.jsonl").read_text() == earlier_journal  # the earlier run kept whole
    started = [json.loads(line) for line in (run / "journal.rank0.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in started) == [0, 1]
    assert json.loads((run / "config.json").read_text())["n_candidates"] == 6


def test_reselect_with_more_retries_than_the_run_had_is_refused(tmp_path):
    from emotion_dpo.errors import PipelineError
    from emotion_dpo.generate import reselect_run

    run = tmp_path / "run"
    write_run(run, [record(0, [ROUND_1, ROUND_2], "accepted", None, 0, 1)], overrides=["max_retries=1"])
    with pytest.raises(PipelineError, match=r"--reselect with max_retries 3, above the run's 1: a prompt the run gave "
                                            r"up after 2 rounds would need more rounds, i.e. new generation"):
        reselect_run(config(run, ["max_retries=3"]), str(tmp_path / "more"))
    assert not (tmp_path / "more").exists()
    assert reselect_run(config(run, ["max_retries=0"]), str(tmp_path / "fewer"))["accepted"] == 0  # round 1 alone fails
