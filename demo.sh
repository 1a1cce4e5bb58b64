#!/usr/bin/env bash
# The whole pipeline on the offline demo world, on the CPU, in a few minutes:
# build (or reuse) the world -> generate_preferences -> fine_tune_dpo -> evaluate (SFT vs DPO table).
# Each run gets its own folder; RUN=outputs/demo/run-... bash demo.sh resumes an interrupted one.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${RUN:-outputs/demo/run-$(date +%Y%m%d-%H%M%S)}
echo "== demo run in $RUN"
python -m emotion_dpo.demo_world
python generate_preferences.py --config args/demo/generate_preferences_arg.json --set "output_dir=$RUN/preferences"
python fine_tune_dpo.py --config args/demo/dpo_arg.json \
  --set "dataset=$RUN/preferences/dataset" --set "output_dir=$RUN/dpo"
python evaluate.py --config args/demo/evaluate_arg.json \
  --set "dpo_adapter=$RUN/dpo/final_adapter" --set "output_dir=$RUN/evaluation"
