#!/usr/bin/env bash
# Issue 17's figures on a GPU, offline, on gpu.sh's Llama-2-7B-shaped 4-bit world. Each figure is printed as
# soon as it is measured (JSON lines on stdout and in $OUT/results.jsonl; each training step's line on stderr),
# the owed ones first:
#   dpo-levers       issue 23: DPO at realistic lengths, TRL's path against prefix sharing, the reference computed
#                    once, both, and packing (bench/dpo_throughput.py --real-lengths), then the projection; the
#                    goals: 2048 pairs x 3 epochs <= 5 min, peak memory of all-levers / trl-path <= 0.6
#   unsloth          unsloth DPO, adapter design, copies trained then frozen: peak memory, step time
#   headline         generation, reference loop vs batched (ratio, 2048 prompts projected); DPO memory, adapter
#                    vs separate reference; DPO pairs/s with args/dpo_arg.json's settings; the job's projection
#   dpo-settings     DPO candidate settings side by side (bench/dpo_throughput.py), then the projection again
#   generation-step  static cache (+ compiled decode), merged-dequantized copy, decode profile, logits processors
# Each part gets at most its own limit and never more than what is left of BUDGET seconds (540 by default, for
# a 600-second device call), so a run cut short still returns every figure finished before.
# Needs .whl/ (with liger_kernel's wheel) and .whl-unsloth/ (see bench/README.md).
#   bash bench/gpu_issue17.sh                                       # on the GPU machine
#   PARTS="dpo-settings generation-step" bash bench/gpu_issue17.sh   # a later call: the parts still owed
#   SHAPE=small SCALE=6 BUDGET=3600 bash bench/gpu_issue17.sh         # tiny shapes, to check it on a CPU
#   SHAPE=small SCALE=6 BUDGET=1200 PARTS=dpo-levers bash bench/gpu_issue17.sh   # issue 23's part alone, on a CPU
WITH_UNSLOTH=1
source "$(dirname "$0")/gpu_setup.sh"
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
BUDGET=${BUDGET:-540}
SCALE=${SCALE:-1}  # multiplies every part's limit (a shared CPU checking the script needs several times more)
PARTS=${PARTS:-dpo-levers unsloth headline dpo-settings generation-step}
# rounds per prompt of the demo world's generate_preferences: 1.90 in both jobs of `python bench/profile_job.py
# --repeats 2` (2026-11-27, 512 prompts; histogram in bench/RESULTS.md)
MEAN_ROUNDS=${MEAN_ROUNDS:-1.90}
if [ "$SHAPE" = 7b ]; then REF_PROMPTS=16; DPO_STEPS=3; else REF_PROMPTS=4; DPO_STEPS=2; fi
LEVERS=${LEVERS:-trl-path,all-levers,prefix-sharing,reference-once,prefix-batch8,prefix-packed,all-levers-packed}
CANDIDATES=${CANDIDATES:-batch16-accum1,batch16-no-checkpointing,batch16-liger,batch16-precompute-ref,batch8-accum2,batch2-accum8-adamw-8bit,batch2-accum8-paged-adamw-8bit,batch2-accum8-length-grouped,unsloth-batch16-accum1}
python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null | tee -a "$OUT/machine.txt" || echo "no triton" | tee -a "$OUT/machine.txt"
python3 -c "import importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>/dev/null \
  | tee -a "$OUT/machine.txt" || echo "no liger-kernel" | tee -a "$OUT/machine.txt"

left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# part NAME LIMIT COMMAND...: at most LIMIT seconds (and what is left); JSON lines to results.jsonl as they come,
# stderr to $OUT/NAME.err with each step's line shown as it ends
part() {
  local name=$1 limit=$(( $2 * SCALE )) remaining
  shift 2
  remaining=$(left)
  if (( remaining < limit )); then limit=$remaining; fi
  if (( limit < 30 )); then
    echo "{\"part\": \"$name\", \"skipped\": \"budget spent\"}" | tee -a "$OUT/results.jsonl"
    return 0
  fi
  echo "== $name: at most $limit s, from $(( $(date +%s) - start )) s" >&2
  timeout "$limit" "$@" 2> >(tee "$OUT/$name.err" | grep --line-buffered -E "step [0-9]+:" >&2) \
    | grep --line-buffered '^{"' | tee -a "$OUT/results.jsonl" \
    || echo "{\"part\": \"$name\", \"ended\": \"failed or cut off (limit $limit s); see $name.err\"}" \
      | tee -a "$OUT/results.jsonl"
}
projection() {
  python3 bench/project_job.py --results "$OUT/results.jsonl" --mean-rounds "$MEAN_ROUNDS" | tee -a "$OUT/results.jsonl"
}

for p in $PARTS; do
  case $p in
    dpo-levers)
      part dpo-levers 300 python3 bench/dpo_throughput.py --world "$WORLD" --real-lengths --candidates "$LEVERS" \
        --steps "$DPO_STEPS" --limit $(( 45 * SCALE ))
      projection ;;
    unsloth)
      for copies in trained frozen; do
        flag=$([ $copies = frozen ] && echo --frozen-copies || true)
        part "unsloth-dpo-$copies" 90 python3 bench/dpo_memory.py --design adapter --unsloth $flag --world "$WORLD" \
          --max-length "$LEN" --batch 2 --steps "$STEPS"
      done ;;
    headline)
      part generation 150 python3 bench/generation_speed.py --synthetic "$SHAPE" --world "$WORLD" --prompts "$PROMPTS" \
        --batch-prompts 64 --reference-prompts "$REF_PROMPTS" --config args/generate_preferences_arg.json
      for design in adapter separate; do
        part "dpo-memory-$design" 75 python3 bench/dpo_memory.py --design $design --world "$WORLD" --max-length "$LEN" \
          --batch 2 --steps "$STEPS"
      done
      part dpo-default 90 python3 bench/dpo_throughput.py --world "$WORLD" --candidates batch2-accum8 \
        --steps "$DPO_STEPS" --limit $(( 85 * SCALE ))
      projection ;;
    dpo-settings)
      part dpo-settings 600 python3 bench/dpo_throughput.py --world "$WORLD" --candidates "$CANDIDATES" \
        --steps "$DPO_STEPS" --limit $(( 80 * SCALE ))
      projection ;;
    generation-step)
      part generation-step 240 python3 bench/generation_step.py --synthetic "$SHAPE" --world "$WORLD" \
        --config args/generate_preferences_arg.json --prompts "$PROMPTS" --repeats 2 ;;
    *) echo "unknown part $p (dpo-levers, unsloth, headline, dpo-settings, generation-step)" >&2 ;;
  esac
done
projection
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
