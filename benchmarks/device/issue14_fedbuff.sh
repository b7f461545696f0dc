#!/usr/bin/env bash
# Issue 14's acceptance 1 on one GPU (FedAvg vs FedBuff in virtual time), results copied to $OUT.
#
# Carry (the device image has torch but not these): .whl/ with the cp312 wheels of opacus,
# dp-accounting (+ absl-py, attrs, dm-tree, mpmath), cryptography (+ cffi, pycparser) and
# tomli_w, and .data/fmnist (Fashion-MNIST; the training images as .xz). From the repo root:
#   bash benchmarks/device/issue14_fedbuff.sh [extra fedbuff_vs_fedavg.py arguments]
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
if [ -f .data/fmnist/train-images-idx3-ubyte.xz ] && [ ! -f .data/fmnist/train-images-idx3-ubyte.gz ]; then
  (cd .data/fmnist && xz -dc train-images-idx3-ubyte.xz | gzip -1 > train-images-idx3-ubyte.gz)
fi
export PYTHONPATH=/tmp/site:$PWD CONFIDE_FASHION_MNIST_DIR=$PWD/.data/fmnist PYTHONUNBUFFERED=1
python3 benchmarks/fedbuff_vs_fedavg.py --device cuda --executor vectorized "$@" \
  2>&1 | grep -v "^INFO\|it/s\]" | tail -40
cp benchmarks/results/fedbuff_vs_fedavg* "$OUT"/
