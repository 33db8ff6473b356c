"""`tf <stage> --config C --root R --set key=value`: run one stage (or the pipeline) as a Prefect flow."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

from flows.checks import RootUnusable, checked_config
from storage.keys import Stage

STAGES = {
    "pipeline": "run every stage: ingest, encode, hierarchy, train, judge (scenes), evaluate",
    "ingest": "image source -> image store (Zarr)",
    "encode": "image store -> latent store (DINOv2 tokens + channel stats)",
    "hierarchy": "latent store -> teacher store (region ids per level)",
    "train": "decoder + one mean-flow generator per level (safetensors)",
    "judge": "scenes only: train the scenes judge on the real scenes (FD-scenes, class, segmentation)",
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
        sub.add_argument("--dask-address", default=None, help="use this Dask scheduler instead of a local cluster")
        sub.add_argument("--force", choices=get_args(Stage), default=None,
                         help="recompute this stage and everything downstream of it")
        if name == "train":
            sub.add_argument("--level", type=int, action="append", default=None,
                             help="train only this level (repeatable; default: all)")
    for name, help_text in (("status", "list stores, runs, and what a config would recompute"),
                            ("serve", "serve every flow's deployment (with schedules) from this process")):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, default=None, help="YAML config")
        sub.add_argument("--root", type=Path, default=Path("data"), help="store root (default: ./data)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sub = commands.add_parser("dashboard", help="the web dashboard (Streamlit) over a root",
                              description="the web dashboard (Streamlit) over a root")
    sub.add_argument("--root", type=Path, default=Path("data"), help="store root (default: ./data)")
    sub.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    sub.add_argument("--port", type=int, default=8501, help="port (default: 8501)")
    return parser


def _exit_on_sigterm() -> None:
    """SIGTERM (a scheduler's stop, `kill`, a container shutting down) ends the run like Ctrl-C: as an
    exception, so every context manager and atexit hook runs, and the ephemeral Prefect server and the
    local Dask cluster stop with this process. Python's default would end it at once and leave them."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _prefect_defaults(root: Path) -> None:
    # Ephemeral Prefect needs no server; keep its state out of the user's home unless told otherwise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_HOME", str(root.resolve() / ".prefect"))
    # The first start migrates a fresh database; 20 s (Prefect's default) is too short on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dashboard":
        from dashboards.server import serve

        return serve(args.root, args.host, args.port)
    from storage.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "dask_address", None):
        overrides.append(f"ingest.dask_address={args.dask_address}")
    # Before Prefect starts: its home defaults under the root, and a root it cannot write costs minutes of
    # "attempting to connect to ephemeral Prefect API server" before any useful message. The checks are
    # the ones every flow runs first (flows.checks), so a deployment run refuses what `tf` refuses.
    try:
        config = load_config(args.config, overrides)
        if args.command in STAGES or args.command == "serve":
            config = checked_config(args.command, args.root, config, levels=getattr(args, "level", None))
    except RootUnusable as error:
        print(f"tf {args.command}: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as error:
        print(f"tf {args.command}: invalid config: {error}", file=sys.stderr)
        return 2
    _exit_on_sigterm()
    _prefect_defaults(args.root)
    if args.command == "status":
        from flows.status import status_text

        print(status_text(args.root, config if args.config or args.overrides else None))
        return 0
    args.root.mkdir(parents=True, exist_ok=True)
    if args.command == "serve":
        from flows.deploy import serve

        serve(str(args.config) if args.config else None, str(args.root))
        return 0
    from flows.stages import FLOWS

    kwargs = {"config": config, "root": str(args.root), "run_id": args.run_id, "force": args.force}
    if args.command == "train":
        kwargs["levels"] = args.level
    FLOWS[args.command](**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
