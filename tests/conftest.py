"""Test-wide settings: Prefect runs ephemerally with its state inside the test session."""
import os
import tempfile

# Set before any Prefect import so the ephemeral API and its database live in a temp folder.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tf-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A fresh database is migrated on the first ephemeral start; Prefect's 20 s default fails on a slow CI box.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
# Stage folders every tiny-config variant shares (sharing and mode pick only the generators and evaluation).
UPSTREAM = ("images-", "latents-", "teacher-", "decoder-", "judge-")


@pytest.fixture(scope="session")
def tiny_staged_run(tmp_path_factory) -> tuple[Path, dict]:
    """(root, the flow's result) of configs/tiny.yaml's pipeline, run once per session (run id "first").
    Never written to: tests that extend a root copy it first (`copy_root`); stage folders are found by
    name and the stores hold no absolute paths they read back, so a copy is whole."""
    from flows.stages import pipeline_flow
    from storage.config import load_config

    root = tmp_path_factory.mktemp("tiny-staged")
    return root, pipeline_flow(config=load_config(TINY), root=str(root), run_id="first")


@pytest.fixture(scope="session")
def tiny_staged_root(tiny_staged_run) -> Path:
    return tiny_staged_run[0]


@pytest.fixture(scope="session")
def copy_root(tiny_staged_root):
    """copy_root(dst, upstream_only=False): the session's tiny root copied to dst (only the stages every
    variant shares, when upstream_only), so a test extends it without computing them again."""
    def copy(dst: Path, upstream_only: bool = False) -> Path:
        def skip(folder: str, names: list[str]) -> list[str]:
            if not upstream_only or Path(folder) != tiny_staged_root:
                return []
            return [n for n in names if not n.startswith(UPSTREAM)]

        shutil.copytree(tiny_staged_root, dst, ignore=skip)
        return dst

    return copy
