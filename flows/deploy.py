"""Prefect deployments for every TF flow (DESIGN §6): work pools, schedules, serve and deploy.

One table (`SPECS`) says, per deployment: flow, name, work pool, cron schedule, tags, description and
parameters. `prefect.yaml` at the repository root describes the same deployments for `prefect deploy
--all`; a test keeps the two in agreement. Deployments name their config by file (`config_path`,
relative to the repository: configs/scenes.yaml, which runs on a fresh machine), and every flow checks it
before any stage starts, as `tf` does.

- `serve(config_path, root)`: one local process serves every deployment; no work pools.
- `deploy_to_pools(config_path, root, source_dir)`: registers the deployments with a running server
  (PREFECT_API_URL), creating the process work pools `cpu` and `gpu` where missing;
  `prefect worker start --pool cpu|gpu` then runs them from `source_dir`.
- `python -m flows.deploy --config C --root R`: `deploy_to_pools` from the command line;
  `python -m flows.deploy --pools-only`: only the work pools (then `prefect --no-prompt deploy --all`).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.checks import REPO

STAGES_FILE = "flows/stages.py"
DEFAULT_CONFIG = "configs/scenes.yaml"   # the built-in scenes: no weights or data needed
POOLS = {"cpu": "CPU work: ingest (image decoding), tf-hierarchy, and the pipelines, which run ingest themselves "
                "and start one gpu stage run (tf-stages-gpu) for the stages after it",
         "gpu": "accelerator work: encode, train, judge, evaluate, and a routed pipeline's stages after ingest"}
# The pipeline deployments orchestrate: each group of stages of one pool runs on that pool (flows.stages).
ROUTED = {"stages_as_deployments": True}
# The scheduled evaluation scores what changed since its last run, and says when nothing did (flows.scheduled).
SCORE_NEW = {"score_new": True}


@dataclass(frozen=True)
class Spec:
    flow: str                 # key of flows.stages.FLOWS and the Prefect flow name
    pool: str                 # work pool for deploy_to_pools; ignored by serve
    cron: str | None          # schedule (UTC); None = run on demand only
    description: str
    variant: str = ""         # a second deployment of one flow: tf-<flow>-<variant>
    config_path: str | None = None   # a fixed config file; None = the one deployed with (default scenes)
    extra: dict[str, Any] = field(default_factory=dict)   # further default parameters

    @property
    def name(self) -> str:
        return f"tf-{self.flow}" + (f"-{self.variant}" if self.variant else "")

    @property
    def entrypoint(self) -> str:
        return f"{STAGES_FILE}:{self.flow}_flow"

    @property
    def tags(self) -> list[str]:
        return list(dict.fromkeys(["tf", self.flow, self.pool] + ([self.variant] if self.variant else []) + (
            ["scheduled"] if self.cron else [])))

    def parameters(self, config_path: str, root: str) -> dict[str, Any]:
        return {"config_path": self.config_path or config_path, "root": root, **self.extra}


SPECS: tuple[Spec, ...] = (
    Spec("pipeline", "cpu", "0 3 * * 0",
         "Weekly full run on the built-in scenes: ingest here on the cpu pool, then encode, hierarchy, train, "
         "judge and evaluate as one run of tf-stages-gpu (complete stages are reused).", extra=ROUTED),
    Spec("pipeline", "cpu", None,
         "ImageNet-1k with configs/imagenet.yaml, on demand. Needs DINOv2-B/14-reg weights at "
         "/weights/dinov2_vitb14_reg4.safetensors (encoder.weights) and the train folder /data/imagenet/train "
         "(source.path); FID/KID/IS also /weights/pt_inception-2015-12-05-6726825d.pth "
         "(evaluate.inception_weights, else skipped). Fails in its first second, naming the file, when the "
         "weights or the images are absent.", variant="imagenet", config_path="configs/imagenet.yaml",
         extra=ROUTED),
    Spec("ingest", "cpu", None, "Image source -> image store (Zarr)."),
    Spec("encode", "gpu", None, "Image store -> latent store (DINOv2 patch tokens + channel stats)."),
    Spec("hierarchy", "cpu", None, "Latent store -> teacher store (region ids per level)."),
    Spec("train", "gpu", None, "Decoder + one mean-flow generator per level (safetensors)."),
    Spec("judge", "gpu", None, "Real scenes -> the scenes judge (safetensors), which evaluate scores with."),
    Spec("evaluate", "gpu", "0 2 * * *",
         "Nightly evaluation of what changed since its last run (trajectories, edit suite, metric tables, grid "
         "PNG); a 'nothing new' row in tables/runs when nothing did, or while the models are not trained yet.",
         extra=SCORE_NEW),
    Spec("stages", "cpu", None, "Stage runs of a routed pipeline: the stages it names (every stage when none), in "
         "one process, on the cpu pool.", variant="cpu"),
    Spec("stages", "gpu", None, "Stage runs of a routed pipeline: the stages it names (every stage when none), in "
         "one process, on the gpu pool.", variant="gpu"),
)


def config_path_parameter(config_path: str | os.PathLike | None) -> str:
    """A config file as a deployment parameter: relative to the repository when inside it (as
    prefect.yaml writes it), else absolute. Loaded here first, so a bad file fails the deploy."""
    from storage.config import load_config

    path = Path(config_path or REPO / DEFAULT_CONFIG).expanduser().resolve()
    load_config(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def root_parameter(root: str) -> str:
    """A local root made absolute, so runs write where the deployer meant whatever directory a worker
    runs in; an fsspec URL is kept as given."""
    root = str(root)
    return root if "://" in root else str(Path(root).expanduser().resolve())


def deployments(config_path: str | os.PathLike | None = None, root: str = "data", for_pools: bool = False,
                source_dir: str | os.PathLike | None = None) -> list:
    """One `RunnerDeployment` per flow in SPECS.

    for_pools=False: built from the imported flows, for `prefect.serve` (no work pool).
    for_pools=True: loaded with `flow.from_source(source_dir, entrypoint)`, so each deployment
    carries a `set_working_directory` pull step to `source_dir` (default: this repository)
    and its work pool name.
    """
    from prefect import Flow

    config_path, root = config_path_parameter(config_path), root_parameter(root)
    source = str(Path(source_dir or REPO).resolve())
    made = []
    for spec in SPECS:
        common = dict(name=spec.name, cron=spec.cron, parameters=copy.deepcopy(spec.parameters(config_path, root)),
                      tags=spec.tags, description=spec.description)
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


def wait_for_server(seconds: float) -> None:
    """`prefect server start &` returns at once and its API answers seconds later: wait for it, so the
    README's lines work pasted together."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while (error := client.api_healthcheck()) is not None:
            if time.monotonic() > deadline:
                raise SystemExit(f"python -m flows.deploy: no Prefect API at {client.api_url} after {seconds:.0f} s: "
                                 f"{error}")
            time.sleep(1)


def create_work_pools() -> dict[str, bool]:
    """`ensure_work_pools` against the server at PREFECT_API_URL."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return ensure_work_pools(client)


def deploy_to_pools(config_path: str | os.PathLike | None, root: str,
                    source_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Register every deployment with the server at PREFECT_API_URL.

    Creates the work pools if missing. Process pools need no image (nothing is built or
    pushed): each worker's pull step changes into `source_dir` (default: this repository)
    and loads the entrypoint from there. Returns {"<flow>/<deployment>": deployment id}.
    """
    create_work_pools()
    return {f"{d.flow_name}/{d.name}": d.apply()
            for d in deployments(config_path, root, for_pools=True, source_dir=source_dir)}


def serve(config_path: str | os.PathLike | None, root: str) -> None:
    """Serve every deployment from this process (schedules included) until interrupted."""
    import prefect

    prefect.serve(*deployments(config_path, root, for_pools=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy",
                                     description="Register the TF deployments with the Prefect server at "
                                                 "PREFECT_API_URL, creating the work pools cpu and gpu.")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"YAML config the deployments name (default: {DEFAULT_CONFIG})")
    parser.add_argument("--root", default="data", help="store root (default: ./data, made absolute)")
    parser.add_argument("--source", type=Path, default=REPO, help="code directory the workers run from")
    parser.add_argument("--pools-only", action="store_true",
                        help="only create the work pools (for `prefect --no-prompt deploy --all` from prefect.yaml)")
    parser.add_argument("--wait", type=float, default=120, metavar="S",
                        help="seconds to wait for the server's API to answer (default: 120)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("python -m flows.deploy: PREFECT_API_URL is not set; start `prefect server start` and "
              "export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    wait_for_server(args.wait)
    if args.pools_only:
        for pool, created in create_work_pools().items():
            print(f"work pool {pool}: {'created' if created else 'exists'}")
        return 0
    ids = deploy_to_pools(args.config, args.root, args.source)
    for spec in SPECS:
        full = f"{spec.flow}/{spec.name}"
        print(f"{full:32} pool={spec.pool}  cron={spec.cron or '-':11}  id={ids[full]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
