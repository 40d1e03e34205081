#!/bin/bash
# Runs Kappa's benchmarks and the PyTorch peer one after the other, on the same machine with
# the same thread count, and prints the ratio Kappa/PyTorch for every workload.
#
#   bash Benchmarks/peers/compare.sh [sections...]     (sections: matmul elementwise overhead vmf step)
#
# PyTorch comes from PyPI, in a virtual environment outside the repository:
#   python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch
# PEER_PYTHON names another interpreter; THREADS sets the threads of both (default 2).
# Without PyTorch the Kappa figures are printed alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
export THREADS=${THREADS:-2}
export OPENBLAS_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
PYTHON=${PEER_PYTHON:-/tmp/peers/bin/python}
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(matmul elementwise overhead vmf step)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

swift build -c release --product KappaBench >/dev/null
echo "Kappa: $(uname -m), $(nproc) cores, $THREADS threads; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
KAPPA_BENCH_RESULTS="$out/kappa.tsv" .build/release/KappaBench "${sections[@]}" > "$out/kappa.log"
if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "PyTorch $("$PYTHON" -c 'import torch; print(torch.__version__)') (eager, CPU), $THREADS threads"
    "$PYTHON" Benchmarks/peers/pytorch_peer.py "$out/torch.tsv" "${sections[@]}"
else
    echo "PyTorch not found at $PYTHON: Kappa's figures only (python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch)"
    : > "$out/torch.tsv"
fi
python3 Benchmarks/peers/compare.py "$out/kappa.tsv" "$out/torch.tsv"
