#!/usr/bin/env bash
# Issue 11's GPU measurements in one device call (one H200), written to $OUT (3 results pairs).
#
# Carry (the device image has torch but not these): .whl/ with the cp312 wheels of flwr 1.41,
# opacus, dp-accounting, cryptography (+ cffi, pycparser), tomli_w and Flower's runtime
# dependencies, .whl/ray312.tar.xz (a stripped Ray), and .data/fmnist (Fashion-MNIST; the
# training images as .xz). Run from the repository root:
#   bash benchmarks/device/issue11_h200.sh
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
[ -f .whl/ray312.tar.xz ] && tar xJf .whl/ray312.tar.xz -C /tmp/site
if [ -f .data/fmnist/train-images-idx3-ubyte.xz ] && [ ! -f .data/fmnist/train-images-idx3-ubyte.gz ]; then
  (cd .data/fmnist && xz -dc train-images-idx3-ubyte.xz | gzip -1 > train-images-idx3-ubyte.gz)
fi
export PYTHONPATH=/tmp/site:$PWD CONFIDE_FASHION_MNIST_DIR=$PWD/.data/fmnist PYTHONUNBUFFERED=1 \
  FLWR_TELEMETRY_ENABLED=0 RAY_TMPDIR=/tmp/ray FLWR_HOME=/tmp/flwr
S=benchmarks/simulation_speed.py
# 1. LeNet 1000x60: sequential, vectorized, bf16 + graphs, bf16 + compile and Flower side by side
python3 $S --device cuda --clients 1000 --rounds 3 --workloads lenet --compile --no-conv-table \
  --executors 'sequential,vectorized,vectorized bf16 + CUDA graphs,vectorized bf16 + torch.compile,flower' \
  --out "$OUT/simulation_speed-h200-flower-lenet1000"
# 2. FEMNIST CNN 256x224: convolution lowering chosen per layer (auto), plus the conv table
python3 $S --device cuda --rounds 3 --workloads femnist --compile \
  --executors 'vectorized bf16 + CUDA graphs,vectorized bf16 + torch.compile' \
  --out "$OUT/simulation_speed-h200-femnist"
# 3. LeNet at 16,000 clients
python3 $S --device cuda --clients 16000 --rounds 3 --workloads lenet --no-conv-table \
  --executors 'vectorized,vectorized bf16 + CUDA graphs' --out "$OUT/simulation_speed-h200-lenet16000"
