#!/usr/bin/env bash
# unsloth on the GPU, offline, on the same Llama-2-7B-shaped world as gpu.sh: (a) DPO step time and peak GPU
# memory through unsloth, adapter reference vs separate reference model; (b) the shared prefill's check under
# unsloth's CUDA forward and the batched pipeline's prompts/s. About 5 minutes on an H200, judging by the
# parts timed on 2026-11-26 (give it 7).
# Needs .whl/ (as gpu.sh) and .whl-unsloth/unsloth-site.tar.gz (see bench/README.md).
#   bash bench/gpu_unsloth.sh            # on the GPU machine (results under $OUT)
#   SHAPE=small bash bench/gpu_unsloth.sh   # tiny shapes, to check it on a CPU
WITH_UNSLOTH=1
source "$(dirname "$0")/gpu_setup.sh"
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
python3 -c "import unsloth, unsloth_zoo; print('unsloth', unsloth.__version__)" 2>"$OUT/unsloth-import.err" \
  | tee -a "$OUT/machine.txt"
# DPO first (both designs): its figures are the ones still owed; generation was measured on 2026-11-26.
# Each design gets at most DPO_LIMIT seconds, so one that hangs leaves time for the next; its stderr file keeps
# each finished step's time and the peak so far.
for design in adapter separate; do
  timeout "${DPO_LIMIT:-200}" python3 bench/dpo_memory.py --design $design --unsloth --world "$WORLD" \
    --max-length "$LEN" --batch 2 --steps "$STEPS" 2>"$OUT/dpo-$design-unsloth.err" | grep '^{"' | tee -a "$OUT/results.jsonl" \
    || echo "{\"design\": \"$design\", \"unsloth\": true, \"failed\": true}" | tee -a "$OUT/results.jsonl"
  echo "at $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
done
# the shared prefill's check under unsloth, and the batched pipeline as it runs there (plain call);
# add --force-shared-prefill to time the prefill it cannot use (2026-11-26: 0.64 s more per 64 prompts)
python3 bench/generation_speed.py --synthetic "$SHAPE" --world "$WORLD" --prompts "$PROMPTS" --batch-prompts 64 \
  --config args/generate_preferences_arg.json --set use_unsloth=true --skip-reference \
  2>"$OUT/generation-unsloth.err" | grep '^{"' | tee -a "$OUT/results.jsonl" || true
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
