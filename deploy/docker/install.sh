#!/usr/bin/env sh
# Installs servemesh from this source tree into a new virtual environment and checks it runs.
# The image's install step (deploy/docker/Dockerfile) and what CI runs in a fresh venv
# (tests/deploy/test_install.py) are this one script.
#
#   deploy/docker/install.sh VENV [cpu|gpu] [EXTRAS]
#
# cpu: onnxruntime (CPU); EXTRAS, e.g. "torch", are pinned to CPU builds by constraints/cpu.txt.
# gpu: the `gpu` extra, with onnxruntime-gpu in place of onnxruntime (both install the same
#      `onnxruntime` package directory, so the CPU build is removed first and the GPU build written
#      over it). PYTHON picks the interpreter (default python3); pip's cache is used unless
#      PIP_NO_CACHE_DIR is set (the image sets it).
set -eu

venv=${1:?usage: install.sh VENV [cpu|gpu] [EXTRAS]}
variant=${2:-cpu}
extras=${3:-}
src=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}

case $variant in
  cpu) want=$extras ;;
  gpu) want=gpu${extras:+,$extras} ;;
  *) echo "install.sh: variant is cpu or gpu, not $variant" >&2; exit 2 ;;
esac

"$python" -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check"
$pip install --quiet "$src${want:+[$want]}" -c "$src/constraints/cpu.txt"

if [ "$variant" = gpu ]; then
  ort=$("$venv/bin/python" -c "from importlib.metadata import version; print(version('onnxruntime-gpu'))")
  $pip uninstall --quiet --yes onnxruntime
  $pip install --quiet --force-reinstall --no-deps "onnxruntime-gpu==$ort"
else
  $pip check  # (the gpu variant leaves servemesh's `onnxruntime` requirement met by onnxruntime-gpu)
fi

# The checks: the command runs, and onnxruntime offers the providers this variant is for.
"$venv/bin/servemesh" --version
"$venv/bin/python" - "$variant" <<'PY'
import sys

import onnxruntime

providers = onnxruntime.get_available_providers()
wanted = "CUDAExecutionProvider" if sys.argv[1] == "gpu" else "CPUExecutionProvider"
if wanted not in providers:
    sys.exit(f"install.sh: onnxruntime {onnxruntime.__version__} offers {providers}, not {wanted}")
print(f"onnxruntime {onnxruntime.__version__}: {', '.join(providers)}")
PY
