"""The preference dataset's card: a README.md in the Hub's dataset-card format (huggingface_hub's card API), so a
shared dataset explains how it was made: the resolved config, the rules, the statistics, the plots, the failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import to_dict
from .dataset import DATASET_DIR
from .selection import uses_pool
from .stats import PLOTS, format_summary, format_tables

CARD_NAME = "README.md"

TEMPLATE = """---
{{ card_data }}
---

# {{ pretty_name }}

{{ accepted }} preference pairs (`prompt`, `chosen`, `rejected`, TRL's DPO format) from {{ settled }} dialogue prompts,
sampled from the SFT response generator and scored by emotion-dpo's `generate_preferences.py`.

## Models and data

| what | value |
| --- | --- |
{% for key, value in setup %}| {{ key }} | `{{ value }}` |
{% endfor %}
## Chat template

Prompts are stored exactly as the model saw them, rendered with this template (`{{ template_file }}`):

```jinja
{{ template }}
```

## How the pairs were chosen

{{ rules }}

## Statistics

```text
{{ summary }}
```

{{ tables }}

## Plots

![score gap]({{ plots[0] }})

![reward parts]({{ plots[1] }})

## Failure reasons

{% if failures %}| reason (last round of a prompt given up) | prompts |
| --- | --- |
{% for reason, count in failures %}| {{ reason }} | {{ count }} |
{% endfor %}{% else %}No prompt was given up.
{% endif %}
## Columns

`prompt`, `chosen`, `rejected`, `chosen_score`, `rejected_score`, `target_emotion`, `rounds`, `index`, and each reward
part of chosen and rejected (`chosen_emotion_reward`, ..., `rejected_gibberish_reward`).

## The resolved config

```json
{{ config_json }}
```
"""


def rules_paragraph(cfg) -> str:
    w = cfg.reward_weights
    return (
        f"Each prompt gets {cfg.n_candidates} sampled replies per round. A reply's reward is "
        f"{w[0]} x emotion + {w[1]} x length + {w[2]} x gibberish + {cfg.reward_bias}: emotion is the classifier's "
        "confidence x 10 when its label is the requested emotion, else 0; length is the reference project's banded "
        f"rule on the reply's length in {cfg.length_unit} (length_min {cfg.length_min}, length_max {cfg.length_max}); "
        "gibberish is the detector's confidence x 10 for clean, x 5 for mild gibberish, else confidence - 2. The "
        "highest-scoring reply is chosen, the lowest rejected. A round fails if their gap is below "
        f"{cfg.target_score_range} (target_score_range), the chosen score is below {cfg.min_chosen_score} "
        "(min_chosen_score), or the chosen reply is not in the requested emotion, not clean with confidence at least "
        f"{cfg.min_chosen_gibberish_confidence}, or does not end in one of {' '.join(cfg.chosen_endings)}. A failed "
        f"round is sampled again; after {cfg.max_retries} failed retries the prompt is given up."
        + (diversity_sentence(cfg) if uses_pool(cfg) else ""))


def diversity_sentence(cfg) -> str:
    cap = ("no cap on one text's share" if cfg.chosen_text_cap is None else
           f"one text may be at most {cfg.chosen_text_cap:g} of an emotion's chosen replies (at least "
           f"{cfg.chosen_text_cap_min}), counted in prompt order; a prompt whose passing texts are all at the cap gets "
           "no pair")
    chosen = ("rarest text among the run's candidates for the emotion (DivPO)" if cfg.chosen_rule == "rarest"
              else "highest-scoring")
    rejected = "most copied failing one (DivPO)" if cfg.rejected_rule == "most_common" else "lowest-scoring"
    return (f" Diversity-aware selection: each prompt chooses over all its rounds, which are sampled until they hold "
            f"{cfg.min_distinct_passing} different passing texts (or the retries run out); the chosen reply is the "
            f"{chosen} passing one, the rejected the {rejected}; {cap}. The length reward is {cfg.length_rule}.")


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def dataset_card(cfg, summary: dict):
    """The card for a finished dataset: `summary` is the statistics written next to it (stats.summarize)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from .template import load_chat_format

    config = to_dict(cfg)
    setup = [("base model", cfg.base_model), ("adapter sampled from", cfg.adapter),
             ("dialogues", f"{cfg.dataset} ({cfg.dataset_split})"),
             ("prompts (num_prompts, after skip_prompts)", f"{cfg.num_prompts}, after {cfg.skip_prompts}"), ("emotion classifier", cfg.emotion_classifier),
             ("gibberish detector", cfg.gibberish_detector), ("reward weights [emotion, length, gibberish]",
                                                               cfg.reward_weights),
             ("reward bias", cfg.reward_bias), ("length unit, min, max", f"{cfg.length_unit}, {cfg.length_min}, "
                                                                          f"{cfg.length_max}"),
             ("target_score_range", cfg.target_score_range), ("min_chosen_score", cfg.min_chosen_score),
             ("min_chosen_gibberish_confidence", cfg.min_chosen_gibberish_confidence),
             ("chosen_endings", " ".join(cfg.chosen_endings)), ("max_retries", cfg.max_retries),
             ("chosen_text_cap, chosen_text_cap_min", f"{cfg.chosen_text_cap}, {cfg.chosen_text_cap_min}"),
             ("min_distinct_passing, chosen_rule, rejected_rule",
              f"{cfg.min_distinct_passing}, {cfg.chosen_rule}, {cfg.rejected_rule}"),
             ("length_rule", cfg.length_rule),
             ("n_candidates", cfg.n_candidates), ("generation", json.dumps(cfg.generation, sort_keys=True)),
             ("seed", cfg.seed)]
    data = DatasetCardData(
        language="en", task_categories=["text-generation"], size_categories=size_category(summary["accepted"]),
        tags=["dpo", "preference", "trl", "emotion"], annotations_creators="machine-generated",
        pretty_name=f"Emotion DPO preference pairs ({cfg.output_dir})",
        # machine-readable: what the pairs depend on
        emotion_dpo={"base_model": cfg.base_model, "adapter": cfg.adapter, "emotion_classifier": cfg.emotion_classifier,
                     "gibberish_detector": cfg.gibberish_detector, "reward_weights": cfg.reward_weights,
                     "reward_bias": cfg.reward_bias, "target_score_range": cfg.target_score_range,
                     "min_chosen_score": cfg.min_chosen_score,
                     "min_chosen_gibberish_confidence": cfg.min_chosen_gibberish_confidence,
                     "accepted": summary["accepted"], "prompts_settled": summary["prompts_settled"],
                     "acceptance_rate": summary["acceptance_rate"], "score_gap": summary["score_gap"]},
    )
    return DatasetCard.from_template(
        data, template_str=TEMPLATE, pretty_name=data.pretty_name, accepted=summary["accepted"],
        settled=summary["prompts_settled"], setup=setup, template_file=cfg.chat_template,
        template=load_chat_format(cfg.chat_template).template, rules=rules_paragraph(cfg),
        summary=format_summary(summary), tables=format_tables(summary), plots=PLOTS,
        failures=list(summary["failure_reasons"].items()), config_json=json.dumps(config, indent=2, sort_keys=True))


def write_card(cfg, folder: Path, summary: dict) -> Path:
    """README.md and the plots it shows, in the dataset folder (load_from_disk reads only its own files)."""
    dataset = Path(folder) / DATASET_DIR
    for plot in PLOTS:
        shutil.copyfile(Path(folder) / plot, dataset / plot)
    path = dataset / CARD_NAME
    dataset_card(cfg, summary).save(path)
    return path


def push_card(folder: Path, repo_id: str) -> None:
    """After the dataset's own push: the plots, then the card, keeping the metadata `datasets` wrote (its configs
    and dataset_info). Not exercised here: the Hub cannot be reached from this project's machines."""
    from huggingface_hub import DatasetCard, DatasetCardData, HfApi

    dataset = Path(folder) / DATASET_DIR
    api = HfApi()
    for plot in PLOTS:
        api.upload_file(path_or_fileobj=str(dataset / plot), path_in_repo=plot, repo_id=repo_id, repo_type="dataset")
    card = DatasetCard.load(dataset / CARD_NAME)
    pushed = DatasetCard.load(repo_id, repo_type="dataset")
    card.data = DatasetCardData(**{**pushed.data.to_dict(), **card.data.to_dict()})
    card.push_to_hub(repo_id, repo_type="dataset")
