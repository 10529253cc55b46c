#!/usr/bin/env bash
# Every GPU figure of the README (training step and encoding throughput of the Qwen3-VL-4B architecture, ours and
# the release's configuration, with FLOPs utilisation and peak memory, and the memory of a gradient-cache chunk
# behind configs/chunk_sizes.yaml) in one run, for a GPU machine that has PyTorch but cannot download: about
# 10 minutes on one H100/H200, three random 4B builds included. First, the test suite's exactness checks there.
#
#   bash benchmarks/gpu_wheels.sh        # where pip works: the pinned packages the GPU machine lacks, into .whl/
#   bash benchmarks/gpu_session.sh       # on the GPU machine, with .whl/ copied along; output in $OUT (runs/gpu)
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
fi
# train.py imports evaluate.py, which imports faiss (exact search) at the top. A GPU machine may not have faiss, and
# its wheel does not fit in a carry beside the others; nothing measured here searches, so where faiss is missing a
# module stands in that raises if anything ever uses it.
python3 -c "import faiss" 2>/dev/null || cat > /tmp/site/faiss.py <<'STUB'
def __getattr__(name):
    raise ImportError(f"faiss.{name}: faiss is not installed here; benchmarks/gpu_session.sh runs nothing that searches")
STUB
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers',
                transformers.__version__, '| peft', peft.__version__, '| flash_attn installed:',
                __import__('importlib').util.find_spec('flash_attn') is not None)"
} 2>&1 | tee "$OUT/setup.txt"
quiet() { grep --line-buffered -v "Loading weights"; }
# Exactness first: the test suite's checks that also matter on a GPU (the CUDA random state restored by the
# gradient-cache replay and by a checkpoint, the frozen vision tower's reuse, chunk-size invariance), run there in
# fp32 (tests/conftest.py --device). Under a minute.
timeout 150 python3 -m pytest -q -p no:cacheprovider --device cuda tests/test_train.py tests/test_fast_paths.py \
    -k "cached_gradients_equal or chunk_size_does_not_change or checkpoint_restores_step or replay_reuses" 2>&1 \
    | tee "$OUT/exactness.txt"
timeout 330 python3 benchmarks/train_throughput.py --real-arch --steps 3 --chunks 16,64 \
    --json "$OUT/train_throughput.json" 2>&1 | quiet | tee "$OUT/train_throughput.txt"
timeout 150 python3 benchmarks/encode_throughput.py --real-arch --repeats 3 2>&1 | quiet \
    | tee "$OUT/encode_throughput.txt"
# The peak of a training step for two record kinds at two chunk sizes each, next to the CPU estimate of
# configs/chunk_sizes.yaml (predicted vs measured), and the table made from the measurement ($OUT/chunk_sizes.yaml,
# beside the CPU one): copy it over configs/chunk_sizes.yaml. About a minute, the 4B build included.
cp configs/chunk_sizes.yaml "$OUT/chunk_sizes_cpu.yaml"
timeout 90 python3 benchmarks/chunk_memory.py --device cuda --kinds image,video --chunks 4,16 \
    --estimate configs/chunk_sizes.yaml --table "$OUT/chunk_sizes.yaml" --json "$OUT/chunk_memory.json" 2>&1 \
    | quiet | tee "$OUT/chunk_memory.txt"
