"""Paths that come from outside (CLI arguments, dashboard query strings) must stay inside the root.

`inside_root(root, path)` resolves both (symlinks included) and returns the resolved path, or raises
`OutsideRoot` when it would escape: `..` segments, absolute paths elsewhere, or a symlink that
points out of the root all count as escaping.
"""
from __future__ import annotations

import os
from pathlib import Path


class OutsideRoot(ValueError):
    pass


def inside_root(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path` (relative to `root`, or absolute) resolved, if it lies inside `root`; else OutsideRoot."""
    text = os.fspath(path)
    if "\x00" in text:
        raise OutsideRoot(f"{text!r}: NUL byte in path")
    base = Path(root).resolve()
    candidate = Path(text)
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if resolved != base and base not in resolved.parents:
        raise OutsideRoot(f"{text!r} resolves to {resolved}, outside the root {base}")
    return resolved


def is_inside_root(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    try:
        inside_root(root, path)
    except OutsideRoot:
        return False
    return True
