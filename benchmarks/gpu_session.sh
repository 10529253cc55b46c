#!/usr/bin/env bash
# Every GPU figure of the README (training step and encoding throughput of the Qwen3-VL-4B architecture, ours and
# the release's configuration, with FLOPs utilisation and peak memory, and the memory of a gradient-cache chunk
# behind configs/chunk_sizes.yaml) in one run of at most 545 s, for a GPU machine that has PyTorch but cannot
# download. First, the test suite's exactness checks there.
#
#   bash benchmarks/gpu_wheels.sh        # where pip works: the pinned packages the GPU machine lacks, into .whl/
#   bash benchmarks/gpu_session.sh       # on the GPU machine, with .whl/ copied along; output in $OUT (runs/gpu)
#
# Each stage must end by a fixed time after the start (END below; a stage that finishes early leaves its time to
# the next), so the whole run fits one 600 s command with room to spare; every stage writes its output to $OUT as it
# comes, so a run cut short keeps what it printed. session.txt: the setup and each stage's exit status and time.
# Eight files in all (a borrowed GPU machine may return no more): session.txt, exactness.txt,
# train_throughput.{txt,json}, encode_throughput.txt, chunk_memory.{txt,json}, chunk_sizes.yaml.
set -uo pipefail    # no -e: a stage that fails or runs out of time is logged and the next one runs
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
started=$SECONDS

# stage NAME END COMMAND...: COMMAND with the time left until END s after the start (then TERM, and KILL 5 s later),
# its output, less transformers' weight-loading progress bars, into $OUT/NAME.txt as it comes.
stage() {
    local name=$1 end=$2 begun=$SECONDS
    shift 2
    local limit=$((end - (SECONDS - started)))
    if [ "$limit" -lt 10 ]; then
        echo "stage $name: not run, ${limit} s left of its time" | tee -a "$OUT/session.txt"
        return 1
    fi
    timeout -k 5 "$limit" "$@" 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "stage $name: exit $status$( ((status == 124 || status == 137)) && echo ' (out of time)') after" \
         "$((SECONDS - begun)) s of $limit s" | tee -a "$OUT/session.txt"
    return "$status"
}

# END of each stage, in seconds after the start, from what it does (docs/gpu_h100.txt: H100 times of earlier
# versions of these scripts; an H200 computes as fast and moves memory 1.4x faster). Most valuable first: the
# exactness checks, which the numbers rely on, then the training step, the issue's target.
# - session, 60 s: pip unpacks 50 MB of wheels (6 s on two CPU cores), nvidia-smi, the first import of torch,
#   transformers and peft (10 s of CPU, compiling the unpacked modules), a CUDA check;
# - exactness, 170 s: 14 tests on the tiny backbone, 47 s on one CPU thread with the GPU machine's torch 2.11;
# - training, 405 s: a random 4B build (12 s on the H100) and two encoder loads (~10 s each), then ours and the
#   release at chunks 16 and 64, 6 steps each (1 warm-up, 3 timed, 1 under the FLOP counter, whose Python dispatch
#   adds ~3 s, 1 under the sync counter) of at most 7 s (the H100's slowest chunk-16 step, before this round's
#   speed-ups; a chunk of 64 replays nothing): about 4 x 45 + 45 s;
# - encoding, 475 s: build and load 21 s on the H100, 28 runs of under 1 s and 4 FLOP-counted ones;
# - chunk memory, 540 s: build and load ~25 s, random images and clips ~5 s, 5 training steps of at most 64 records.
# The packages the machine lacks (.whl/, from gpu_wheels.sh), then what is there.
stage session 60 bash -c '
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 - <<PY
import importlib.util, torch, transformers, peft
print("torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__,
      "| flash_attn installed:", importlib.util.find_spec("flash_attn") is not None,
      "| CUDA:", torch.cuda.is_available())
PY'
# train.py imports evaluate.py, which imports faiss (exact search) at the top. A GPU machine may not have faiss, and
# its wheel does not fit in a carry beside the others; nothing measured here searches, so where faiss is missing a
# module stands in that raises if anything ever uses it.
python3 -c "import faiss" 2>/dev/null || cat > /tmp/site/faiss.py <<'STUB'
def __getattr__(name):
    raise ImportError(f"faiss.{name}: faiss is not installed here; benchmarks/gpu_session.sh runs nothing that searches")
STUB
# The exactness checks that also matter on a GPU, run there (tests/conftest.py --device): in fp32, the CUDA random
# state restored by the gradient-cache replay and by a checkpoint, the frozen vision tower's reuse, chunk-size
# invariance; in bf16, the GPU's own kernels (torch's varlen attention, FlashAttention where it loads) and the
# gradient cache through them. -rs names what was skipped and why; the durations size the next session's stage.
stage exactness 170 python3 -m pytest -q -rs -p no:cacheprovider --durations=8 --device cuda tests/test_train.py \
    tests/test_fast_paths.py -k "cached_gradients_equal or chunk_size_does_not_change or checkpoint_restores_step \
    or replay_reuses or packed_vision_attention_matches or attention_kernels_give"
stage train_throughput 405 python3 benchmarks/train_throughput.py --real-arch --steps 3 --chunks 16,64 \
    --json "$OUT/train_throughput.json"
stage encode_throughput 475 python3 benchmarks/encode_throughput.py --real-arch --repeats 3
# The peak of a training step for two record kinds at two chunk sizes each, next to the CPU estimate of
# configs/chunk_sizes.yaml (predicted vs measured), and the table made from the measurement ($OUT/chunk_sizes.yaml):
# copy it over configs/chunk_sizes.yaml.
stage chunk_memory 540 python3 benchmarks/chunk_memory.py --device cuda --kinds image,video --chunks 4,16 \
    --estimate configs/chunk_sizes.yaml --table "$OUT/chunk_sizes.yaml" --json "$OUT/chunk_memory.json"
echo "done after $((SECONDS - started)) s" | tee -a "$OUT/session.txt"
