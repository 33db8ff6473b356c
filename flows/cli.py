"""`tf <stage> --config C --root R --set key=value`: run one stage (or the pipeline) as a Prefect flow."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STAGES = {
    "pipeline": "run every stage: ingest, encode, hierarchy, train, evaluate",
    "ingest": "image source -> image store (Zarr)",
    "encode": "image store -> latent store (DINOv2 tokens + channel stats)",
    "hierarchy": "latent store -> teacher store (region ids per level)",
    "train": "decoder + one mean-flow generator per level (safetensors)",
    "evaluate": "sample trajectories, edit suite, metric tables (Parquet) and grid PNG",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tf", description="Trajectory Forcing pipeline")
    commands = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, help_text in STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in scenes defaults)")
        sub.add_argument("--root", type=Path, default=Path("data"), help="store root (default: ./data)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set generator.steps=50 (repeatable)")
        sub.add_argument("--run-id", default=None, help="run id for the tables (default: time + random)")
        if name == "train":
            sub.add_argument("--level", type=int, action="append", default=None,
                             help="train only this level (repeatable; default: all)")
    return parser


def _prefect_defaults(root: Path) -> None:
    # Ephemeral Prefect needs no server; keep its state out of the user's home unless told otherwise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_HOME", str(root.resolve() / ".prefect"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prefect_defaults(args.root)
    from storage.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"tf {args.command}: invalid config: {error}", file=sys.stderr)
        return 2
    args.root.mkdir(parents=True, exist_ok=True)
    from flows.stages import FLOWS

    kwargs = {"config": config, "root": str(args.root), "run_id": args.run_id}
    if args.command == "train":
        kwargs["levels"] = args.level
    FLOWS[args.command](**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
