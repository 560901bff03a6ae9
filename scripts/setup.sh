#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system packages FFCV builds against, a virtualenv in
# .venv, and gdnsq with its pinned stack. A second run only checks and returns.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libopencv-dev libturbojpeg0-dev pkg-config)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing ${missing[*]} (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# Reinstall only when the dependency list changed.
stamp=.venv/.gdnsq-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv (a few minutes on a fresh machine)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  # FFCV builds from source against the venv's numpy (no build isolation, so no second numpy download).
  .venv/bin/python -m pip install -q "numpy>=2"
  .venv/bin/python -m pip install -q --no-build-isolation -e ".[dev]"
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import gdnsq, torch, torchvision, timm, ray, mlflow, ffcv" \
  || { echo "setup: the environment is incomplete; delete .venv and run again" >&2; exit 1; }
# The fused quantizer kernels compile once per machine (about a minute, cached under ~/.cache/torch_extensions);
# building them here keeps that minute out of the first training run. Without a compiler: a warning, the torch path.
.venv/bin/python -c "from gdnsq.quant import fused; fused.kernels()"
