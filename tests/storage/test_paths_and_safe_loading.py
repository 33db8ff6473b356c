"""Paths from outside stay inside the root; nothing in the code unpickles what a store holds."""
import os
import re
from pathlib import Path

import pytest

from storage.paths import OutsideRoot, inside_root, is_inside_root

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("storage", "tasks", "flows", "models", "dashboards", "bench")


def test_paths_inside_the_root_resolve(tmp_path):
    (tmp_path / "evaluate-abc").mkdir()
    assert inside_root(tmp_path, "evaluate-abc/grid.png") == (tmp_path / "evaluate-abc" / "grid.png").resolve()
    assert inside_root(tmp_path, tmp_path / "tables") == (tmp_path / "tables").resolve()
    assert inside_root(tmp_path, ".") == tmp_path.resolve()
    assert inside_root(tmp_path, "evaluate-abc/../tables") == (tmp_path / "tables").resolve()


@pytest.mark.parametrize("escape", ["..", "../etc/passwd", "evaluate-abc/../../x", "/etc/passwd", "a/\x00b"])
def test_paths_that_escape_the_root_are_refused(tmp_path, escape):
    (tmp_path / "root" / "evaluate-abc").mkdir(parents=True)
    with pytest.raises(OutsideRoot):
        inside_root(tmp_path / "root", escape)
    assert not is_inside_root(tmp_path / "root", escape)


def test_a_symlink_pointing_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(OutsideRoot, match="outside the root"):
        inside_root(root, "link/key.pem")
    # A sibling whose name merely starts like the root is outside too.
    (tmp_path / "root2").mkdir()
    assert not is_inside_root(root, tmp_path / "root2")


def _python_files():
    for folder in CODE_DIRS:
        yield from (REPO / folder).rglob("*.py")


def test_no_pickle_loads_in_the_code():
    """torch.load only with weights_only=True; no pickle/joblib/np.load(allow_pickle=True) at all."""
    offenders = []
    for path in _python_files():
        text = path.read_text(errors="replace")
        for match in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in match.group(0):
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0)[:80]}")
        for pattern in (r"pickle\.loads?\(", r"joblib\.load\(", r"allow_pickle\s*=\s*True", r"torch\.load\s*$",
                        r"pd\.read_pickle\(", r"dill\.loads?\("):
            for line in text.splitlines():
                if re.search(pattern, line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.relative_to(REPO)}: {line.strip()[:80]}")
    assert not offenders, "\n".join(offenders)
