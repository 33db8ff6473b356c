"""One Prefect flow per stage, and `pipeline`, which chains them (DESIGN §1 data flow).

image source -> ingest -> encode -> hierarchy -> train (decoder, level 0..L-1) -> evaluate
                    ingest -> judge (scenes only: a small network on the real scenes) -> evaluate

With `generator.mode: flat` the train stage trains the flat baseline (one one-step model straight to
the latent) in place of the level generators, and evaluate samples and scores it (tasks.evaluate).

Every flow first checks its config as `tf` does (flows.checks: the root, storage.config.preflight);
a refusal is recorded as the run's `config` stage. `config_path` (a YAML file, relative to this
repository or absolute) replaces the inline `config`, so deployments name a file instead of carrying
the whole config. Inside a deployment run, `pipeline_flow(stages_as_deployments=True)` runs each stage
as a run of that stage's deployment (on its work pool) and waits for it; anywhere else, in-process.
With a Prefect server (PREFECT_API_URL), each stage also holds a global concurrency slot named after
its root and stage, so runs on two hosts never write one stage at once (storage.locks covers one host).
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prefect import flow, get_run_logger

from flows.checks import check_root, checked_config
from flows.report import format_report, publish_failure, publish_report, record_failure, record_run
from storage.config import TFConfig
from storage.keys import Stage, ignored_note
from storage.tables import claim_run_id, load_runs


# The flows' default config, shown as the form of every deployment: one frozen instance (storage.config),
# so no run can change it for the next.
DEFAULTS = TFConfig()

# Each stage's upstream stages: the judge reads the real scenes only, so it hangs off ingest.
UPSTREAM = {"ingest": (), "encode": ("ingest",), "hierarchy": ("encode",), "train": ("hierarchy",),
            "judge": ("ingest",), "evaluate": ("train", "judge")}
ORDER = tuple(UPSTREAM)
# The pipeline's stages as deployment runs: tf-evaluate trains (or reuses) the judge before it scores.
ROUTED = ("ingest", "encode", "hierarchy", "train", "evaluate")


def forced(stage: str, force: str | None) -> bool:
    """`--force X` recomputes X and everything downstream of it."""
    return force is not None and (stage == force or any(forced(up, force) for up in UPSTREAM[stage]))


def _judge(config: TFConfig, root: str, force: bool) -> list[dict]:
    """The scenes judge, which evaluate scores with; other sources have none (their judge rows say skipped)."""
    from tasks.judge import train_judge_task

    return [train_judge_task(config, root, force)] if config.source.kind == "scenes" else []


def _train(config: TFConfig, root: str, levels: list[int] | None, force: bool) -> list[dict]:
    from tasks.train import train_decoder_task, train_flat_task, train_level_task, train_shared_task

    if config.generator.mode == "flat":   # one model for the whole latent: there are no levels to pick
        if levels is not None:
            raise ValueError("generator.mode is flat: --levels does not apply (the flat model has no levels)")
        return [train_decoder_task(config, root, force), train_flat_task(config, root, force)]
    if config.generator.sharing == "shared":   # one model for every level: --level names none of its own
        if levels is not None:
            raise ValueError("generator.sharing is shared: --levels does not apply (one model serves every level)")
        return [train_decoder_task(config, root, force), train_shared_task(config, root, force)]
    wanted = range(config.hierarchy.generator_levels) if levels is None else levels
    return [train_decoder_task(config, root, force)] + [train_level_task(config, root, l, force) for l in wanted]


def _stage(stage: str, config: TFConfig, root: str, run_id: str, force: str | None,
           levels: list[int] | None = None, done: list[dict] | None = None) -> list[dict]:
    """One stage in this process. The task modules import torch, timm and scikit-learn (about 5 s on 2
    cores), so they are imported here, after the checks: a refused config fails in well under a second.
    `done`: the results of the run's stages before this one, given by a run that goes on to the
    hierarchy stage (the pipeline): encode then fills the teacher store in its own pass where it can,
    and the hierarchy stage reuses what that pass made instead of forcing it again."""
    again = forced(stage, force)
    if stage == "ingest":
        from tasks.ingest import ingest_images

        return [ingest_images(config, root, again)]
    if stage == "encode":
        from tasks.encode import encode_latents

        return [encode_latents(config, root, again, with_teacher=done is not None)]
    if stage == "hierarchy":
        from tasks.hierarchy import build_teacher

        fused = any(r.get("stage") == "encode" and r.get("teacher") for r in done or [])
        return [build_teacher(config, root, again and not fused)]
    if stage == "train":
        return _train(config, root, levels, again)
    if stage == "judge":
        return _judge(config, root, again)
    if stage == "evaluate":
        from tasks.evaluate import evaluate_run

        return [evaluate_run(config, root, run_id, again)]
    raise ValueError(f"unknown stage {stage!r}")


def _weights(results: list[dict]) -> str:
    """The encoder weights label the stages report (the encode stage's), for every row of the run."""
    return next((r["encoder_weights"] for r in results if r.get("encoder_weights")), "")


def _api_server() -> bool:
    """Whether runs talk to a Prefect server several hosts can share (PREFECT_API_URL), not the ephemeral
    API of one process, where a global limit would guard nothing storage.locks does not."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def slot_name(root: str, stage: str) -> str:
    """The global concurrency limit of one stage of one root (limit names may not hold '/')."""
    where = root if "://" in root else str(Path(root).expanduser().resolve())
    return f"tf-{stage}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


class SlotUnreachable(ConnectionError):
    """The Prefect server could not be asked for a stage's concurrency slot (no connection, a server
    error): transient, tried again (SLOT_RETRY_DELAYS_S), unlike a slot another run holds (StageLocked)."""


# The slot is taken by the flow, outside the stage task and its retries (tasks.stage.STAGE_RETRIES):
# so its own attempts, as many and as far apart as those.
SLOT_RETRY_DELAYS_S = (10.0, 60.0)


def _logger():
    """The run's logger inside a flow or task run, else the module's (a stage slot taken by hand)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("tf.stages")


def _slot_held(error: Exception) -> bool:
    """Whether a slot was not had because another run holds it: a wait that timed out, or the server's
    423 Locked (concurrency.on_locked: fail asks once). Anything else is the server or the way to it."""
    import httpx

    if isinstance(error, TimeoutError):   # prefect's AcquireConcurrencySlotTimeoutError
        return True
    cause = error.__cause__
    return isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423


def _acquire_slot(name: str, config: TFConfig) -> contextlib.ExitStack:
    """One attempt: the limit (limit 1, created on first use), then one slot of it, held by the returned stack."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass
    wait = ({"timeout_seconds": config.concurrency.wait_timeout_s} if config.concurrency.on_locked == "wait"
            else {"max_retries": 0})
    held = contextlib.ExitStack()
    held.enter_context(concurrency(name, occupy=1, strict=True, **wait))
    return held


@contextlib.contextmanager
def stage_slot(root: str, stage: str, config: TFConfig) -> Iterator[None]:
    """Hold the stage's global concurrency slot (limit 1, created on first use) while it runs, waiting or
    failing at once as `concurrency.on_locked` says; nothing without a Prefect server. A slot another run
    holds is StageLocked; a server that does not answer is asked again, then SlotUnreachable (transient)."""
    if not _api_server():
        yield
        return
    from storage.locks import StageLocked

    name = slot_name(root, stage)
    _logger().info(f"stage {stage} of root {root}: global concurrency limit {name}")
    attempts = len(SLOT_RETRY_DELAYS_S) + 1
    for attempt in range(1, attempts + 1):
        try:   # strict: a slot that cannot be had stops the stage, never lets it run unguarded
            held = _acquire_slot(name, config)
            break
        except Exception as error:   # only the acquisition: the stage's own errors pass through `with held`
            if _slot_held(error):
                raise StageLocked(f"stage {stage} of root {root}: global concurrency limit {name} held by another "
                                  f"run (concurrency.on_locked: {config.concurrency.on_locked}): {error}") from error
            reason = f"{type(error).__name__}: {error}" + (f" ({error.__cause__})" if error.__cause__ else "")
            if attempt == attempts:
                raise SlotUnreachable(f"stage {stage} of root {root}: the Prefect server did not give the global "
                                      f"concurrency limit {name} in {attempts} attempts: {reason}") from error
            delay = SLOT_RETRY_DELAYS_S[attempt - 1]
            _logger().warning(f"stage {stage}: the Prefect server did not give the concurrency limit {name} "
                                     f"(attempt {attempt} of {attempts}: {reason}); again in {delay:g} s")
            time.sleep(delay)
    with held:
        yield


class StageRunFailed(RuntimeError):
    """A stage's deployment run, started by the pipeline, did not complete."""


class _Run:
    """One flow run's stages in order: `run("encode", config, work)` runs a stage and keeps its results;
    when a stage raises, the run's record still lands (the stages done, then a `failed` row naming the
    stage and the error) with a Prefect artifact, and the error goes on up. The config checks are the
    run's first stage, `config`."""

    def __init__(self, flow_name: str, root: str, run_id: str | None):
        check_root(root)   # the run's record goes under the root: nothing can be recorded without it
        self.flow_name, self.root = flow_name, root
        self.run_id = claim_run_id(root, run_id)
        self.results: list[dict] = []
        self.started = time.monotonic()

    @contextlib.contextmanager
    def recording(self, stage: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            record_failure(self.root, self.run_id, self.flow_name, self.results, stage, error,
                           time.monotonic() - self.started, _weights(self.results))
            publish_failure(self.run_id, stage, error)
            raise

    def checked(self, config: TFConfig, config_path: str | None, levels: list[int] | None = None) -> TFConfig:
        """The run's config, checked; settings it does not use are named in one line before any stage,
        since they build nothing new (storage.keys.ignored_note: no key moves for them)."""
        with self.recording("config"):
            config = checked_config(self.flow_name, self.root, config, config_path, levels)
        note = ignored_note(config)
        if note:
            get_run_logger().warning(f"config: {note}")
        return config

    def __call__(self, stage: str, config: TFConfig, work: Callable[[], list[dict]]) -> None:
        with self.recording(stage), stage_slot(self.root, stage, config):
            self.results += work()

    def deployed(self, stage: str, config: TFConfig, force: str | None) -> None:
        """The stage as a run of its deployment `<stage>/tf-<stage>` (on that deployment's work pool),
        waited for; its rows in the runs table (run id `<this run>-<stage>`) become this run's."""
        from prefect.deployments import run_deployment

        child = f"{self.run_id}-{stage}"   # free: this run's id is unique on the root
        with self.recording(stage):
            # config_path=None: the deployment's default file must not replace the config this run checked
            parameters = {"config": config.model_dump(mode="json"), "config_path": None, "root": self.root,
                          "run_id": child, "force": force}
            flow_run = run_deployment(f"{stage}/tf-{stage}", parameters=parameters, poll_interval=1)
            if not flow_run.state.is_completed():
                raise StageRunFailed(f"deployment run {flow_run.name} of tf-{stage} ended {flow_run.state.name}: "
                                     f"{flow_run.state.message}")
            runs = load_runs(self.root)
            rows = runs[runs.run_id == child].to_dict("records")
            self.results += [{k: row[k] for k in ("stage", "key", "status", "duration_s", "path", "encoder_weights")}
                             | {"run_id": child} for row in rows]

    def finish(self) -> dict:
        table = record_run(self.root, self.run_id, self.flow_name, self.results, _weights(self.results))
        publish_report(self.run_id, self.results)
        outputs = {"run table": str(table)}
        for r in self.results:
            if "metrics_table" in r:
                outputs.update({"metrics": r["metrics_table"], "grid": r["grid_png"]})
            elif r["stage"] == "evaluate" and "run_id" in r:   # run by its deployment: its own run id
                outputs.update({"metrics": f"run {r['run_id']}", "grid": str(Path(r["path"]) / "grid.png")})
        # logged, so `prefect flow-run logs` holds it too; Prefect's console handler shows it in the terminal
        get_run_logger().info("\n" + format_report(self.run_id, self.results, outputs))
        return {"run_id": self.run_id, "stages": self.results, "outputs": outputs}


def _alone(stage: str, config: TFConfig, config_path: str | None, root: str, run_id: str | None,
           force: str | None, levels: list[int] | None = None) -> dict:
    """A flow of one stage: the checks, the stage, the run's record."""
    run = _Run(stage, root, run_id)
    config = run.checked(config, config_path, levels)
    run(stage, config, lambda: _stage(stage, config, root, run.run_id, force, levels))
    return run.finish()


@flow(name="ingest")
def ingest_flow(config: TFConfig = DEFAULTS, config_path: str | None = None, root: str = "data",
                run_id: str | None = None, force: Stage | None = None) -> dict:
    return _alone("ingest", config, config_path, root, run_id, force)


@flow(name="encode")
def encode_flow(config: TFConfig = DEFAULTS, config_path: str | None = None, root: str = "data",
                run_id: str | None = None, force: Stage | None = None) -> dict:
    return _alone("encode", config, config_path, root, run_id, force)


@flow(name="hierarchy")
def hierarchy_flow(config: TFConfig = DEFAULTS, config_path: str | None = None, root: str = "data",
                   run_id: str | None = None, force: Stage | None = None) -> dict:
    return _alone("hierarchy", config, config_path, root, run_id, force)


@flow(name="judge")
def judge_flow(config: TFConfig = DEFAULTS, config_path: str | None = None, root: str = "data",
               run_id: str | None = None, force: Stage | None = None) -> dict:
    return _alone("judge", config, config_path, root, run_id, force)


@flow(name="train")
def train_flow(config: TFConfig = DEFAULTS, config_path: str | None = None, root: str = "data",
               levels: list[int] | None = None, run_id: str | None = None, force: Stage | None = None) -> dict:
    return _alone("train", config, config_path, root, run_id, force, levels)


@flow(name="evaluate")
def evaluate_flow(config: TFConfig = DEFAULTS, config_path: str | None = None, root: str = "data",
                  run_id: str | None = None, force: Stage | None = None) -> dict:
    run = _Run("evaluate", root, run_id)
    config = run.checked(config, config_path)
    for stage in ("judge", "evaluate"):   # the judge is reused when complete
        run(stage, config, lambda: _stage(stage, config, root, run.run_id, force))
    return run.finish()


@flow(name="pipeline")
def pipeline_flow(config: TFConfig = DEFAULTS, config_path: str | None = None, root: str = "data",
                  run_id: str | None = None, force: Stage | None = None,
                  stages_as_deployments: bool = False) -> dict:
    """image source -> ingest -> encode -> hierarchy -> train (decoder, levels) -> judge -> evaluate.

    stages_as_deployments: inside a deployment run, run each stage as a run of its own deployment
    (tf-ingest, tf-encode, ...: each on its work pool, so CPU stages go to `cpu` workers and GPU stages to
    `gpu` workers), one after the other, failing when one fails. Outside a deployment run (`tf pipeline`,
    a plain call) every stage runs in this process whatever it says."""
    from prefect.runtime import deployment

    run = _Run("pipeline", root, run_id)
    config = run.checked(config, config_path)
    if stages_as_deployments and deployment.id:
        for stage in ROUTED:
            run.deployed(stage, config, force)
    else:
        for stage in ORDER:
            run(stage, config, lambda: _stage(stage, config, root, run.run_id, force, done=run.results))
    return run.finish()


FLOWS = {"pipeline": pipeline_flow, "ingest": ingest_flow, "encode": encode_flow,
         "hierarchy": hierarchy_flow, "train": train_flow, "judge": judge_flow, "evaluate": evaluate_flow}
