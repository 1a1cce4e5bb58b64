"""fine_tune_dpo's preference data, before any model: read and check it, drop repeats, split it, and give TRL the
token ids the generator saw (generate_preferences' own, or a text pair tokenized the way generation conditions)."""

from __future__ import annotations

import warnings
from pathlib import Path

from .dataset import ID_COLUMNS  # generate_preferences' token ids, trained on as they are
from .distributed import say
from .errors import PipelineError

REQUIRED = ("prompt", "chosen", "rejected")


def read_preferences(source: str, split: str):
    from .prompts import has_a_line, load_rows

    path = Path(source)
    if path.is_file() and not has_a_line(path):
        raise PipelineError(f"0 pairs in {source}: the file is empty")
    # in memory: TRL's and this module's map/filter would leave cache-*.arrow files in a published dataset/ folder
    return load_rows(source, split, "preference data", keep_in_memory=True)


def check_preferences(dataset, source: str, template_markers=(), allow_unmarked: bool = False) -> list[str]:
    """Required columns present, every value a non-empty string, every prompt in the chat template's format
    (unless `allow_unmarked`), the token id columns (when there are all three) lists of ids; returns the extra
    columns (kept out of training)."""
    missing = [c for c in REQUIRED if c not in dataset.column_names]
    if missing:
        raise PipelineError(
            f"{source}: missing column {', '.join(repr(m) for m in missing)} "
            f"(has {', '.join(dataset.column_names)}; needs prompt, chosen, rejected)"
        )
    if len(dataset) == 0:
        raise PipelineError(f"0 pairs in {source}: nothing to train on (a generate_preferences run that accepted "
                            "none: see its statistics.txt and failed.jsonl)")
    with_ids = has_token_ids(dataset)
    for column in REQUIRED:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str):
                raise PipelineError(f"{source}: row {row}, column {column!r}: expected a string, got {type(value).__name__}")
            # with token ids, those are trained on: a reply of special tokens only decodes to "" but has its ids
            if not value.strip() and not (with_ids and column != "prompt"):
                raise PipelineError(f"{source}: row {row}, column {column!r}: empty")
    if template_markers:
        unmarked = [row for row, p in enumerate(dataset["prompt"]) if not all(m in p for m in template_markers)]
        if unmarked:
            # e.g. Shotaro30678/rlhf-RG-trl-style-v3: its prompts were decoded with the special tokens stripped
            problem = (f"{source}: {len(unmarked)} of {len(dataset)} prompts lack the chat template's markers "
                       f"({' '.join(template_markers)}; row {unmarked[0]}: {dataset[unmarked[0]]['prompt'][:60]!r}); "
                       "DPO would train the SFT model on a context it was never trained or sampled in")
            if not allow_unmarked:
                raise PipelineError(
                    f"{problem}. Build the pairs with generate_preferences.py (it stores prompts as the model saw "
                    "them), or set allow_unmarked_prompts to true to train on them anyway")
            warnings.warn(f"{problem} (allow_unmarked_prompts is true: training on them anyway)", stacklevel=2)
    kept = REQUIRED + (ID_COLUMNS if has_token_ids(dataset) else ())
    if kept != REQUIRED:
        for column in ID_COLUMNS:
            for row, value in enumerate(dataset[column]):
                if not (isinstance(value, list) and value and all(isinstance(i, int) for i in value)):
                    raise PipelineError(f"{source}: row {row}, column {column!r}: expected a non-empty list of token ids")
    return [c for c in dataset.column_names if c not in kept]


def has_token_ids(dataset) -> bool:
    return all(c in dataset.column_names for c in ID_COLUMNS)


def without_repeats(dataset, source: str):
    """Pairs whose chosen equals rejected (nothing to learn: the same text, or, with token ids, the same ids, which is
    what DPO trains on) and repeated rows (a held-out copy of a training row would read as learned) are dropped,
    with a count; none left is an error."""
    seen, keep = set(), []
    same = repeated = 0
    same_ids = ([c == r for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"])]
                if has_token_ids(dataset) else [False] * len(dataset))
    for i, row in enumerate(zip(dataset["prompt"], dataset["chosen"], dataset["rejected"])):
        if row[1] == row[2] or same_ids[i]:
            same += 1
        elif row in seen:
            repeated += 1
        else:
            seen.add(row)
            keep.append(i)
    if same or repeated:
        say(f"{source}: dropped {same} pairs whose chosen equals rejected and {repeated} repeated rows; "
              f"{len(keep)} of {len(dataset)} pairs left")
    if not keep:
        raise PipelineError(f"0 pairs in {source} once pairs whose chosen equals rejected and repeated rows are dropped")
    return dataset.select(keep) if len(keep) < len(dataset) else dataset


MIN_PAIRS_TO_HOLD_OUT = 10  # below this, eval_fraction of the pairs would be a held-out loss of one or two pairs


def load_preferences(cfg, template_markers=(), vocabulary: int | None = None):
    """(train, eval or None): checked, extra columns dropped, split by eval_fraction with the config's seed. With
    `vocabulary` (the tokenizer's size), the stored token ids are checked against it. `earlier_datasets` (the
    accumulated pairs of earlier iterations) are read and checked the same way and trained on with `dataset`."""
    parts = []
    for source in [cfg.dataset, *cfg.earlier_datasets]:
        part = read_preferences(source, cfg.dataset_split)
        extra = check_preferences(part, source, template_markers, cfg.allow_unmarked_prompts)
        if vocabulary is not None and has_token_ids(part):  # here, where a row is still the file's row
            check_ids_in_vocabulary(part, vocabulary, source)
        if extra:
            say(f"{source}: {len(part)} pairs; columns kept out of training: {', '.join(extra)}")
        part = part.remove_columns(extra)
        if parts and sorted(part.column_names) != sorted(parts[0].column_names):
            raise PipelineError(f"{source}: columns {', '.join(sorted(part.column_names))} differ from {cfg.dataset}'s "
                                f"({', '.join(sorted(parts[0].column_names))}): the datasets are trained on together")
        parts.append(part.select_columns(parts[0].column_names) if parts else part)
    if len(parts) > 1:
        import datasets

        say(f"{cfg.dataset}: {len(parts[0])} pairs, with {sum(len(p) for p in parts[1:])} of earlier_datasets")
        dataset = datasets.concatenate_datasets(parts)
    else:
        dataset = parts[0]
    dataset = without_repeats(dataset, cfg.dataset)
    if cfg.eval_fraction == 0:
        return dataset, None
    if len(dataset) < MIN_PAIRS_TO_HOLD_OUT:
        say(f"{cfg.dataset}: {len(dataset)} pairs, fewer than the {MIN_PAIRS_TO_HOLD_OUT} a held-out set needs: "
              f"eval_fraction {cfg.eval_fraction} is not applied; training on all of them, with no held-out loss")
        return dataset, None
    split = dataset.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
    return split["train"], split["test"]


def overlong_pairs(dataset, tokenizer, max_length: int | None, truncation_mode: str) -> tuple[int, int, int]:
    """(dropped, truncated, longest prompt) by TRL's own rules, before it applies them silently: a pair whose
    prompt alone holds max_length tokens is dropped (fully_truncated); one whose prompt + completion (EOS
    included) exceeds max_length is cut. On the ids the trainer is given (token_id_rows)."""
    if max_length is None or len(dataset) == 0:
        return 0, 0, 0
    rows = token_id_rows(dataset, tokenizer, "the")
    dropped = truncated = 0
    for prompt, chosen, rejected in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]):
        if fully_truncated(prompt, max_length, truncation_mode):
            dropped += 1
        elif len(prompt) + max(len(chosen), len(rejected)) > max_length:
            truncated += 1
    return dropped, truncated, max(len(ids) for ids in rows["prompt_ids"])


def report_overlong(splits: dict, tokenizer, dpo_args, source: str, say=print) -> dict:
    """Say how many pairs TRL will drop or cut at dpo.max_length; a split it would empty is an error. Returns how
    many pairs of each split TRL keeps."""
    kept = {}
    for name, dataset in splits.items():
        if dataset is None:
            kept[name] = 0
            continue
        dropped, truncated, longest = overlong_pairs(dataset, tokenizer, dpo_args.max_length, dpo_args.truncation_mode)
        if dropped == len(dataset):
            raise PipelineError(
                f"{source}: every {name} pair's prompt has at least dpo.max_length = {dpo_args.max_length} tokens "
                f"(the longest: {longest}), so TRL would drop all {len(dataset)}; raise dpo.max_length or shorten the "
                "prompts")
        if dropped or truncated:
            say(f"{source}: {name}: {dropped} of {len(dataset)} pairs dropped (prompt alone >= dpo.max_length = "
                f"{dpo_args.max_length} tokens), {truncated} truncated to max_length")
        kept[name] = len(dataset) - dropped
    return kept



def text_row_ids(tokenizer, prompt: str, reply: str, where: str) -> dict:
    """A text pair's ids as SFT saw a reply end: the prompt's context ids (template.context_ids), then the ids after
    them in the prompt followed by the reply as the template renders a finished turn (template.finished_turn), up
    to and including the turn's EOS (the newline after it is the next turn's)."""
    from .template import context_ids, finished_turn

    context = context_ids(tokenizer, prompt)
    whole = tokenizer(finished_turn(tokenizer, prompt, reply), add_special_tokens=False)["input_ids"]
    if whole[:len(context)] != context:
        raise PipelineError(f"{where}: the prompt's tokens are not a prefix of prompt + reply under this tokenizer "
                            "(the reply does not start where a generated reply would)")
    completion = whole[len(context):]
    if tokenizer.eos_token_id not in completion:
        raise PipelineError(f"{where}: the template's finished turn holds no EOS token ({tokenizer.eos_token!r}); "
                            "DPO would train a reply that never ends")
    end = len(completion) - completion[::-1].index(tokenizer.eos_token_id)  # just after the turn's own (last) EOS
    return {"context": context, "completion": completion[:end]}


def check_pair_texts(tokenizer, dataset, base_model: str, rows: int = 8) -> None:
    """The first pairs' prompts (as conditioned on) and chosen turns (as a finished turn) tokenize as the tokenizer's
    SentencePiece model does; refused otherwise, before any model loads."""
    from .sentencepiece_check import conform_to_sentencepiece
    from .template import context_text, finished_turn

    first = dataset.select(range(min(rows, len(dataset))))
    texts = [context_text(p) for p in first["prompt"]]
    texts += [finished_turn(tokenizer, p, c) for p, c in zip(first["prompt"], first["chosen"])]
    conform_to_sentencepiece(tokenizer, getattr(tokenizer, "loaded_from", base_model), folders=[base_model],
                             texts=texts, rebuild=False)


def tokenize_text_pair(example: dict, row: int, tokenizer, name: str) -> dict:
    chosen = text_row_ids(tokenizer, example["prompt"], example["chosen"], f"{name} row {row}, column 'chosen'")
    rejected = text_row_ids(tokenizer, example["prompt"], example["rejected"], f"{name} row {row}, column 'rejected'")
    return {"prompt_ids": chosen["context"], "chosen_ids": chosen["completion"], "rejected_ids": rejected["completion"]}


def fully_truncated(prompt_ids, max_length: int | None, truncation_mode: str) -> bool:
    """TRL's own rule (DPOTrainer._prepare_dataset): with `keep_start` truncation a pair whose prompt alone fills
    max_length would keep no completion token, so it is dropped."""
    return max_length is not None and truncation_mode == "keep_start" and len(prompt_ids) >= max_length


def check_ids_in_vocabulary(dataset, vocabulary: int, where: str) -> None:
    """Every stored token id names a token of this tokenizer (0 <= id < len(tokenizer)); one beyond it would be an
    IndexError deep in the embedding lookup, mid-training."""
    for column in ID_COLUMNS:
        for row, ids in enumerate(dataset[column]):
            outside = [i for i in ids if not 0 <= i < vocabulary]
            if outside:
                raise PipelineError(
                    f"{where}: row {row}, column {column!r}: token id {outside[0]} is outside this tokenizer's "
                    f"{vocabulary} tokens (0-{vocabulary - 1}); the pairs were made with another tokenizer or edited: "
                    "generate them again with this adapter, or remove the id columns to train on the text")


def token_id_rows(dataset, tokenizer, name: str):
    """The dataset with prompt_ids / chosen_ids / rejected_ids: generate_preferences' own (every row's prompt_ids
    checked against this tokenizer, in one batch), or, for text only, tokenized the way generation conditions and
    continues (tokenize_text_pair)."""
    from .template import many_context_ids

    if has_token_ids(dataset):
        expected = many_context_ids(tokenizer, dataset["prompt"])
        wrong = [row for row, (ids, want) in enumerate(zip(dataset["prompt_ids"], expected)) if ids != want]
        if wrong:
            raise PipelineError(f"{name} dataset: the prompt_ids of {len(wrong)} of {len(dataset)} rows (first: row "
                                f"{wrong[0]}) are not their prompt's tokens under this adapter's tokenizer; the "
                                "preference data was generated with another one")
        check_ids_in_vocabulary(dataset, len(tokenizer), f"{name} dataset")
        return dataset
    return dataset.map(tokenize_text_pair, with_indices=True, fn_kwargs={"tokenizer": tokenizer,
                                                                         "name": f"{name} dataset"})

