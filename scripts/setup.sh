#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system packages FFCV builds against, a virtualenv in
# .venv, and gdnsq with its pinned stack. A second run only checks and returns.
#
# On a fresh machine three slow things overlap: apt (only FFCV's build needs its packages) runs while pip
# fetches torch, and the fused quantizer kernels compile (one core, ~40 s) while pip installs the rest.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libopencv-dev libturbojpeg0-dev pkg-config)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
apt_pid=""
apt_log=$(mktemp)
trap 'rm -f "$apt_log"' EXIT
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing ${missing[*]} (apt, in the background)"
  ( $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" ) \
    >"$apt_log" 2>&1 &
  apt_pid=$!
fi
wait_for_apt() {
  [ -z "$apt_pid" ] && return 0
  wait "$apt_pid" || { echo "setup: apt-get failed:" >&2; cat "$apt_log" >&2; exit 1; }
  apt_pid=""
}

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# Reinstall only when the dependency list changed.
stamp=.venv/.gdnsq-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
kernel_pid=""
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv (a few minutes on a fresh machine)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  # First what the kernels' build needs, at pyproject.toml's pins (FFCV also builds against this numpy).
  mapfile -t first < <(.venv/bin/python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.match(r"(torch|numpy|ninja)\b", d)))
PY
)
  .venv/bin/python -m pip install -q "${first[@]}"
  # The kernels compile from the source file alone (fused.py needs only torch), while pip goes on.
  .venv/bin/python gdnsq/quant/fused.py >/dev/null 2>&1 &
  kernel_pid=$!
  wait_for_apt
  # FFCV builds from source against the venv's numpy (no build isolation, so no second numpy download).
  .venv/bin/python -m pip install -q --no-build-isolation -e ".[dev,deploy]"
  echo "$want" > "$stamp"
fi
wait_for_apt
[ -n "$kernel_pid" ] && { wait "$kernel_pid" || true; }  # a failed build is reported (once) just below
.venv/bin/python -c "import gdnsq, torch, torchvision, timm, ray, mlflow, ffcv" \
  || { echo "setup: the environment is incomplete; delete .venv and run again" >&2; exit 1; }
# The fused quantizer kernels compile once per machine (cached under ~/.cache/torch_extensions); building them
# here keeps that out of the first training run. Without a compiler: a warning, the torch path.
.venv/bin/python -c "from gdnsq.quant import fused; fused.kernels()"
