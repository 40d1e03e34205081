#!/usr/bin/env bash
# Installs the system libraries Kappa links against (OpenBLAS, zlib, pkg-config)
# when they are missing. Debian/Ubuntu; needs root or sudo only when something must be installed.
set -euo pipefail

if pkg-config --exists openblas zlib 2>/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "Installing libopenblas-dev, zlib1g-dev and pkg-config..."
$SUDO apt-get update
$SUDO apt-get install -y libopenblas-dev zlib1g-dev pkg-config
