#!/usr/bin/env bash
# Creates .venv with the exact pinned stack. Idempotent: reruns only reinstall what differs.
#
# mmcv 2.1.0 (the newest release mmdet 3.3.0 accepts) ships no wheel for torch 2.14, so we build it
# from the PyPI sdist with compiled ops and keep the wheel in $MMCV_WHEEL_CACHE: only the first
# set-up on a machine pays for the build (7-35 minutes on 2 cores, CPU ops).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
MMCV_VERSION=2.1.0
MMCV_WHEEL_CACHE=${MMCV_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmdet-determined/wheels}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
venv_python="$(cd "$VENV" && pwd)/bin/python"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# torch needs setuptools>=77.0.3; mmcv's build and mmengine's runtime need pkg_resources (<82).
"${PIP[@]}" install -q "setuptools>=77.0.3,<82" wheel
"${PIP[@]}" install -q -r requirements.lock

torch_tag=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
if [ "${FORCE_CUDA:-}" = 1 ] || { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && command -v nvcc >/dev/null; }; then
  FORCE_CUDA=1
  variant=cuda$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')-${TORCH_CUDA_ARCH_LIST:-auto}
  variant=${variant// /_}
else
  FORCE_CUDA=0 # nvcc may exist without a GPU: build CPU ops explicitly.
  variant=cpu
fi
py_tag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel_dir="$MMCV_WHEEL_CACHE/mmcv-$MMCV_VERSION-$py_tag-torch$torch_tag-$variant"

if ! "$VENV/bin/python" - "$MMCV_VERSION" "$FORCE_CUDA" <<'PY' 2>/dev/null; then
import sys, importlib.metadata as md
assert md.version("mmcv") == sys.argv[1]
from mmcv.ops import get_compiling_cuda_version  # fails without compiled ops
# CUDA ops exactly when asked for: a CPU-only build on a GPU machine gets rebuilt.
assert (get_compiling_cuda_version() != "not available") == (sys.argv[2] == "1")
PY
  if ! ls "$wheel_dir"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
    echo "Building mmcv $MMCV_VERSION with ops ($variant); the wheel is cached in $wheel_dir"
    build=$(mktemp -d)
    "${PIP[@]}" download -q --no-deps --no-binary :all: -d "$build" "mmcv==$MMCV_VERSION"
    tar -xzf "$build"/mmcv-"$MMCV_VERSION".tar.gz -C "$build"
    # torch 2.14's headers need C++20; mmcv 2.1.0's setup.py asks for C++14/17.
    sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$build/mmcv-$MMCV_VERSION/setup.py"
    mkdir -p "$wheel_dir"
    (cd "$build/mmcv-$MMCV_VERSION" &&
      MMCV_WITH_OPS=1 FORCE_CUDA=$FORCE_CUDA MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "$venv_python" -m pip wheel -q --no-deps --no-build-isolation -w "$wheel_dir" .)
    rm -rf "$build"
  fi
  "${PIP[@]}" install -q --no-deps --force-reinstall "$wheel_dir"/mmcv-"$MMCV_VERSION"-*.whl
fi

# The serving page's test drives Debian's chromium through playwright (which cannot download
# browsers here): installed when missing and we are root, as on CI; otherwise say how.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing chromium (Debian) for tests/test_serve.py"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is missing: tests/test_serve.py's page test needs it (sudo apt-get install chromium)"
  fi
fi

"$VENV/bin/python" -m utils.base.versions
