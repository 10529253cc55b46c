#!/usr/bin/env bash
# The pinned packages (requirements.txt) that a GPU machine with its own PyTorch 2.11+ (Python 3.12) lacks or has
# in another version, as wheels in .whl/ for benchmarks/gpu_session.sh. Its huggingface_hub (>= 1.31) and
# tokenizers (0.23.x) satisfy transformers 5.24; PyAV is needed because model.py decodes video. faiss-cpu (19 MB) would
# take the carry past its 64 MiB: gpu_session.sh stands a module in for it (nothing there searches).
set -euo pipefail
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==5.24.0 peft==0.21.2 av==18.1.0
du -sh .whl
