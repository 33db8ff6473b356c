#!/usr/bin/env bash
# Install the wheels scripts/gpu_wheels.py downloaded (.whl/) on a GPU machine with no package index,
# into the Python that holds its CUDA torch (`python3 -m pip`: the `pip` on PATH may be another Python's),
# then this repository itself without dependencies, so pyproject's CPU torch pin asks for nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
"$PY" -m pip install --quiet --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
"$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps -r "$WHEELS/no-deps.txt"
"$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
# GPU extras gpu_wheels.py put in extra/: nvImageCodec for encoder.gpu_decoder (--nvimgcodec-cuda), py-spy (--profiler)
if compgen -G "$WHEELS/extra/*.whl" > /dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/extra/*.whl
  if compgen -G "$WHEELS/extra/nvidia_nvimgcodec*.whl" > /dev/null; then
    "$PY" scripts/nvjpeg_link.py \
      || echo "nvImageCodec has no nvJPEG: encoder.gpu_decoder=nvimgcodec will refuse to start"
  fi
fi
"$PY" - <<'PY'
import importlib.metadata as m
print("installed:", ", ".join(f"{n} {m.version(n)}" for n in
      ("torch", "torchvision", "timm", "zarr", "prefect", "dask", "distributed", "xarray", "pandas", "numpy",
       "pydantic", "torch-fidelity", "scikit-learn")))
PY
