#!/usr/bin/env bash
# Create the virtual environment in which pipelines/benchmark.py runs its peer, WSInfer 0.6.
#
#   bash pipelines/setup_wsinfer_peer.sh [VENV]      # default /tmp/wsinfer-venv
#
# WSInfer is not a dependency of wsi-screen: it gets its own venv. To avoid a second torch download
# the venv reuses the project venv's packages (torch, timm, openslide, ...) through a .pth file; WSInfer
# 0.6 needs zarr 2 (its __init__ patches zarr.storage.KVStore) and a tiffslide that works with zarr 2,
# which are installed into the venv itself and so shadow the project's zarr 3 / tiffslide 3.
# Only PyPI is used; no model weights are downloaded (the benchmark hands WSInfer a local TorchScript
# model and a config JSON). `wsinfer run` itself cannot start offline (wsinfer.cli asks the Hugging Face
# hub for its model registry at import time), so pipelines/wsinfer_peer.py calls WSInfer's library
# functions the way `wsinfer run --config --model-path` does.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/tmp/wsinfer-venv}"
PROJECT_PY="${ROOT}/.venv/bin/python"
BASE_PY="$("${PROJECT_PY}" -c 'import sys; print(sys.base_prefix)')/bin/python3"
SITE="$("${PROJECT_PY}" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

"${BASE_PY}" -m venv "${VENV}"
VSITE="$("${VENV}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "${SITE}" > "${VSITE}/zz_wsi_screen_project.pth"
"${VENV}/bin/pip" install --quiet "wsinfer==0.6.*" "zarr<3" "tiffslide<2.5"
"${VENV}/bin/python" -c 'import wsinfer, wsinfer.modellib.run_inference, wsinfer.patchlib; print("WSInfer", wsinfer.__version__, "ready in '"${VENV}"'")'
