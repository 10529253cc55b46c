#!/usr/bin/env bash
# Every GPU figure of the README (training step and encoding throughput of the Qwen3-VL-4B architecture, ours and
# the release's configuration, with FLOPs utilisation and peak memory) in one run, for a GPU machine that has
# PyTorch but cannot download: about 8 minutes on one H100/H200, two random 4B builds included.
#
#   bash benchmarks/gpu_wheels.sh        # where pip works: the pinned packages the GPU machine lacks, into .whl/
#   bash benchmarks/gpu_session.sh       # on the GPU machine, with .whl/ copied along; output in $OUT (runs/gpu)
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers',
                transformers.__version__, '| peft', peft.__version__, '| flash_attn installed:',
                __import__('importlib').util.find_spec('flash_attn') is not None)"
} 2>&1 | tee "$OUT/setup.txt"
quiet() { grep --line-buffered -v "Loading weights"; }
timeout 330 python3 benchmarks/train_throughput.py --real-arch --steps 3 --chunks 16,64 \
    --json "$OUT/train_throughput.json" 2>&1 | quiet | tee "$OUT/train_throughput.txt"
timeout 150 python3 benchmarks/encode_throughput.py --real-arch --repeats 3 2>&1 | quiet \
    | tee "$OUT/encode_throughput.txt"
