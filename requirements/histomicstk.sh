#!/usr/bin/env bash
# The one place that knows how to install HistomicsTK, the reference our Reinhard normalization is
# tested against. `pip install histomicstk` fails on Linux: its `large-image[sources]` needs GDAL. So we
# install it without dependencies, then the packages it needs at import time.
# Usage: bash requirements/histomicstk.sh [PYTHON]   (default: python3)
set -euo pipefail
PY="${1:-python3}"
"$PY" -m pip install --no-deps "histomicstk==1.4.0"
"$PY" -m pip install \
  large-image ctk-cli girder-client girder-slicer-cli-web shapely scikit-learn sqlalchemy matplotlib \
  imageio opencv-python-headless nimfa pyvips "dask[dataframe]<2024.11" "distributed<2024.11"
"$PY" -c "from histomicstk.preprocessing.color_normalization import reinhard" \
  || { echo "histomicstk failed to import" >&2; exit 1; }
