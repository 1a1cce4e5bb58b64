#!/usr/bin/env bash
# The whole pipeline on the offline demo world, on the CPU: build (or reuse) the world, then run_pipeline.py on
# args/demo/pipeline_arg.json: two on-policy iterations of generate_preferences -> fine_tune_dpo -> evaluate,
# ending with the iterations table (SFT, iteration 1, iteration 2). Extra arguments go to run_pipeline.py
# (e.g. --set iterations=1). Each run gets its own folder; RUN=outputs/demo/run-... bash demo.sh resumes one.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${RUN:-outputs/demo/run-$(date +%Y%m%d-%H%M%S)}
echo "== demo run in $RUN"
python -m emotion_dpo.demo_world
python run_pipeline.py --config args/demo/pipeline_arg.json --set "output_dir=$RUN" "$@"
