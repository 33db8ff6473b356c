"""tasks.stage.stage_task degrades to plain functions only where Prefect is not installed at all; a
Prefect that is there but does not import fails loudly (it would otherwise run stages without retries)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = "from tasks.stage import stage_task\n@stage_task('probe')\ndef work():\n    return 7\nprint(type(work).__name__, work.fn())\n"


def _run(tmp_path, prelude: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", prelude + PROBE], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "", "HOME": str(tmp_path)}, timeout=120)


def test_prefect_not_installed_gives_the_plain_function(tmp_path):
    done = _run(tmp_path, "import sys\nsys.modules['prefect'] = None   # as if not installed\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["function", "7"]


def test_a_prefect_that_fails_to_import_raises(tmp_path):
    """A `prefect` package whose own dependency is missing: ModuleNotFoundError, but not for prefect."""
    (tmp_path / "prefect").mkdir()
    (tmp_path / "prefect" / "__init__.py").write_text("import a_dependency_prefect_needs\n")
    done = _run(tmp_path, "")
    assert done.returncode != 0
    assert "ModuleNotFoundError: No module named 'a_dependency_prefect_needs'" in done.stderr


def test_a_prefect_without_what_the_stages_use_raises(tmp_path):
    """An older or partial Prefect (no prefect.cache_policies): an ImportError, never a silent fallback."""
    (tmp_path / "prefect").mkdir()
    (tmp_path / "prefect" / "__init__.py").write_text("def task(**options):\n    return lambda fn: fn\n")
    done = _run(tmp_path, "")
    assert done.returncode != 0 and "prefect.cache_policies" in done.stderr


def test_the_installed_prefect_gives_a_task(tmp_path):
    done = _run(tmp_path, "")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Task", "7"]
