#!/bin/bash
# Times this working tree's KappaBench against another revision's, the two running at the same
# time, one thread each on its own core, so that both see the same machine. On a shared virtual
# machine whose speed drifts by 20–40% within minutes, two runs one after the other can differ
# by more than the change being measured; two runs side by side share the drift. Both compete
# for the shared cache and memory, so their times are slower than a run alone: the ratio is
# what this script is for (compare.sh gives the figures against PyTorch).
#
#   bash Benchmarks/ab.sh REV [sections...]     sections as KappaBench's (default: ref-tiny)
#
# ROUNDS (default 4) rounds; prints each side's median seconds per workload and the median of
# the per-round ratios (this tree / REV) with their range. Needs at least two cores. How far to
# trust it, measured on the development machine: the same binary on both cores agrees within
# 1% (ref-tiny); two builds' rounds scatter by about ±5% around their median, so a change of a
# few percent needs several runs. Short workloads scatter far more (ref-micro, a second per
# run: 0.72–1.33 over four rounds of two builds that alone differ by 2%), the two runs' phases
# no longer overlapping: use it on steps as long as ref-tiny's.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash Benchmarks/ab.sh REV [sections...]" >&2; exit 2; }
rev=$1
shift
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(ref-tiny)
[ "$(nproc)" -ge 2 ] || { echo "ab.sh: needs two cores, this machine has $(nproc)" >&2; exit 2; }
work=$(mktemp -d)
trap 'git worktree remove --force "$work/tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach "$work/tree" "$rev" >/dev/null 2>&1 || { echo "ab.sh: no revision '$rev'" >&2; exit 2; }
echo "building $rev and this tree (release)"
(cd "$work/tree" && swift build -c release --product KappaBench >/dev/null)
swift build -c release --product KappaBench >/dev/null
cp "$work/tree/.build/release/KappaBench" "$work/base"
cp .build/release/KappaBench "$work/this"
export THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
# Each side on its own core (taskset), the cores swapped from one round to the next, so that a
# difference between the two cores' neighbours cancels in the median.
for round in $(seq 1 "${ROUNDS:-4}"); do
    cores=(0 1)
    [ $((round % 2)) = 0 ] && cores=(1 0)
    for section in "${sections[@]}"; do
        KAPPA_BENCH_RESULTS="$work/base.tsv" taskset -c "${cores[0]}" "$work/base" "$section" >/dev/null &
        KAPPA_BENCH_RESULTS="$work/this.tsv" taskset -c "${cores[1]}" "$work/this" "$section" >/dev/null
        wait
    done
done
# The result files are read as compare.py (the comparison with PyTorch) reads them.
PYTHONPATH=Benchmarks/peers python3 - "$work/base.tsv" "$work/this.tsv" "$rev" <<'EOF'
import statistics, sys
from compare import read
base, this, rev = read(sys.argv[1]), read(sys.argv[2]), sys.argv[3]
print(f"| workload (side by side, 1 thread each) | {rev} | this tree | ratio |")
print("|---|---:|---:|---:|")
for name, b in base.items():
    t = this.get(name)
    if not t:
        continue
    rounds = [x / y for x, y in zip(t, b)]
    print(f"| {name} | {statistics.median(b):.4g} | {statistics.median(t):.4g} | "
          f"**{statistics.median(rounds):.3f}** ({min(rounds):.3f}–{max(rounds):.3f}) |")
EOF
