"""The metric registry loads every entry module or fails, naming the module: never a registry (and an
evaluate key, and a run) quietly short of the metrics it was written with."""
import sys

import pytest

import models.evaluation.entries as entries
from models.evaluation import registry


@pytest.fixture
def broken_entry(tmp_path, monkeypatch):
    """A module among the entries whose import fails, as a missing dependency or a bug would."""
    (tmp_path / "zz_broken.py").write_text("import numpy\nraise RuntimeError('a bug at import')\n")
    monkeypatch.setattr(entries, "__path__", [*entries.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_loaded", False)
    yield "models.evaluation.entries.zz_broken"
    sys.modules.pop("models.evaluation.entries.zz_broken", None)


def test_a_failing_entry_import_fails_every_call_naming_the_module(broken_entry):
    for _ in range(2):   # the second call too: nothing is marked loaded after a failure
        with pytest.raises(registry.EntryImportError, match=r"models\.evaluation\.entries\.zz_broken failed to "
                                                            r"import \(RuntimeError: a bug at import\)"):
            registry.signature()
    assert registry._loaded is False


def test_the_registry_loads_once_every_entry_imported(monkeypatch):
    monkeypatch.setattr(registry, "_loaded", False)
    names = {metric.name for metric in registry.registered()}
    assert registry._loaded is True
    assert {"fid", "fd_level", "fd_scenes", "nesting", "decoder"} <= names, names   # one per entry module
