"""One tiny-pipeline root for every dashboard test: run "first" computed everything (the session's
tiny root, copied), "second" reuses it."""
from pathlib import Path

import pytest

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory, copy_root) -> Path:
    from flows.stages import pipeline_flow
    from storage.config import load_config

    root = copy_root(tmp_path_factory.mktemp("dashboard") / "root")
    cfg = load_config(CONFIG)
    pipeline_flow(config=cfg, root=str(root), run_id="second")   # everything reused: no metric rows of its own
    return root
