"""bench/tf_vs_flat.py runs where prefect, dask and pydantic are not installed (the GPU box)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).parents[2]


def test_imports_without_prefect_dask_or_pydantic():
    blocked = ("prefect", "dask", "distributed", "pydantic", "pydantic_core")
    code = (f"import sys, runpy\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
            "runpy.run_path('bench/tf_vs_flat.py', run_name='check')\n"
            f"assert not [m for m in sys.modules if m.split('.')[0] in {blocked!r} and sys.modules[m] is not None]\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_trajectory_figure_has_a_column_per_level_and_one_for_flat(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.tf_vs_flat import trajectory_figure

    staged = np.zeros((3, 4, 20, 20, 3), np.uint8)
    flat = np.full((3, 1, 20, 20, 3), 200, np.uint8)
    trajectory_figure(tmp_path / "grid.png", staged, flat, rows=2)
    image = np.asarray(Image.open(tmp_path / "grid.png"))
    assert image.shape == (14 + 2 * 22 + 2, 5 * 22 + 2, 3)
    assert (image[14 + 2:14 + 22, 4 * 22 + 2:5 * 22] == 200).all()   # the flat final is the last column
