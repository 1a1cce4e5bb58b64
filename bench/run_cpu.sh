#!/usr/bin/env bash
# The CPU benchmarks on this machine, each figure from one run: generation speed on the demo world
# (reference loop vs batched pipeline) and DPO memory (adapter reference vs separate reference model).
#   bash bench/run_cpu.sh        # prints JSON lines; bench/RESULTS.md records them
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -m emotion_dpo.demo_world >/dev/null
python bench/generation_speed.py --prompts 64 --batch-prompts 64 2>/dev/null | grep '^{"'
world=$(mktemp -d)
python bench/dpo_memory.py --build-cpu-world --world "$world" --design adapter 2>/dev/null
for design in adapter separate; do
  python bench/dpo_memory.py --design $design --world "$world" --max-length 256 --batch 2 --steps 6 2>/dev/null | grep '^{"'
done
rm -rf "$world"
