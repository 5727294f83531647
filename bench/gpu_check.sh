#!/usr/bin/env bash
# The GPU checks of issue 9 as one prepared script, for a session that is lent a CUDA machine (which has torch,
# transformers, peft, pandas and scikit-learn, none of our other pins, and no network).
#
#   bash bench/gpu_check.sh prepare     # here: the tokenizer and the small pure-Python wheels into .cache/gpu-carry
#   bash bench/gpu_check.sh run         # there, with carry [".cache/gpu-carry"]: gpu tests + bench_gpu, logs in $OUT
#
# Checked on this CPU in a venv holding only torch, transformers, peft, pandas, scikit-learn and pytest plus these
# wheels (`PRIOR_LAB_TEST_DEVICE=cpu`): 11 passed, 1 skipped (int8: no bitsandbytes), in 19 s.
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
    # diskcache: the caches; mathematics-dataset (+ absl-py, six; sympy comes with torch): precompute --quick
    .venv/bin/python -m pip download --quiet --no-deps -d "$CARRY/wheels" \
      diskcache==5.6.3 mathematics-dataset==1.0.1 absl-py==2.3.1 six==1.17.0
    du -sh "$CARRY"
    ;;
  run)
    OUT=${OUT:-gpu-check-out}
    mkdir -p "$OUT"
    python -m pip install --quiet --no-index --no-deps --target "$CARRY/site" "$CARRY"/wheels/*.whl
    export PYTHONPATH="$PWD/$CARRY/site:$PWD" PRIOR_LAB_TOKENIZER="$PWD/$CARRY/tokenizer"
    (nvidia-smi --query-gpu=name,memory.total --format=csv || echo "no nvidia-smi") | tee "$OUT/device.txt"
    python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
      | tee -a "$OUT/device.txt"
    python -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt" || true
    python bench/bench_gpu.py 2>&1 | tee "$OUT/bench-gpu.txt"
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
