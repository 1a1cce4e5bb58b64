#!/usr/bin/env bash
# The GPU benchmark, offline: Llama-2-7B-shaped random weights (bf16 -> 4-bit NF4), random classifiers of the
# real shapes; (a) generation, reference loop vs batched pipeline; (b) DPO step time and peak GPU memory,
# adapter reference vs separate reference model. Needs the wheels in .whl/ (see bench/README.md).
#   bash bench/gpu.sh            # on the GPU machine (results under $OUT)
#   SHAPE=small bash bench/gpu.sh   # the same script with tiny shapes, to check it on a CPU
source "$(dirname "$0")/gpu_setup.sh"
python3 bench/generation_speed.py --synthetic "$SHAPE" --world "$WORLD" --prompts "$PROMPTS" --batch-prompts 64 \
  --config args/generate_preferences_arg.json 2>"$OUT/generation.err" | grep '^{"' | tee -a "$OUT/results.jsonl" || true
# the SFT adapter's modules_to_save frozen (train_modules_to_save: false) or trained (the reference's way);
# frozen first: the trained rows were measured on earlier runs, so a run cut short loses the least
for copies in frozen trained; do
  flag=$([ $copies = frozen ] && echo --frozen-copies || true)
  for design in adapter separate; do
    python3 bench/dpo_memory.py --design $design $flag --world "$WORLD" --max-length "$LEN" --batch 2 --steps "$STEPS" \
      2>"$OUT/dpo-$design-$copies.err" | grep '^{"' | tee -a "$OUT/results.jsonl" \
      || echo "{\"design\": \"$design\", \"copies\": \"$copies\", \"failed\": true}" | tee -a "$OUT/results.jsonl"
  done
done
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
