#!/usr/bin/env bash
# Installs the system libraries Kappa links against (OpenBLAS, zlib, pkg-config) and Open MPI
# (for data-parallel training with mpirun) when they are missing. Debian/Ubuntu; needs root or
# sudo only when something must be installed.
set -euo pipefail

if pkg-config --exists openblas zlib ompi-c 2>/dev/null && command -v mpirun >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "Installing libopenblas-dev, zlib1g-dev, pkg-config and Open MPI (libopenmpi-dev, openmpi-bin)..."
$SUDO apt-get update
$SUDO apt-get install -y libopenblas-dev zlib1g-dev pkg-config libopenmpi-dev openmpi-bin
