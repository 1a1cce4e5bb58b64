"""Held-out judges: emotion classifiers training never saw, each with its own label names mapped onto
emotion_labels. A model that games the training classifier shows as a gap between it and a judge."""

from __future__ import annotations

from .errors import PipelineError


def judge_label_mapping(own_labels: list[str], label_map: dict, emotion_labels, where: str) -> list[str]:
    """The emotion_labels entry of each of the judge's outputs, in output order: its label_map entry, else its own
    name (case-insensitively). A label that maps to no emotion is an error naming it; so is a label_map entry for a
    label the judge does not have, or one that maps to no emotion."""
    emotions = {label.lower(): label for label in emotion_labels}
    mapping = {k.lower(): v for k, v in label_map.items()}
    unknown = sorted(k for k in label_map if k.lower() not in {label.lower() for label in own_labels})
    if unknown:
        raise PipelineError(f"{where}: label_map names {', '.join(unknown)}, which the judge does not output "
                            f"(its labels: {', '.join(own_labels)})")
    mapped = []
    for label in own_labels:
        target = mapping.get(label.lower(), label)
        if target.lower() not in emotions:
            raise PipelineError(f"{where}: the judge's label {label!r} maps to no emotion_labels entry "
                                f"({', '.join(emotion_labels)}); add it to label_map, e.g. "
                                f"\"label_map\": {{\"{label}\": \"<one of emotion_labels>\"}}")
        mapped.append(emotions[target.lower()])
    return mapped


def check_judges(cfg) -> list[list[str]]:
    """Each judge's output mapping, from its config alone (no weights load): before anything runs."""
    from .models import classifier_labels

    names = [j.name for j in cfg.judges]
    if len(set(names)) != len(names):
        raise PipelineError(f"{cfg.source}: key judges: two judges are named alike ({', '.join(names)})")
    return [judge_label_mapping(classifier_labels(j.model), j.label_map, cfg.emotion_labels,
                                f"{cfg.source}: key judges: {j.name} ({j.model})") for j in cfg.judges]


def emotion_probabilities(probabilities, mapping: list[str]) -> list[dict]:
    """Per text, the judge's probability of each emotion: its outputs' probabilities summed by their emotion."""
    rows = []
    for row in probabilities:
        totals = {}
        for p, emotion in zip(row, mapping):
            totals[emotion] = totals.get(emotion, 0.0) + float(p)
        rows.append(totals)
    return rows


def judge_replies(model_path: str, mapping: list[str], texts: list[str], batch_size: int) -> list[dict]:
    """The judge's emotion probabilities for each text (softmax over its outputs, summed by mapping)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .models import device_name

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).to(device_name()).eval()
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              return_tensors="pt").to(model.device)
            rows += emotion_probabilities(model(**batch).logits.float().softmax(-1).tolist(), mapping)
    return rows


def predicted(probabilities: list[dict]) -> list[str]:
    return [max(row, key=row.get) for row in probabilities]


def judge_figures(targets: list[str], probabilities: list[dict]) -> dict:
    """Emotion accuracy, weighted and macro F1 (over the requested emotions) under the judge, and its mean
    confidence in the requested emotion."""
    from sklearn.metrics import accuracy_score, f1_score

    guesses = [p.lower() for p in predicted(probabilities)]
    wanted = [t.lower() for t in targets]
    present = sorted(set(wanted))
    confidence = [{k.lower(): v for k, v in row.items()}.get(t, 0.0) for row, t in zip(probabilities, wanted)]
    return {"emotion_accuracy": float(accuracy_score(wanted, guesses)),
            "emotion_weighted_f1": float(f1_score(wanted, guesses, labels=present, average="weighted", zero_division=0)),
            "emotion_macro_f1": float(f1_score(wanted, guesses, labels=present, average="macro", zero_division=0)),
            "mean_target_confidence": sum(confidence) / len(confidence) if confidence else 0.0,
            "target_confidence": confidence}


def agreement(training_labels: list[str], judge_labels: list[str]) -> float:
    """Cohen's kappa of the judge with the training classifier on the same replies."""
    from sklearn.metrics import cohen_kappa_score

    a = [x.lower() for x in training_labels]
    b = [x.lower() for x in judge_labels]
    return 1.0 if a == b else float(cohen_kappa_score(a, b))
