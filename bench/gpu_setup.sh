# Sourced by gpu.sh and gpu_unsloth.sh (not run alone): the carried wheels (and, with WITH_UNSLOTH=1, the
# unsloth tree), the environment, SHAPE / OUT / WORLD and the sizes for the shape, the machine's record in
# $OUT/machine.txt, and the synthetic world (built once, reused). Sets `start` before the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SHAPE=${SHAPE:-7b}
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
if ! python3 -c "import trl, datasets, bitsandbytes${WITH_UNSLOTH:+, unsloth}" 2>/dev/null; then  # the GPU image lacks them
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  if [ -n "${WITH_UNSLOTH:-}" ]; then tar -C /tmp/site -xzf .whl-unsloth/unsloth-site.tar.gz; fi
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORLD=/tmp/synth-$SHAPE
if [ "$SHAPE" = 7b ]; then PROMPTS=64; LEN=512; STEPS=6; else PROMPTS=16; LEN=128; STEPS=3; fi
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU") | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, trl, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/machine.txt"
start=$(date +%s)
python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from synthetic import build_world; build_world(Path('$WORLD'), '$SHAPE')"
echo "world built in $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
