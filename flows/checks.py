"""What every run is checked for before any stage starts, the same from `tf <stage>` and in a deployment
run: a root that can hold the stores, and a config that would not fail later (storage.config.preflight,
and a weights file that does not fit the configured encoder: tasks.encode.encoder_load.weights_misfit)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from storage.config import TFConfig, load_config, preflight

REPO = Path(__file__).resolve().parents[1]


class RootUnusable(ValueError):
    """The store root is a file, or cannot be written or made."""


def root_problem(root: Path) -> str | None:
    """Why `root` cannot hold the stores, None when it can: it must be a folder, or one that can be made,
    and writable, found by writing (and removing) a probe file there, or in its nearest existing parent
    when it does not exist yet (nothing is created). Permission bits alone would not tell: root ignores
    them, a read-only file system does not."""
    path = Path(os.path.abspath(Path(root).expanduser()))
    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    nearest = path
    while not nearest.is_dir():
        if nearest.exists() or nearest.is_symlink():
            return f"cannot be created: {nearest} is not a directory"
        nearest = nearest.parent
    try:
        handle, probe = tempfile.mkstemp(dir=nearest, prefix=".tf-write-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        if nearest == path:
            return f"not writable ({reason})"
        return f"cannot be created: {nearest} is not writable ({reason})"
    return None


def check_root(root: str | os.PathLike) -> None:
    if "://" in str(root):   # an fsspec URL: its file system says what it refuses, when it is written
        return
    problem = root_problem(Path(root))
    if problem:
        raise RootUnusable(f"root {root}: {problem}")


def config_file(config_path: str | os.PathLike) -> Path:
    """A deployment's config file: absolute, or relative to this repository (where workers run the code)."""
    path = Path(config_path).expanduser()
    return path if path.is_absolute() else REPO / path


def checked_config(command: str, root: str | os.PathLike, config: TFConfig, config_path: str | None = None,
                   levels: list[int] | None = None) -> TFConfig:
    """The config a run of `command` uses, refused (ValueError naming the field or file) when the root
    cannot hold the stores or the config would fail after the run started. `config_path`, when given,
    replaces the inline `config`, which must then be left at its defaults: a run given both would
    otherwise silently ignore one of them."""
    check_root(root)
    if config_path:
        if config != TFConfig():
            raise ValueError(f"give config_path or an inline config, not both (config_path is {config_path}; "
                             f"clear it to run the inline config)")
        try:
            config = load_config(config_file(config_path))
        except (ValueError, OSError) as error:   # pydantic's errors are ValueErrors that name the field
            raise ValueError(f"config_path {config_path}: {error}") from None
    preflight(config, command, levels)
    if command in ("pipeline", "encode", "evaluate"):   # the stages that build the encoder
        from tasks.encode.encoder_load import weights_misfit

        problem = weights_misfit(config.encoder.model, config.source.image_size, config.encoder.weights)
        if problem:
            raise ValueError(problem)
    return config
