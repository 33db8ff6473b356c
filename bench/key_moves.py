"""Which stage keys a code change moves: every stage key of each config at --base against this checkout.

A stage is recomputed exactly when its key moves (storage/keys.py), so this is the list of what an
upgrade from --base re-runs for a config. A refactor should move none; a deliberate change moves its own
stage and everything downstream of it.

    python bench/key_moves.py --base 319d792                                  # configs/scenes.yaml, imagenet.yaml
    python bench/key_moves.py --base 319d792 --head-set encoder.read_from=image_store   # the base's read path

The keys at --base come from a temporary `git worktree` of that commit, computed by its own code with
this venv's Python; both sides run the same snippet, which asks tasks.plan.layout where it exists
(the evaluation key needs the metric registry) and storage.keys.Layout before it did.
Writes bench/results/key_moves.json (figures: moved keys per config and mode).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results_io  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Run in the checkout being measured (its own storage.keys): prints {"config:mode": {stage: key}}.
DUMP = """
import dataclasses, json, sys
from storage.config import load_config
from storage.keys import Layout
try:
    from tasks.plan import layout
except ImportError:
    layout = Layout
configs, extra = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for path in configs:
    for mode in ("staged", "flat"):
        cfg = load_config(path, extra + (["generator.mode=flat"] if mode == "flat" else []))
        keys = layout("/root", cfg).keys
        out[f"{path}:{mode}"] = {f.name: getattr(keys, f.name) for f in dataclasses.fields(keys)}
print(json.dumps(out))
"""


def dump_keys(checkout: Path, configs: list[str], extra: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", DUMP, json.dumps(configs), json.dumps(extra)], cwd=checkout,
                          capture_output=True, text=True, env={"PYTHONPATH": str(checkout), "PATH": ""})
    if done.returncode:
        raise RuntimeError(f"computing the keys in {checkout} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def keys_at(commit: str, configs: list[str], extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=ROOT, check=True)
        try:
            return dump_keys(tree, configs, extra)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)


def moves(base: dict, head: dict) -> dict[str, list[str]]:
    """Per config:mode, the stages whose key differs (a stage only one side has counts as moved)."""
    return {run: sorted(stage for stage in set(base.get(run, {})) | set(keys)
                        if base.get(run, {}).get(stage) != keys.get(stage))
            for run, keys in head.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--config", action="append", default=None, help="default: configs/scenes.yaml, imagenet.yaml")
    p.add_argument("--set", action="append", default=[], help="an override applied on both sides")
    p.add_argument("--head-set", action="append", default=[],
                   help="an override applied to this checkout only: a setting --base lacks, set to its behaviour")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    configs = args.config or ["configs/scenes.yaml", "configs/imagenet.yaml"]
    base, head = keys_at(args.base, configs, args.set), dump_keys(ROOT, configs, args.set + args.head_set)
    moved = moves(base, head)
    for run, stages in moved.items():
        kept = sorted(set(head[run]) - set(stages))
        print(f"{run:32s} moved: {', '.join(stages) or '-'}   kept: {', '.join(kept)}")
    figures = {f"moved_keys[{run}]": (len(stages), "keys") for run, stages in moved.items()}
    results_io.write_result("key_moves", figures, extra={"base": args.base, "overrides": args.set,
                                                                 "head_overrides": args.head_set, "moved": moved},
                            folder=args.out)


if __name__ == "__main__":
    main()
