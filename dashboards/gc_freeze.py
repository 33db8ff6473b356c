"""Keep Python's full garbage collections short in the dashboard server.

The server holds about 350k long-lived objects once every page has been opened (Streamlit, pandas, sklearn,
torch and the run's models). A full collection walks all of them: 0.15-0.65 s on the 2-core machine, once
or twice per page opened, and it holds the GIL, so every session's websocket and image requests wait (the
page's script itself takes 0.02-0.1 s). gc.freeze() moves the objects alive at that moment into a permanent
generation that collections skip; later collections only walk what was created since.

Freezing happens after a script run that imported modules (a page's first visit imports what it needs): a
handful of times per server process. Unreachable cycles alive at such a moment are never collected; that
is a bounded amount, paid a few times, instead of a stall on every page.
"""
from __future__ import annotations

import gc
import sys

_modules_at_last_freeze = 0


def freeze_after_new_imports() -> None:
    """Freeze the objects alive now if modules were imported since the last freeze (cheap otherwise)."""
    global _modules_at_last_freeze
    if len(sys.modules) != _modules_at_last_freeze:
        gc.freeze()
        _modules_at_last_freeze = len(sys.modules)
