#!/bin/bash
# benchmarks/NOTES.md's GPU protocol as one command for a lent GPU (about 9 minutes), the most wanted
# figure first: the default run on the GPU, the GPU-only tests, then ViT-B/16 ours against timm.
#
#   bash benchmarks/gpu_protocol.sh          # results under $OUT (default /tmp/gpu_out)
#
# A bare GPU machine lacks two pure-Python wheels and the Fashion-MNIST files; copy them first into
# .gpu/ (ignored by git): .gpu/whl/{webdataset,braceexpand}-*.whl and .gpu/fm/*-ubyte.gz.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .gpu/whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -d .gpu/fm ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    mkdir -p /usr/share/datasets/fashion-mnist && cp .gpu/fm/*.gz /usr/share/datasets/fashion-mnist/
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

echo "== 1. python3 main.py (params.json) on the GPU"
rm -rf /tmp/default_run
start=$(date +%s)
timeout 170 python3 main.py --set output.dir=/tmp/default_run 2>&1 | tr '\r' '\n' | grep -v "it/s" > "$OUT/default.log"
echo "exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
tail -4 "$OUT/default.log"
cp /tmp/default_run/metrics.jsonl "$OUT/default_metrics.jsonl" 2>/dev/null

echo "== 2. the GPU-only tests"
VIT_TEST_GPU=1 timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1
echo "exit $?"; tail -6 "$OUT/test_cuda.log"

echo "== 3. ViT-B/16 ours against timm, eager, then compiled"
timeout 70 python3 benchmarks/bench_models.py --models B/16 --impls ours,timm --modes eager --out "$OUT/b16_eager.json" 2>&1 | tail -6
timeout 150 python3 benchmarks/bench_models.py --models B/16 --impls ours,timm --modes compile --out "$OUT/b16_compile.json" 2>&1 | tail -6
