#!/bin/bash
# Runs Kappa's benchmarks and the PyTorch peer one after the other, on the same machine, at
# 1 and at 2 threads (both sides set to the same count), and prints the ratio Kappa/PyTorch
# for every workload at each thread count.
#
#   bash Benchmarks/peers/compare.sh [sections...]
#     sections: matmul elementwise overhead vmf step, or one step: ref-resnet ref-micro ref-tiny ref-ibot-micro
#
# PyTorch comes from PyPI, in a virtual environment outside the repository:
#   python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch numpy
# PEER_PYTHON names another interpreter; THREAD_COUNTS the thread counts (default "1 2");
# ROUNDS how many times each section runs on each side, the two sides alternating (default 3):
# a shared virtual machine's speed drifts by 10–40% over minutes, so each ratio is the median
# of the per-round ratios, printed with their range.
# Without PyTorch the Kappa figures are printed alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PEER_PYTHON:-/tmp/peers/bin/python}
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(matmul elementwise overhead vmf step)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

swift build -c release --product KappaBench >/dev/null
echo "$(uname -m), $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
have_torch=0
if "$PYTHON" -c "import torch" 2>/dev/null; then
    have_torch=1
    echo "PyTorch $("$PYTHON" -c 'import torch; print(torch.__version__)') (eager, CPU)"
else
    echo "PyTorch not found at $PYTHON: Kappa's figures only (python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch numpy)"
fi
# Section by section, Kappa then PyTorch, so that the two sides of a ratio run minutes apart
# at most (a shared virtual machine's speed drifts over a longer run).
files=()
for t in ${THREAD_COUNTS:-1 2}; do
    export THREADS=$t OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t
    : > "$out/kappa$t.tsv"
    : > "$out/torch$t.tsv"
    for round in $(seq 1 "${ROUNDS:-3}"); do
        for section in "${sections[@]}"; do
            KAPPA_BENCH_RESULTS="$out/kappa$t.tsv" .build/release/KappaBench "$section" >> "$out/kappa$t.log"
            if [ $have_torch = 1 ]; then
                "$PYTHON" -W ignore Benchmarks/peers/pytorch_peer.py "$out/torch$t.tsv" "$section" >> "$out/torch$t.log"
            fi
        done
    done
    head -1 "$out/kappa$t.log"
    files+=("$t" "$out/kappa$t.tsv" "$out/torch$t.tsv")
done
grep -h "parameters" "$out"/kappa*.log "$out"/torch*.log 2>/dev/null | sort -u || true
python3 Benchmarks/peers/compare.py "${files[@]}"
