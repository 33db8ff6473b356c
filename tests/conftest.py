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
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
# Stage folders every tiny-config variant shares (sharing and mode pick only the generators and evaluation).
UPSTREAM = ("images-", "latents-", "teacher-", "decoder-", "judge-")
# A Prefect database migrated to this Prefect's schema, which tests copy into the fresh PREFECT_HOME of a
# server or `tf` they start: each would otherwise migrate an empty database first (~5 s on 2 cores).
_DB_TEMPLATE: tuple[subprocess.Popen, Path] | None = None


def pytest_sessionstart(session):
    """The whole suite (`make test`: no paths given) migrates the template database beside collection; chosen
    files or folders (`make check`) make it at the first test that wants it."""
    global _DB_TEMPLATE
    if session.config.args_source is pytest.Config.ArgsSource.TESTPATHS:
        _DB_TEMPLATE = _migrate(Path(tempfile.mkdtemp(prefix="tf-prefect-db-")))


def pytest_runtest_setup(item):
    if _DB_TEMPLATE is not None:
        _DB_TEMPLATE[0].wait()   # no test runs beside the migration (two cores)


def pytest_sessionfinish(session):
    if _DB_TEMPLATE is not None:
        _DB_TEMPLATE[0].wait()
        shutil.rmtree(_DB_TEMPLATE[1].parent, ignore_errors=True)


def _migrate(home: Path) -> tuple[subprocess.Popen, Path]:
    """`prefect server database upgrade` of an empty database in `home`, started; (its process, the file)."""
    env = {**os.environ, "PREFECT_HOME": str(home)}
    with open(home / "upgrade.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return process, home / "prefect.db"


@pytest.fixture(scope="session")
def prefect_db_template(tmp_path_factory) -> Path:
    """The migrated database file (made here when the session did not start it while collecting)."""
    process, path = _DB_TEMPLATE or _migrate(tmp_path_factory.mktemp("prefect-db"))
    assert process.wait() == 0, (path.parent / "upgrade.log").read_text()[-3000:]
    return path


@pytest.fixture
def migrated_prefect_home(prefect_db_template):
    """migrated_prefect_home(home): `home` made, holding a copy of the migrated database, for a PREFECT_HOME
    whose server starts without migrating. Returns `home`."""
    def make(home: Path) -> Path:
        home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(prefect_db_template, home / "prefect.db")
        return home

    return make


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
