"""The dashboard server freezes the objects alive after new imports (short full garbage collections), and only then."""
import gc
import sys
import types

from dashboards import gc_freeze


def test_freezes_after_new_imports_only(monkeypatch):
    calls = []
    real_freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (calls.append(1), real_freeze())[1])
    monkeypatch.setattr(gc_freeze, "_modules_at_last_freeze", 0)
    try:
        gc_freeze.freeze_after_new_imports()
        frozen = gc.get_freeze_count()
        assert len(calls) == 1 and frozen > 0
        kept = [[] for _ in range(1000)]   # new objects, no new module: nothing more is frozen
        gc_freeze.freeze_after_new_imports()
        # Counted by calls: another thread of the test process may free a frozen object meanwhile,
        # which lowers the freeze count without any freezing.
        assert len(calls) == 1
        monkeypatch.setitem(sys.modules, "tf_test_new_module", types.ModuleType("tf_test_new_module"))
        gc_freeze.freeze_after_new_imports()
        assert len(calls) == 2
        assert gc.get_freeze_count() >= frozen + len(kept) // 2   # the new lists are in the frozen generation
    finally:
        gc.unfreeze()   # leave the test process as it was
