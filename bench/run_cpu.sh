#!/usr/bin/env bash
# The CPU benchmarks on this machine: generation speed on the demo world (reference loop vs batched pipeline,
# then where the batched round's time goes) and DPO memory (adapter reference vs separate reference model).
#   bash bench/run_cpu.sh        # prints JSON; bench/RESULTS.md records them
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -m emotion_dpo.demo_world >/dev/null
uptime
python bench/generation_speed.py --prompts 64 --batch-prompts 64 --repeats 3 2>/dev/null | grep '^{"'
python bench/profile_generation.py 2>/dev/null
world=$(mktemp -d)
python bench/dpo_memory.py --build-cpu-world --world "$world" --design adapter 2>/dev/null
for flag in "" --frozen-copies; do  # the SFT adapter's modules_to_save trained, then frozen
  for design in adapter separate; do
    python bench/dpo_memory.py --design $design $flag --world "$world" --max-length 256 --batch 2 --steps 6 2>/dev/null | grep '^{"'
  done
done
rm -rf "$world"
