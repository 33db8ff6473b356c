"""Prefect deployments for every TF flow (DESIGN §6): work pools, schedules, serve and deploy.

One table (`SPECS`) says, per flow: deployment name, work pool, cron schedule, tags and
description. `prefect.yaml` at the repository root describes the same deployments for
`prefect deploy --all`; a test keeps the two in agreement.

- `serve(config_path, root)`: one local process serves every deployment; no work pools.
- `deploy_to_pools(config_path, root, source_dir)`: registers the deployments with a
  running server (PREFECT_API_URL), against the process work pools `cpu` and `gpu`;
  `prefect worker start --pool cpu|gpu` then runs them from `source_dir`.
- `python -m flows.deploy --config C --root R`: `deploy_to_pools` from the command line.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES_FILE = "flows/stages.py"
POOLS = {"cpu": "CPU work: ingest (image decoding) and the hierarchy (clustering)",
         "gpu": "accelerator work: encode, train, evaluate, and the whole pipeline"}


@dataclass(frozen=True)
class Spec:
    flow: str                 # key of flows.stages.FLOWS and the Prefect flow name
    pool: str                 # work pool for deploy_to_pools; ignored by serve
    cron: str | None          # schedule (UTC); None = run on demand only
    description: str

    @property
    def name(self) -> str:
        return f"tf-{self.flow}"

    @property
    def entrypoint(self) -> str:
        return f"{STAGES_FILE}:{self.flow}_flow"

    @property
    def tags(self) -> list[str]:
        return ["tf", self.flow, self.pool] + (["scheduled"] if self.cron else [])


SPECS: tuple[Spec, ...] = (
    Spec("pipeline", "gpu", "0 3 * * 0",
         "Weekly full run: ingest, encode, hierarchy, train, evaluate (complete stages are reused)."),
    Spec("ingest", "cpu", None, "Image source -> image store (Zarr)."),
    Spec("encode", "gpu", None, "Image store -> latent store (DINOv2 patch tokens + channel stats)."),
    Spec("hierarchy", "cpu", None, "Latent store -> teacher store (region ids per level)."),
    Spec("train", "gpu", None, "Decoder + one mean-flow generator per level (safetensors)."),
    Spec("judge", "gpu", None, "Real scenes -> the scenes judge (safetensors), which evaluate scores with."),
    Spec("evaluate", "gpu", "0 2 * * *",
         "Nightly evaluation: trajectories, edit suite, metric tables (Parquet) and the grid PNG."),
)


def parameters(config_path: str | os.PathLike | None, root: str) -> dict[str, Any]:
    """Default parameters of every deployment: the config as a plain dict, and the store root.

    A local root is made absolute so the runs write where the deployer meant, whatever
    directory a worker runs in; an fsspec URL is kept as given.
    """
    from storage.config import load_config

    config = load_config(config_path).model_dump(mode="json")
    root = str(root)
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    return {"config": config, "root": root}


def deployments(config_path: str | os.PathLike | None = None, root: str = "data", for_pools: bool = False,
                source_dir: str | os.PathLike | None = None) -> list:
    """One `RunnerDeployment` per flow in SPECS.

    for_pools=False: built from the imported flows, for `prefect.serve` (no work pool).
    for_pools=True: loaded with `flow.from_source(source_dir, entrypoint)`, so each deployment
    carries a `set_working_directory` pull step to `source_dir` (default: this repository)
    and its work pool name.
    """
    from prefect import Flow

    params = parameters(config_path, root)
    source = str(Path(source_dir or REPO).resolve())
    made = []
    for spec in SPECS:
        common = dict(name=spec.name, cron=spec.cron, parameters=copy.deepcopy(params), tags=spec.tags,
                      description=spec.description)
        if for_pools:
            flow = Flow.from_source(source=source, entrypoint=spec.entrypoint)
            made.append(flow.to_deployment(work_pool_name=spec.pool, **common))
        else:
            from flows.stages import FLOWS

            made.append(FLOWS[spec.flow].to_deployment(**common))
    return made


def ensure_work_pools(client) -> dict[str, bool]:
    """Create the `cpu` and `gpu` process work pools where missing (a sync Prefect client).

    Returns {pool: created?}. An existing pool is left as it is.
    """
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = {}
    for name, description in POOLS.items():
        try:
            client.read_work_pool(name)
            created[name] = False
            continue
        except ObjectNotFound:
            pass
        pool = WorkPoolCreate(name=name, type="process", description=description,
                              base_job_template=ProcessWorker.get_default_base_job_template())
        try:
            client.create_work_pool(pool)
            created[name] = True
        except ObjectAlreadyExists:  # created concurrently by someone else
            created[name] = False
    return created


def deploy_to_pools(config_path: str | os.PathLike | None, root: str,
                    source_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Register every deployment with the server at PREFECT_API_URL.

    Creates the work pools if missing. Process pools need no image (nothing is built or
    pushed): each worker's pull step changes into `source_dir` (default: this repository)
    and loads the entrypoint from there. Returns {"<flow>/<deployment>": deployment id}.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        ensure_work_pools(client)
    return {f"{d.flow_name}/{d.name}": d.apply()
            for d in deployments(config_path, root, for_pools=True, source_dir=source_dir)}


def serve(config_path: str | os.PathLike | None, root: str) -> None:
    """Serve every deployment from this process (schedules included) until interrupted."""
    import prefect

    prefect.serve(*deployments(config_path, root, for_pools=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy",
                                     description="Register the TF deployments with the Prefect server at "
                                                 "PREFECT_API_URL (work pools cpu and gpu).")
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--root", default="data", help="store root (default: ./data, made absolute)")
    parser.add_argument("--source", type=Path, default=REPO, help="code directory the workers run from")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("python -m flows.deploy: PREFECT_API_URL is not set; start `prefect server start` and "
              "export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    ids = deploy_to_pools(args.config, args.root, args.source)
    for spec in SPECS:
        full = f"{spec.flow}/{spec.name}"
        print(f"{full:24} pool={spec.pool}  cron={spec.cron or '-':11}  id={ids[full]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
