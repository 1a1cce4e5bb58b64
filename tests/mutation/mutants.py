"""The hand-listed mutants of the rule files and the newer modules, each a one-place change a developer could make by
mistake.

`old` must occur exactly once in its file (run.py refuses the list otherwise, so it cannot drift from the code).
`tests`: the fast, model-free tests of the file (a tokenizer from the demo world or a tiny random Llama at most), run
against each mutant.
`equivalent`: mutants no test can tell from the original, with the reason; listed, not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutant:
    old: str
    new: str
    what: str
    why: str = ""  # for an equivalent mutant: why no test can kill it


@dataclass
class Target:
    path: str
    tests: list[str]
    mutants: list[Mutant]
    equivalent: list[Mutant] = field(default_factory=list)


M = Mutant

REWARDS = Target("emotion_dpo/rewards.py", ["tests/test_rewards.py", "-k", "not needs_no_torch"], [
    M("return confidence * 10 if label.lower() == target.lower() else 0.0",
      "return confidence * 10 if label == target else 0.0", "emotion reward: labels compared case-sensitively"),
    M("return confidence * 10 if label", "return confidence * 9 if label", "emotion reward: x 9"),
    M("else 0.0\n", "else confidence\n", "emotion reward: another emotion earns its confidence"),
    M("if abs(from_shortest) < 1:", "if abs(from_shortest) <= 1:", "length: first band includes |a| = 1"),
    M("if abs(from_shortest) > 1 > abs(from_longest):", "if abs(from_shortest) >= 1 > abs(from_longest):",
      "length: second band includes |a| = 1"),
    M("if abs(from_shortest) > 1 > abs(from_longest):", "if abs(from_shortest) > 1 >= abs(from_longest):",
      "length: second band includes |b| = 1"),
    M("return from_shortest * 0.0001", "return from_shortest * 0.001", "length: first band x 0.001"),
    M("abs(from_shortest + from_longest) * 10", "abs(from_shortest - from_longest) * 10", "length: |a - b|"),
    M("return from_longest * 0.9", "return abs(from_longest) * 0.9", "length: |b| x 0.9"),
    M("from_longest = (length - longest) / longest", "from_longest = (length - longest) / shortest",
      "length: b divided by length_min"),
    M("    label = label.lower()\n", "", "gibberish: labels compared case-sensitively"),
    M("return confidence * 5", "return confidence * 0.5", "gibberish: mild x 0.5 (the reference code)"),
    M("return confidence - 2", "return confidence - 1", "gibberish: other - 1"),
    M("w_emotion, w_length, w_gibberish = weights", "w_emotion, w_gibberish, w_length = weights",
      "total: weights in another order"),
    M("w_gibberish * gibberish + bias", "w_gibberish * gibberish - bias", "total: bias subtracted"),
    M("return len(reply.split())", "return len(reply.split(' '))", "words split on single spaces"),
    M("return count_tokens(reply)", "return len(reply)", "tokens counted as characters"),
    M('raise ValueError(f"unknown length unit {unit!r}")', "return 0", "an unknown unit measures 0"),
])

SELECTION = Target("emotion_dpo/selection.py", ["tests/test_selection.py"], [
    M("return totals.index(max(totals)), totals.index(min(totals))",
      "return len(totals) - 1 - totals[::-1].index(max(totals)), totals.index(min(totals))",
      "chosen: the last of equal totals"),
    M("return totals.index(max(totals)), totals.index(min(totals))",
      "return totals.index(max(totals)), len(totals) - 1 - totals[::-1].index(min(totals))",
      "rejected: the last of equal totals"),
    M("if best - worst < selection.target_score_range:", "if best - worst <= selection.target_score_range:",
      "score range: a gap equal to target_score_range fails"),
    M("if best < selection.min_chosen_score:", "if best <= selection.min_chosen_score:",
      "best score: equal to min_chosen_score fails"),
    M("if chosen.gibberish_confidence < selection.min_chosen_gibberish_confidence:",
      "if chosen.gibberish_confidence <= selection.min_chosen_gibberish_confidence:",
      "clean confidence: equal to the minimum fails"),
    M('''    if best - worst < selection.target_score_range:
        return "score range below target_score_range"
    if best < selection.min_chosen_score:
        return "best score below min_chosen_score"
''', '''    if best < selection.min_chosen_score:
        return "best score below min_chosen_score"
    if best - worst < selection.target_score_range:
        return "score range below target_score_range"
''', "order: best score checked before the score range"),
    M('''    if best < selection.min_chosen_score:
        return "best score below min_chosen_score"
    return chosen_failure(chosen, target, selection)''', '''    problem = chosen_failure(chosen, target, selection)
    if problem:
        return problem
    if best < selection.min_chosen_score:
        return "best score below min_chosen_score"
    return None''', "order: chosen filters before the best score"),
    M("if chosen.emotion_label.lower() != target.lower():", "if chosen.emotion_label != target:",
      "chosen emotion compared case-sensitively"),
    M('if chosen.gibberish_label.lower() != "clean":', 'if chosen.gibberish_label != "clean":',
      "chosen clean label compared case-sensitively"),
    M('''    if chosen.gibberish_label.lower() != "clean":
        return "chosen is not clean"
''', "", "chosen may be mild gibberish"),
    M('''    if chosen.emotion_label.lower() != target.lower():
        return "chosen emotion is not the target"
    if chosen.gibberish_label.lower() != "clean":
        return "chosen is not clean"
''', '''    if chosen.gibberish_label.lower() != "clean":
        return "chosen is not clean"
    if chosen.emotion_label.lower() != target.lower():
        return "chosen emotion is not the target"
''', "order: clean before emotion among the chosen filters"),
    M("return ending_of(text) not in endings", "return ending_of(text.strip()) not in endings",
      "ending: all whitespace stripped, not only spaces"),
    M('return text.strip(" ")[-1:]', 'return text.strip(" ")[-1]', "ending of an empty reply: an IndexError"),
    M("return rounds_done >= 1 + max_retries", "return rounds_done > 1 + max_retries", "gives up one round late"),
    M("return rounds_done >= 1 + max_retries", "return rounds_done >= max_retries", "gives up one round early"),
    M("reply.gibberish_confidence, reply.length, target, rewards, reply.token_ids,\n",
      "reply.gibberish_confidence, reply.length, target, rewards, None,\n", "rescore drops the token ids"),
    M("                       reply.ended_on_eos)", "                       None)", "rescore drops ended_on_eos"),
    M("chosen, best, worst = replies[chosen_at], replies[chosen_at].total, replies[rejected_at].total",
      "chosen, best, worst = replies[chosen_at], replies[chosen_at].total, min(replies[0].total, replies[-1].total)",
      "worst: the lower of the first and last reply"),
])

STATS = Target("emotion_dpo/stats.py", ["tests/test_stats_and_card.py", "-k", "not statistics_files and not dataset_card"], [
    M('"sd": statistics.stdev(values) if len(values) > 1', '"sd": statistics.pstdev(values) if len(values) > 1',
      "reward-part SD: population SD"),
    M('"sd": statistics.stdev(gaps) if len(gaps) > 1', '"sd": statistics.pstdev(gaps) if len(gaps) > 1',
      "score-gap SD: population SD"),
    M('"sd": statistics.stdev(gaps) if len(gaps) > 1', '"sd": statistics.stdev(gaps) if len(gaps) > 2',
      "score-gap SD: needs three gaps"),
    M('"sd": statistics.stdev(values) if len(values) > 1', '"sd": statistics.stdev(values) if len(values) > 2',
      "reward-part SD: needs three values"),
    M('"median": statistics.median(gaps) if gaps else None', '"median": statistics.median_high(gaps) if gaps else None',
      "score-gap median: median_high"),
    M('return {"median": statistics.median(values) if values else None',
      'return {"median": statistics.median_low(values) if values else None', "spread: median_low"),
    M("accepted            {summary['accepted']} ({100 * summary['acceptance_rate']:.1f} %)",
      "accepted            {summary['accepted']} ({summary['acceptance_rate']:.1f} %)",
      "statistics.txt: acceptance % not x 100"),
    M("shares = [w * (chosen[part] - rejected[part]) for w, part in zip(weights, PARTS)]",
      "shares = [chosen[part] - rejected[part] for w, part in zip(weights, PARTS)]", "decided_by ignores the weights"),
    M("shares = [w * (chosen[part] - rejected[part]) for w, part in zip(weights, PARTS)]",
      "shares = [w * abs(chosen[part] - rejected[part]) for w, part in zip(weights, PARTS)]",
      "decided_by: a part that favours the rejected counts"),
    M("counts[PARTS[shares.index(max(shares))]] += 1",
      "counts[PARTS[len(shares) - 1 - shares[::-1].index(max(shares))]] += 1", "decided_by: the last of equal shares"),
    M('for emotion in sorted({r["target_emotion"] for r in records}):',
      'for emotion in sorted({r["target_emotion"] for r in records}, reverse=True):', "by_emotion rows in reverse order"),
    M('"histogram": {str(k): v for k, v in sorted(Counter(rounds).items())}',
      '"histogram": {str(k): v for k, v in Counter(rounds).items()}', "rounds histogram in order of appearance"),
    M('dict(Counter(r["reason"] for r in records if r["status"] == "failed").most_common())',
      'dict(Counter(r["reason"] for r in records if r["status"] == "failed"))',
      "failure reasons in order of appearance, not by count"),
    M('"mean_rounds": statistics.fmean(len(r["rounds"]) for r in mine)',
      '"mean_rounds": statistics.fmean(len(r["rounds"]) for r in accepted or mine)',
      "by_emotion: mean rounds of the accepted only"),
    M('last = record["rounds"][-1]\n    return last[record["chosen_at"]]',
      'last = record["rounds"][0]\n    return last[record["chosen_at"]]', "the pair read from the first round"),
    M('"prompts_total": total_prompts if total_prompts is not None else len(records)',
      '"prompts_total": len(records)', "prompts_total ignores the run's total"),
    M('"acceptance_rate": len(accepted) / len(records) if records else 0.0',
      '"acceptance_rate": len(accepted) / len(records) if records else None', "acceptance of no record: None"),
    M('"max": max(gaps) if gaps else None', '"max": gaps[-1] if gaps else None', "score-gap max: the last gap"),
    M('lines += [f"| {part} | {count}" + (f" ({100 * count / total:.1f} %)" if total else "") + " |"',
      'lines += [f"| {part} | {count}" + (f" ({count / total:.1f} %)" if total else "") + " |"',
      "decided_by table: share not x 100"),
    M('''        lines.append(f"  failed: {reason}: {count}")''', "        pass", "statistics.txt: no failure reasons"),
])

JOURNAL = Target("emotion_dpo/journal.py", ["tests/test_journal.py"], [
    M("            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "            pass\n",
      "the journal's own lock removed"),
    M("        return isinstance(value, (int, float)) and not isinstance(value, bool)",
      "        return isinstance(value, (int, float))", "true accepted as a float"),
    M("        return isinstance(value, int) and not isinstance(value, bool)",
      "        return isinstance(value, int)", "true accepted as an int"),
    M("not 0 <= record[key] < last", "not 0 <= record[key] <= last", "chosen_at == len(round) accepted"),
    M("not 0 <= record[key] < last", "not -last <= record[key] < last", "a negative chosen_at accepted"),
    M('    elif not isinstance(record.get("reason"), str):', '    elif False:', "a failed record without a reason"),
    M('''    if not _are_ids(record.get("prompt_ids")):
        return "key 'prompt_ids': expected a list of token ids"
''', "", "a bad prompt_ids type accepted"),
    M("return value is None or isinstance(value, list) and all(_is(i, int) for i in value)",
      "return value is None or isinstance(value, list)", "token ids: any list"),
    M("not _are_ids(reply.get(\"token_ids\"))", "False", "a reply's bad token_ids accepted"),
    M('set(reply) - set(OPTIONAL_REPLY_KEYS) != set(REPLY_KEYS)', 'not set(REPLY_KEYS) <= set(reply)',
      "a reply with an unknown key accepted"),
    M('if not rounds or not all(isinstance(r, list) and r for r in rounds):',
      'if not rounds or not all(isinstance(r, list) for r in rounds):', "an empty round accepted"),
    M('if record.get("status") not in STATUSES:', 'if record.get("status") is None:', "any status accepted"),
    M("        _cut_torn_tail(self.path)\n", "", "a torn tail is not cut when the journal opens"),
    M("        self._file.flush()\n", "", "append not flushed"),
    M("        os.fsync(self._file.fileno())\n", "", "append not fsync'ed"),
    M("                if kept != record:", "                if False:", "two different records of a prompt: the first kept"),
    M("    return [by_index[i][1] for i in sorted(by_index)]", "    return [record for _, record in by_index.values()]",
      "merged records in file order, not by prompt index"),
], equivalent=[
    M("                break  # the process died mid-write", "                continue  # the process died mid-write",
      "a torn line skipped (continue) instead of ending the read (break)",
      "only the last line of a file can lack its newline, so nothing follows it"),
])

PROMPTS = Target("emotion_dpo/prompts.py", ["tests/test_prompts.py"], [
    M("prompts = [replace(p, index=i) for i, p in enumerate(prompts[cfg.skip_prompts:])]",
      "prompts = prompts[cfg.skip_prompts:]", "skip_prompts: not numbered from 0"),
    M("prompts = [replace(p, index=i) for i, p in enumerate(prompts[cfg.skip_prompts:])]",
      "prompts = [replace(p, index=i) for i, p in enumerate(prompts[cfg.skip_prompts + 1:])]",
      "skip_prompts: one more prompt skipped"),
    M("if len(prompts) <= cfg.skip_prompts:", "if len(prompts) < cfg.skip_prompts:",
      "skip_prompts leaving no prompt: not refused"),
    M("wanted = None if cfg.num_prompts is None else cfg.skip_prompts + cfg.num_prompts",
      "wanted = cfg.num_prompts", "skip_prompts: num_prompts counted with the skipped ones"),
    M('known = {e.lower() for e in emotions}', 'known = set(emotions)', "dataset emotions: case-sensitive"),
    M('names = [s.strip() for s in split.split("+")]', 'names = split.split("+")', "split names not stripped"),
    M('''            if turn_at and turn["role"] == turns[turn_at - 1]["role"]:''', '''            if False:''',
      "roles need not alternate"),
    M('''            if not isinstance(content["dialog"], str):''', '''            if content["dialog"] is None:''',
      "a number as dialog accepted"),
    M("if len(content[\"dialog\"]) > LONG_TURN_CHARACTERS:", "if len(content[\"dialog\"]) >= LONG_TURN_CHARACTERS:",
      "long turn: a turn of exactly the limit warned about"),
    M("return starts if all_windows else starts[-1:]", "return starts if all_windows else starts[:1]",
      "the first window by default, not the last"),
    M("for s in range(len(turns) - window + 1)", "for s in range(len(turns) - window)",
      "the window at the very end never taken"),
    M('target = turns[-1]["content"]["emotion"]', 'target = turns[-2]["content"]["emotion"]',
      "target: the user turn's emotion"),
    M('messages = [{"role": "system", "content": {"emotion": "", "dialog": system_prompt}}]',
      'messages = [{"role": "system", "content": {"emotion": "", "dialog": system_prompt}}] if system_prompt else []',
      "no system message for an empty system prompt"),
    M("if num_prompts is not None and len(prompts) >= num_prompts:",
      "if num_prompts is not None and len(prompts) > num_prompts:", "num_prompts: one prompt too many"),
    M("window = 2 + 2 * num_turns_history", "window = 2 * num_turns_history + 1", "window one turn short"),
    M("prompts.append(Prompt(len(prompts), row, target, messages, text, context_ids(tokenizer, text)))",
      "prompts.append(Prompt(len(prompts), start, target, messages, text, context_ids(tokenizer, text)))",
      "dialogue: the window's start instead of the row"),
    M("return any(line.strip() for line in f)", "return any(line for line in f)",
      "a file of blank lines counts as rows"),
])

PROMPTS.equivalent.append(
    M('if turns[s]["role"] == "user" and turns[s + window - 1]["role"] == "assistant"',
      'if turns[s + window - 1]["role"] == "assistant"', "a window may start on an assistant turn",
      "a window has an even number of turns and check_dialogues makes the roles alternate first, so a window that "
      "ends on an assistant turn starts on a user turn"))

TEMPLATE = Target("emotion_dpo/template.py", ["tests/test_template.py", "tests/test_prompts.py"], [
    M('''    first = whole[len(ids)]
    if not tokenizer.decode([first]).strip():''', '''    first = whole[len(ids)]
    if False:''', "check_context_ids: the lone-space check removed"),
    M("if whole[:len(ids)] != ids or len(whole) == len(ids):", "if len(whole) == len(ids):",
      "check_context_ids: the prefix check removed"),
    M('tokenizer.padding_side = "left"', 'tokenizer.padding_side = "right"', "padding on the right"),
    M('    return prompt[:-1] if prompt.endswith(" ") else prompt', "    return prompt",
      "context ids keep the final space"),
    M('return tokenizer(texts, add_special_tokens=False)["input_ids"]',
      'return tokenizer(texts)["input_ids"]', "context ids: a second BOS"),
    M('if "template" in doc and "chat_template" not in doc:', 'if "template" in doc:',
      "a file with both keys read as the reference's format"),
    M('''    if not isinstance(pad, str) or not pad:
        problems.append''', '''    if not isinstance(pad, str):
        problems.append''', "an empty pad token accepted"),
    M("if not (isinstance(special, list) and all(isinstance(t, str) and t for t in special)):",
      "if not isinstance(special, list):", "special tokens: any list"),
    M('''    check_jinja_syntax(template, f"{path}: key '{template_key}'")\n''', "",
      "jinja syntax not checked when the file loads"),
    M('{"pad_token": chat.pad_token, "additional_special_tokens": list(chat.special_tokens)}',
      '{"additional_special_tokens": list(chat.special_tokens)}', "the pad token not installed"),
    M("def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True)",
      "def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False)",
      "rendered without the generation prompt"),
    M('''    if not isinstance(shipped, str) or not shipped or (where, chat.source) in _warned:''',
      '''    if not isinstance(shipped, str) or not shipped:''', "the shipped-template warning repeated"),
    M("    if not same:\n        _warned.add", "    if same:\n        _warned.add", "warns when the templates agree"),
    M('raise PipelineError(f"{path}: chat template file not found") from None', "raise",
      "a missing template file: a raw FileNotFoundError"),
])

DATASET = Target("emotion_dpo/dataset.py", ["tests/test_dataset.py", "tests/test_selection.py"], [
    M('return (record.get("prompt_ids") is not None and record.get("eos_token_id") is not None\n            and all(',
      'return (record.get("prompt_ids") is not None\n            and all(', "has_ids without the EOS check"),
    M("    if without:  # one schema", "    if without == len(rows):  # one schema",
      "rows with and without ids mixed in one dataset"),
    M('    return reply["token_ids"] + ([] if reply.get("ended_on_eos") is False else [eos_token_id])',
      '    return reply["token_ids"]', "sampled ids without EOS"),
    M('    return reply["token_ids"] + ([] if reply.get("ended_on_eos") is False else [eos_token_id])',
      '    return reply["token_ids"] + [eos_token_id]', "sampled ids: EOS after a reply cut off at max_new_tokens too"),
    M('"rejected_ids": sampled_ids(rejected, record["eos_token_id"])', '"rejected_ids": sampled_ids(chosen, record["eos_token_id"])',
      "rejected ids: the chosen's"),
    M('stored = record["rounds"][:1 + selection.max_retries]', 'stored = record["rounds"][:selection.max_retries]',
      "reselect counts one round too few"),
    M('stored = record["rounds"][:1 + selection.max_retries]', 'stored = record["rounds"]',
      "reselect counts every stored round"),
    M('''        if round_failure(rounds[count - 1], target, selection) is None:
            break''', '''        if round_failure(rounds[count - 1], target, selection) is None:
            pass''', "reselect: the last passing round, not the first"),
    M("    if reason is not None and not final:\n        return None",
      "    if reason is not None:\n        return None", "settle: a given-up prompt is never recorded"),
    M('"rounds": len(record["rounds"]),\n        "index"', '"rounds": len(record["rounds"][-1]),\n        "index"',
      "row rounds: candidates of the last round"),
    M('return {"index": record["index"], "dialogue": record["dialogue"], "reason": record["reason"],',
      'return {"index": record["index"], "dialogue": record["index"], "reason": record["reason"],',
      "failure row: the index as dialogue"),
    M('        empty.save_to_disk(str(folder / DATASET_DIR), num_shards=1)',
      '        empty.save_to_disk(str(folder / DATASET_DIR))', "an empty dataset saved without its one shard"),
    M('kinds = {"prompt": "string", "chosen": "string", "rejected": "string", "target_emotion": "string",',
      'kinds = {"prompt": "string", "chosen": "string", "rejected": "string", "target_emotion": "float64",',
      "empty schema: target_emotion a float"),
    M('row[f"chosen_{part}"] = chosen[part]', 'row[f"chosen_{part}"] = rejected[part]', "chosen parts: the rejected's"),
    M('rounds = [[rescore(ScoredReply(**(r if length_of is None else {**r, "length": length_of(r["text"])})), target,',
      'rounds = [[rescore(ScoredReply(**r), target,', "reselect ignores length_of"),
    M('"eos_token_id": eos_token_id,', '"eos_token_id": None,', "settle forgets the EOS id"),
])

DIVERSITY = Target("emotion_dpo/diversity.py", ["tests/test_diversity.py"], [
    M('if model["distinct_replies"] < DISTINCT_FLOOR * sft["distinct_replies"]:',
      'if model["distinct_replies"] <= DISTINCT_FLOOR * sft["distinct_replies"]:',
      "collapse: exactly half of SFT's distinct replies flagged"),
    M("DISTINCT_FLOOR = 0.5", "DISTINCT_FLOOR = 0.6", "collapse: the distinct floor at 60 % of SFT's"),
    M('if model["canned_share"] > CANNED_FACTOR * sft["canned_share"]:',
      'if model["canned_share"] >= CANNED_FACTOR * sft["canned_share"]:',
      "collapse: exactly twice SFT's canned share flagged"),
    M('if row["replies"] >= MIN_GROUP and row["most_frequent_share"] > TOP_SHARE_LIMIT:',
      'if row["replies"] > MIN_GROUP and row["most_frequent_share"] > TOP_SHARE_LIMIT:',
      "collapse: an emotion of exactly 10 prompts not judged"),
    M('if row["replies"] >= MIN_GROUP and row["most_frequent_share"] > TOP_SHARE_LIMIT:',
      'if row["replies"] >= MIN_GROUP and row["most_frequent_share"] >= TOP_SHARE_LIMIT:',
      "collapse: a top share of exactly 30 % flagged"),
    M("MIN_GROUP = 10", "MIN_GROUP = 9", "collapse: emotions of 9 prompts judged"),
    M("    texts = [t.strip() for t in texts]\n", "    texts = list(texts)\n",
      "replies compared with their surrounding spaces"),
    M("if len(askers[text]) >= CANNED_PROMPTS)", "if len(askers[text]) > CANNED_PROMPTS)",
      "canned: a reply needs 4 prompts, not 3"),
    M("canned = sum(n for text, n in counts.items()", "canned = sum(1 for text, n in counts.items()",
      "canned: texts counted instead of replies"),
    M("return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]",
      "return [tuple(words[i:i + n]) for i in range(len(words) - n)]", "n-grams: the last one left out"),
    M('"length_words_sd": statistics.stdev(lengths)', '"length_words_sd": statistics.pstdev(lengths)',
      "length SD: population SD"),
    M("        shares = [max(Counter(rng.randrange(w) for _ in range(n)).values()) / n for _ in range(draws)]",
      "        shares = [max(Counter(rng.randrange(w) for _ in range(n)).values()) / w for _ in range(draws)]",
      "ceiling: top share over the replies, not the prompts"),
    M("        replies = sorted(set(well_formed[group]))", "        replies = list(well_formed[group])",
      "ceiling: a repeated well-formed reply counted twice"),
    M('return {"prompts": sum(prompts_per_group.values()),', 'return {"prompts": len(prompts_per_group),',
      "ceiling: prompts counts the groups"),
    M("distinct += w * (1 - (1 - 1 / w) ** n)", "distinct += w * (1 - (1 - 1 / n) ** w)",
      "ceiling: prompts and replies swapped in the expected distinct"),
])

JUDGES = Target("emotion_dpo/judges.py", ["tests/test_judges.py", "-k", "not stops_evaluate"], [
    M("    mapping = {k.lower(): v for k, v in label_map.items()}\n", "    mapping = dict(label_map)\n",
      "label_map keys compared case-sensitively"),
    M("unknown = sorted(k for k in label_map if k.lower() not in {label.lower() for label in own_labels})",
      "unknown = sorted(k for k in label_map if k not in own_labels)",
      "label_map entries checked against the judge's labels case-sensitively"),
    M("        mapped.append(emotions[target.lower()])", "        mapped.append(target)",
      "a mapped emotion keeps the judge's / label_map's spelling"),
    M("    if unknown:\n        raise", "    if False:\n        raise",
      "a label_map entry for a label the judge lacks accepted"),
    M("    if len(set(names)) != len(names):", "    if len(set(names)) > len(names):",
      "two judges named alike accepted"),
    M("totals[emotion] = totals.get(emotion, 0.0) + float(p)", "totals[emotion] = float(p)",
      "two outputs of one emotion: the last one kept, not summed"),
    M("    return [max(row, key=row.get) for row in probabilities]",
      "    return [max(row) for row in probabilities]", "prediction: the last emotion by name, not by probability"),
    M("    guesses = [p.lower() for p in predicted(probabilities)]",
      "    guesses = predicted(probabilities)", "judge figures: predictions compared case-sensitively"),
    M("    present = sorted(set(wanted))", "    present = sorted(set(wanted) | set(guesses))",
      "F1 over the requested and the predicted emotions"),
    M('labels=present, average="weighted"', 'labels=sorted(set(guesses)), average="weighted"',
      "weighted F1 over the predicted emotions"),
    M("confidence = [{k.lower(): v for k, v in row.items()}.get(t, 0.0)", "confidence = [row.get(t, 0.0)",
      "target confidence: emotion names compared case-sensitively"),
    M("    a = [x.lower() for x in training_labels]\n", "    a = list(training_labels)\n",
      "agreement: the training classifier's labels compared case-sensitively"),
    M("    return 1.0 if a == b else float(cohen_kappa_score(a, b))",
      "    return float(cohen_kappa_score(a, b))", "agreement: one label throughout gives kappa's NaN"),
])

DISTRIBUTED = Target("emotion_dpo/distributed.py", ["tests/test_distributed_rules.py"], [
    M("    return items[rank::world_size]",
      "    return items[rank * len(items) // world_size:(rank + 1) * len(items) // world_size]",
      "shard: consecutive blocks instead of every world_size-th item"),
    M("for number, start in enumerate(range(0, len(prompts), batch_prompts))]",
      "for number, start in enumerate(range(0, len(prompts), batch_prompts), 1)]", "batches numbered from 1"),
    M("    return [(number, prompts[start:start + batch_prompts])",
      "    return [(number, prompts[start:start + batch_prompts - 1])", "a batch one prompt short"),
    M('return int(os.environ.get("WORLD_SIZE", "1"))', 'return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))',
      "world size: this machine's processes only"),
    M('return int(os.environ.get("RANK", "0")) == 0', 'return int(os.environ.get("LOCAL_RANK", "0")) == 0',
      "main process: local rank 0 (one per machine)"),
    M("    if is_main_process():\n        print(text)", "    print(text)", "say: every process prints"),
    M("return world_size() > 1 and not torch.cuda.is_available()", "return not torch.cuda.is_available()",
      "on_cpus: one process without a GPU starts gloo too"),
    M("    state = PartialState(cpu=on_cpus())", "    state = PartialState()",
      "process_state: accelerate not told cpu=True on CPUs"),
    M("    if world_size() > 1:\n        die_with_parent()", "    if world_size() > 1:\n        pass",
      "process_state: a launcher's worker not tied to its parent"),
    M("    if world_size() > 1 and state.num_processes != world_size():",
      "    if world_size() > 1 and state.num_processes > world_size():",
      "process_state: accelerate seeing too few processes accepted"),
    M("    if num_processes == 1:", "    if num_processes == 0:", "launch: one process under accelerate launch"),
    M('"--main_process_port", "0",', '"--main_process_port", "29500",', "launch: a fixed rendezvous port"),
    M('"--num_processes", str(num_processes),', '"--num_processes", str(num_processes - 1),',
      "launch: one process too few"),
    M("prctl(1, signal.SIGKILL)", "prctl(1, signal.SIGTERM)", "die_with_parent: SIGTERM, which a process can catch"),
    M("    if os.getppid() == 1:", "    if os.getppid() == 0:",
      "die_with_parent: an orphan (adopted by init) not killed"),
])

DPO_PREFIX = Target("emotion_dpo/dpo_prefix.py", ["tests/test_dpo_prefix_layout.py"], [
    M("    if input_ids.dim() != 2 or input_ids.shape[0] % 2:", "    if input_ids.dim() != 2:",
      "split: a batch of an odd number of rows accepted"),
    M("        ids, reply = input_ids[row][real], completion[row][real].bool()",
      "        ids, reply = input_ids[row], completion[row].bool()", "split: padding read as tokens"),
    M("        if prompt_len == 0 or bool(reply[:prompt_len].any()):", "        if prompt_len == 0:",
      "split: a reply token inside the prompt accepted"),
    M("        if prompt.shape != prompt_r.shape or not bool((prompt == prompt_r).all()):",
      "        if prompt.shape != prompt_r.shape:", "split: different prompts of one length accepted"),
    M("        (prompt, chosen), (prompt_r, rejected) = sequences[i], sequences[pairs_n + i]",
      "        (prompt, chosen), (prompt_r, rejected) = sequences[i], sequences[-1 - i]",
      "split: the rejected rows read in reverse order"),
    M("sum(lengths[j] for j in rows[-1]) + length <= pack_tokens:",
      "sum(lengths[j] for j in rows[-1]) + length < pack_tokens:",
      "packing: a pair filling the budget exactly gets a new row"),
    M("torch.cat([torch.arange(p + c), torch.arange(p, p + q)])",
      "torch.cat([torch.arange(p + c), torch.arange(p + c, p + c + q)])",
      "positions: rejected's continue after chosen's"),
    M('column = width - sum(lengths[j] for j in row) if padding_side == "left" else 0',
      'column = width - sum(lengths[j] for j in row) if padding_side == "right" else 0',
      "padding on the side not asked for"),
    M("    causal = index[None, :, None] >= index[None, None, :]",
      "    causal = index[None, :, None] > index[None, None, :]", "mask: a token does not attend to itself"),
    M("        mask &= ~((part[:, :, None] == REJECTED) & (part[:, None, :] == CHOSEN))",
      "        mask &= ~((part[:, :, None] == CHOSEN) & (part[:, None, :] == REJECTED))",
      "mask: chosen blocked from rejected instead of rejected from chosen"),
    M("    mask |= (segment[:, :, None] < 0) & torch.eye(width, dtype=torch.bool, device=device)[None]\n", "",
      "mask: padding attends to nothing"),
    M("            compact_ids[sequence, 0] = prompt[-1]", "            compact_ids[sequence, 0] = prompt[0]",
      "compact: the prompt's first token, not its last"),
    M("(n_pairs + i, rejected, start + p + len(chosen))", "(n_pairs + i, rejected, start + p + len(rejected))",
      "compact: rejected's columns counted past a reply of its own length"),
    M("            columns = [start + p - 1] + list(range(first, first + n - 1))",
      "            columns = [start + p] + list(range(first, first + n - 1))",
      "compact: the first reply token predicted from its own position"),
    M('SUPPORTED_ATTENTION = ("sdpa", "eager")', 'SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2")',
      "flash_attention_2 accepted"),
    M('    implementation = getattr(inner.config, "_attn_implementation", None) or "eager"\n'
      '    if implementation not in SUPPORTED_ATTENTION:',
      '    implementation = getattr(inner.config, "_attn_implementation", None) or "eager"\n'
      '    if implementation == "flash_attention_2":', "only flash_attention_2 refused (flex_attention accepted)"),
    M('    if not isinstance(model, PeftModel) or model.peft_type != "LORA":',
      "    if not isinstance(model, PeftModel):", "a PeftModel of another kind (IA3) accepted"),
    M('    if getattr(model, "unsloth_cuda_decode", False):', "    if False:", "unsloth's CUDA kernels accepted"),
    M('    if getattr(text_config, "final_logit_softcapping", None) or getattr(',
      "    if getattr(", "logit softcapping accepted"),
    M('.masked_fill(~mask, torch.finfo(dtype).min)', '.masked_fill(mask, torch.finfo(dtype).min)',
      "eager: the allowed positions masked, not the others"),
    M('if getattr(inner.config, "_attn_implementation", "eager") == "eager":',
      'if getattr(inner.config, "_attn_implementation", "eager") == "sdpa":',
      "eager gets the boolean mask, sdpa the additive one"),
    M("        if previous is None:\n            del model.forward", "        if previous is None:\n            pass",
      "the shared forward left on the model"),
])

DPO_REFERENCE = Target("emotion_dpo/dpo_reference.py", ["tests/test_dpo_reference_cache.py"], [
    M('digest.update(json.dumps({"max_length": args.max_length, "truncation_mode": args.truncation_mode,',
      'digest.update(json.dumps({"truncation_mode": args.truncation_mode,', "key: max_length left out"),
    M('digest.update(json.dumps({"max_length": args.max_length, "truncation_mode": args.truncation_mode,',
      'digest.update(json.dumps({"max_length": args.max_length,', "key: truncation_mode left out"),
    M('"bf16": args.bf16, "fp16": args.fp16, "path": path_tag,', '"bf16": args.bf16, "path": path_tag,',
      "key: fp16 left out"),
    M('"bf16": args.bf16, "fp16": args.fp16, "path": path_tag,', '"bf16": args.bf16, "fp16": args.fp16,',
      "key: the forward path left out"),
    M('                              "adapter": adapter_digests(model, adapter)}',
      '                              "adapter": sorted(adapter_digests(model, adapter))}',
      "key: the adapter's tensor names only, not their digests"),
    M('    adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in getattr(model, "peft_config", {}) else "default"',
      '    adapter = "default"', "key: the trained adapter's tensors instead of ref's"),
    M("    for column in ID_COLUMNS:\n", "    for column in ID_COLUMNS[:2]:\n", "key: the rejected ids left out"),
    M("digest.update(json.dumps(list(dataset[column])).encode())",
      "digest.update(json.dumps([len(ids) for ids in dataset[column]]).encode())",
      "key: the ids' lengths only"),
    M('path = Path(trainer.args.output_dir) / REFERENCE_LOGPS / f"{name}.json"',
      'path = Path(trainer.args.output_dir) / REFERENCE_LOGPS / "reference.json"',
      "file: one for every split"),
    M('if saved.get("key") == key and all(', "if all(", "file: read back for other inputs"),
    M('if saved.get("key") == key and all(len(saved.get(c, ())) == len(dataset) for c in COLUMNS):',
      'if saved.get("key") == key:', "file: read back with fewer values than pairs"),
    M("        except ValueError:\n            saved = {}", "        except ValueError:\n            raise",
      "file: a torn file stops the run"),
    M("                dataset = dataset.add_column(column, saved[column])",
      "                dataset = dataset.add_column(column, saved[COLUMNS[0]])",
      "file: chosen's log-probs read into both columns"),
    M("    if trainer.accelerator.is_main_process:\n", "    if True:\n", "file: every process writes it"),
])

SENTENCEPIECE = Target("emotion_dpo/sentencepiece_check.py", ["tests/test_sentencepiece_rules.py"], [
    M("            return self.with_prefix.encode(text)", "            return self.without_prefix.encode(text)",
      "ids: a text without special tokens loses its dummy prefix"),
    M("        inner.normalizer_spec.add_dummy_prefix = False", "        inner.normalizer_spec.add_dummy_prefix = True",
      "ids: every piece gets the dummy prefix"),
    M("sorted(special_ids, key=len, reverse=True)", "sorted(special_ids)",
      "ids: special tokens matched in name order, not longest first"),
    M("            at += len(piece)\n", "", "ids: every piece counted as the text's start"),
    M("                out.append(special_ids[piece])", "                out += self.without_prefix.encode(piece)",
      "ids: a special token encoded as text"),
    M("        if self.proto.trainer_spec.model_type != 2:", "        if self.proto.trainer_spec.model_type != 1:",
      "model types swapped: unigram (1) read as BPE"),
    M("        merges.sort(key=lambda m: m[2], reverse=True)", "        merges.sort(key=lambda m: m[2])",
      "merges ranked lowest score first"),
    M("pre_tokenizers.Metaspace(replacement=\"▁\", prepend_scheme=\"first\", split=False)",
      "pre_tokenizers.Metaspace(replacement=\"▁\", prepend_scheme=\"always\", split=False)",
      "rebuild: the dummy prefix after every special token"),
    M("decoders.Strip(content=\" \", left=1)", "decoders.Strip(content=\" \", left=0)",
      "rebuild: decoding keeps the leading space"),
    M("fuse_unk=True, byte_fallback=True,", "fuse_unk=True, byte_fallback=False,",
      "rebuild: no byte fallback (an emoji becomes <unk>)"),
    M("    start = max(0, at - 2)", "    start = max(0, at - 1)", "first difference: one piece of context, not two"),
    M("next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))",
      "next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), 0)",
      "first difference: one id list a prefix of the other shown from the start"),
    M("i >= reference.with_prefix.get_piece_size() else", "i > reference.with_prefix.get_piece_size() else",
      "first difference: the first added token read as a SentencePiece piece"),
    M('    if config.get("legacy") is True:', '    if config.get("legacy") is not None:',
      "layout: legacy: false named as the cause"),
    M("    if not tokenizer_json.is_file():", "    if not config_file.is_file():",
      "layout: tokenizer_config.json checked for tokenizer.json"),
    M('kinds = [n.get("type") for n in normalizer.get("normalizers", [normalizer])] if normalizer else []',
      'kinds = [n.get("type") for n in normalizer.get("normalizers", [])] if normalizer else []',
      "layout: a lone Prepend normalizer not recognised"),
    M("    if own and Path(own).name == MODEL_FILE and Path(own).is_file():", "    if own and Path(own).is_file():",
      "sentencepiece_file: any vocab file taken for the SentencePiece model"),
    M("    for folder in folders:\n        try:", "    for folder in reversed(folders):\n        try:",
      "sentencepiece_file: the last folder's model first"),
    M("    if rebuild and rebuild_backend(tokenizer, reference) and first_mismatch() is None:",
      "    if rebuild and rebuild_backend(tokenizer, reference):", "a rebuilt tokenizer that still differs is kept"),
    M("    if rebuild and rebuild_backend(tokenizer, reference) and first_mismatch() is None:",
      "    if rebuild_backend(tokenizer, reference) and first_mismatch() is None:", "rebuild=False still rebuilds"),
    M("        if (where, str(model_file)) not in _notified:", "        if True:", "the rebuild warned on every load"),
])

TARGETS = {"rewards": REWARDS, "selection": SELECTION, "stats": STATS, "journal": JOURNAL, "prompts": PROMPTS,
           "template": TEMPLATE, "dataset": DATASET,
           "diversity": DIVERSITY, "judges": JUDGES,
           "distributed": DISTRIBUTED, "dpo_prefix": DPO_PREFIX,
           "dpo_reference": DPO_REFERENCE,
           "sentencepiece_check": SENTENCEPIECE}
