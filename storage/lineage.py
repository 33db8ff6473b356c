"""What a stage folder was built from (DESIGN §5), so that no store is ever resumed, reused or read over
an upstream that changed under it.

Every stage folder holds `_LINEAGE.json`, written before its first output:
  identity    what a downstream store records of it: its folder (`store`) and `key`, a `build` id drawn
              when the folder was started (a forced or otherwise new build draws a new one), and the
              identity of its rows: `rows` (a digest of the ordered sample ids), `count` and the source
              listing's `fingerprint` (a derived store has its upstream's rows: latents are the image
              store's samples, in its order)
  built_from  the identities of the upstream stores it read, as they were when it started

A store fits its upstream when each recorded identity still holds: the same folder must be the same
build (a rebuilt one, forced or not, makes everything built from it stale), and another folder (the
direct path's latents hang off the listing, not off one pixel sample) must hold the same rows.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from storage.files import atomic_write_json

LINEAGE = "_LINEAGE.json"
KINDS = {"images": "image store", "latents": "latent store", "teacher": "teacher store", "decoder": "decoder",
         "generator": "generator", "judge": "scenes judge", "evaluate": "evaluation"}


def kind(path: str | Path) -> str:
    """`image store images-<key>`: a stage folder as a message names it."""
    name = Path(path).name
    return f"{KINDS.get(name.split('-')[0], 'stage output')} {name}"


def rows_identity(ids: Sequence[str], fingerprint: str | None) -> dict:
    """The identity of a store's rows: the digest of its ordered sample ids, their count and the listing's
    fingerprint (which also sees each file's size and mtime)."""
    digest = hashlib.sha256("\0".join(map(str, ids)).encode()).hexdigest()[:24]   # NUL: in no file name
    return {"rows": digest, "count": len(ids), "fingerprint": fingerprint}


def read(folder: str | Path) -> dict | None:
    """The folder's lineage record; None where it has none (nothing started there, or written before
    stores kept one)."""
    path = Path(folder) / LINEAGE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def identity(folder: str | Path) -> dict | None:
    record = read(folder)
    return None if record is None else record["identity"]


def start(folder: str | Path, key: str, rows: dict | None, built_from: list[dict | None]) -> dict:
    """Record a new build of `folder` (before any of its output is written) and return its identity.
    `rows`: its rows' identity (rows_identity); None takes the first upstream's (none for a stage without
    one, until it records its own: the image store, from its listing, when it starts its store)."""
    if rows is None:
        first = built_from[0] if built_from else None
        rows = {name: (first or {}).get(name) for name in ("rows", "count", "fingerprint")}
    mine = {"store": Path(folder).name, "key": key, "build": uuid.uuid4().hex[:16],
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), **rows}
    atomic_write_json(Path(folder) / LINEAGE, {"identity": mine, "built_from": built_from})
    return mine


def difference(recorded: dict | None, current: dict | None) -> str | None:
    """Why a store built over `recorded` no longer fits that upstream as it is now (`current`); None when
    it does. An upstream without a record on either side (written before lineage records) is not judged."""
    if recorded is None or current is None:
        return None
    was, now = kind(recorded["store"]), kind(current["store"])
    fields = ("count", "rows", "fingerprint")
    rows = ", ".join(f"{f} {recorded.get(f)} -> {current.get(f)}" for f in fields if recorded.get(f) != current.get(f))
    if recorded["store"] == current["store"] and recorded["build"] != current["build"]:
        return (f"{now} was rebuilt since (build {recorded['build']} of {recorded.get('started')}, now "
                f"{current['build']} of {current.get('started')}" + (f"; its rows changed: {rows})" if rows else ")"))
    if rows:
        return f"the rows of {now} are not those of {was} it was built from ({rows})"
    return None


def mismatch(folder: str | Path, upstreams: Sequence[str | Path]) -> str | None:
    """Why `folder`'s recorded upstreams are not `upstreams` as they are now (None: they are). A folder
    without a record is not judged here (see `read`)."""
    record = read(folder)
    if record is None:
        return None
    recorded, current = record["built_from"], [identity(u) for u in upstreams]
    if len(recorded) != len(current):
        return f"it was built from {len(recorded)} upstream stores and reads {len(current)} now"
    return next((reason for was, now in zip(recorded, current) if (reason := difference(was, now))), None)


def stale(folder: str | Path, _seen: dict | None = None) -> str | None:
    """Why `folder` no longer fits what it was built from, looking up its recorded upstreams (beside it
    under the same root) and theirs in turn; None when every one still holds. An upstream folder that
    is gone is not judged: nothing contradicts the record."""
    seen = {} if _seen is None else _seen
    folder = Path(folder)
    if folder in seen:
        return seen[folder]
    seen[folder] = None
    record = read(folder)
    for was in (record or {}).get("built_from") or []:
        if was is None:
            continue
        upstream = folder.parent / was["store"]
        if not upstream.exists():
            continue
        reason = difference(was, identity(upstream))
        if reason is None and (deeper := stale(upstream, seen)):
            reason = f"{kind(upstream)} is stale: {deeper}"
        if reason:
            seen[folder] = reason
            break
    return seen[folder]
