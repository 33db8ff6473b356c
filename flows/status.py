"""`tf status`: what is under a root, which runs wrote it, and what a config would (re)compute: a stage
whose output no longer fits the stores it was built from (storage.lineage: an upstream forced or rebuilt
since, or holding other rows) is named stale, with the reason."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from storage import lineage, zarr_store
from storage.checkpoints import checkpoint_exists, is_complete
from storage.config import TFConfig
from storage.tables import run_summaries
from tasks import plan

STAGE_PREFIXES = ("images", "latents", "teacher", "decoder", "generator", "judge", "evaluate")


def _is_done(path: Path) -> bool:
    if path.name.startswith("decoder-"):
        return checkpoint_exists(path / "decoder")
    if path.name.startswith("generator-"):
        return checkpoint_exists(path / "generator")
    if path.name.startswith("judge-"):
        return is_complete(path)
    return zarr_store.is_complete(path)


def stored_stages(root: Path) -> list[dict]:
    out = []
    for path in sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.split("-")[0] in STAGE_PREFIXES):
        out.append({"folder": path.name, "complete": _is_done(path), "stale": lineage.stale(path)})
    return out


def _state(path: Path) -> dict:
    """up to date | stale (a run rebuilds it, or refuses to read it until its upstream is rebuilt: `why`)
    | would compute."""
    if not (path.exists() and _is_done(path)):
        return {"state": "would compute"}
    reason = lineage.stale(path)
    return {"state": "stale", "why": reason} if reason else {"state": "up to date"}


def expected_stages(root: Path, cfg: TFConfig) -> list[dict]:
    """For this config: each stage's folder and whether a run would reuse it or compute it."""
    layout = plan.layout(root, cfg)
    wanted = [("ingest", layout.images()), ("encode", layout.latents()), ("hierarchy", layout.teacher()),
              ("train-decoder", layout.decoder())]
    if cfg.generator.mode == "flat":
        wanted.append(("train-flat", layout.flat_generator()))
    elif cfg.generator.sharing == "shared":
        wanted.append(("train-shared", layout.shared_generator()))
    else:
        wanted += [(f"train-L{level}", layout.generator(level)) for level in range(cfg.hierarchy.generator_levels)]
    if cfg.source.kind == "scenes":
        wanted.append(("judge", layout.judge()))
    wanted.append(("evaluate", layout.mode_evaluation()[0]))   # evaluate-<key> or evaluate-flat-<key>
    return [{"stage": stage, "folder": path.name, **_state(path)} for stage, path in wanted]


def status_text(root: Path, cfg: TFConfig | None) -> str:
    root = Path(root)
    if not root.exists():
        return f"{root}: no such root (nothing has run here yet)"
    lines = [f"root {root.resolve()}", "", "stores:"]
    lines += [f"  {s['folder']:<40} {'complete' if s['complete'] else 'INCOMPLETE'}"
              + (f"  stale: {s['stale']}" if s["stale"] else "") for s in stored_stages(root)]
    runs = run_summaries(root).iloc[::-1]   # oldest first; a routed pipeline's stage runs folded into it
    lines += ["", f"runs: {len(runs)}"]
    for row in runs.itertuples():
        seconds = "" if pd.isna(row.duration_s) else f"{row.duration_s:.1f}s"
        lines.append(f"  {row.run_id}  flow={row.flow}  {row.status} {seconds}  computed: {row.computed or '-'}")
        if row.status == "failed":
            lines.append(f"    FAILED at {row.failed_stage or '-'}: {row.error}")
    if cfg is not None:
        lines += ["", f"for config {cfg.name!r}:"]
        for s in expected_stages(root, cfg):
            lines.append(f"  {s['stage']:<14} {s['state']:<14} {s['folder']}")
            if s.get("why"):
                lines.append(f"  {'':<14} {'':<14} why: {s['why']}")
    return "\n".join(lines)
