"""One Prefect flow per stage, and `pipeline`, which chains them (DESIGN §1 data flow).

image source -> ingest -> encode -> hierarchy -> train (decoder, level 0..L-1) -> evaluate
                    ingest -> judge (scenes only: a small network on the real scenes) -> evaluate

With `generator.mode: flat` the train stage trains the flat baseline (one one-step model straight to
the latent) in place of the level generators, and evaluate samples and scores it (tasks.evaluate.stage).

Every flow first checks its config as `tf` does (flows.checks: the root, storage.config.preflight);
a refusal is recorded as the run's `config` stage. `config_path` (a YAML file, relative to this
repository or absolute) replaces the inline `config`, so deployments name a file instead of carrying
the whole config. Inside a deployment run, `pipeline_flow(stages_as_deployments=True)` runs each group of
consecutive stages of one work pool as one run of `tf-stages-<pool>` and waits for it (those of its own pool
in its own process); anywhere else, in-process. Every run records itself in tables/runs (flows.report).
With a Prefect server (PREFECT_API_URL), each stage also holds a global concurrency slot named after
its root and stage, so runs on two hosts never write one stage at once (storage.locks covers one host).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

from prefect import flow, get_run_logger

from flows.checks import check_root, checked_config
from flows.report import (failure_text, format_report, now, publish_failure, publish_report, record, run_row,
                          stage_row)
from storage.config import TFConfig
from storage.keys import Stage, ignored_note
from storage.tables import claim_run_id, load_run_family, load_runs, write_run_config


# The flows' default config, shown as the form of every deployment: one frozen instance (storage.config),
# so no run can change it for the next.
DEFAULTS = TFConfig()

# Each stage's upstream stages: the judge reads the real scenes only, so it hangs off ingest.
UPSTREAM = {"ingest": (), "encode": ("ingest",), "hierarchy": ("encode",), "train": ("hierarchy",),
            "judge": ("ingest",), "evaluate": ("train", "judge")}
ORDER = tuple(UPSTREAM)


def forced(stage: str, force: str | None) -> bool:
    """`--force X` recomputes X and everything downstream of it."""
    return force is not None and (stage == force or any(forced(up, force) for up in UPSTREAM[stage]))


def _judge(config: TFConfig, root: str, force: bool) -> list[dict]:
    """The scenes judge, which evaluate scores with; other sources have none (their judge rows say skipped)."""
    from tasks.judge.stage import train_judge_task

    return [train_judge_task(config, root, force)] if config.source.kind == "scenes" else []


def _train(config: TFConfig, root: str, levels: list[int] | None, force: bool) -> list[dict]:
    from tasks.train.stage import train_decoder_task, train_flat_task, train_level_task, train_shared_task

    if config.generator.mode == "flat":   # one model for the whole latent: there are no levels to pick
        if levels is not None:
            raise ValueError("generator.mode is flat: --levels does not apply (the flat model has no levels)")
        models = [functools.partial(train_flat_task, config, root, force)]
    elif config.generator.sharing == "shared":   # one model for every level: --level names none of its own
        if levels is not None:
            raise ValueError("generator.sharing is shared: --levels does not apply (one model serves every level)")
        models = [functools.partial(train_shared_task, config, root, force)]
    else:
        wanted = range(config.hierarchy.generator_levels) if levels is None else levels
        models = [functools.partial(train_level_task, config, root, level, force) for level in wanted]
    # each recorded as it finishes: a run stopped in a later one keeps the earlier ones' rows
    return [_finished(train()) for train in [functools.partial(train_decoder_task, config, root, force), *models]]


def _stage(stage: str, config: TFConfig, root: str, run_id: str, force: str | None,
           levels: list[int] | None = None, done: list[dict] | None = None) -> list[dict]:
    """One stage in this process. The task modules import torch, timm and scikit-learn (about 5 s on 2
    cores), so they are imported here, after the checks: a refused config fails in well under a second.
    `done`: the results of the run's stages before this one, given by a run that goes on to the
    hierarchy stage (the pipeline): encode then fills the teacher store in its own pass where it can,
    and the hierarchy stage reuses what that pass made instead of forcing it again."""
    again = forced(stage, force)
    if stage == "ingest":
        from tasks.ingest.stage import ingest_images

        return [ingest_images(config, root, again)]
    if stage == "encode":
        from tasks.encode.stage import encode_latents

        return [encode_latents(config, root, again, with_teacher=done is not None)]
    if stage == "hierarchy":
        from tasks.hierarchy.stage import build_teacher

        fused = any(r.get("stage") == "encode" and r.get("teacher") for r in done or [])
        return [build_teacher(config, root, again and not fused)]
    if stage == "train":
        return _train(config, root, levels, again)
    if stage == "judge":
        return _judge(config, root, again)
    if stage == "evaluate":
        from tasks.evaluate.stage import evaluate_run

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
    """A stage run, started by the pipeline as a deployment run, did not complete."""


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


# set by _Run while a stage call runs: a call of several stages (train: the decoder, then each level) records
# each one as it finishes, so a run stopped or failed in level 3 still shows levels 0-2 in its runs table
_ON_FINISHED: contextvars.ContextVar[Callable[[dict], None] | None] = contextvars.ContextVar("on_finished",
                                                                                            default=None)


def _finished(result: dict) -> dict:
    """One stage of a multi-stage call done: into the run's record now (see _ON_FINISHED)."""
    record_now = _ON_FINISHED.get()
    if record_now is not None:
        record_now(result)
    return result


def _stamped(results: list[dict], began: datetime) -> list[dict]:
    """Start and end times for the results of one stage call, in order: each starts where the one before ended."""
    out = []
    for result in results:
        ended = began + timedelta(seconds=result["duration_s"])
        out.append({**result, "started_at": began, "ended_at": ended})
        began = ended
    return out


class _Run:
    """One flow run's stages in order: `run("encode", config, work)` runs a stage and keeps its results;
    `run.deployed(...)` runs a group of stages as a stage run on its pool. The run's record (storage.tables:
    a row per stage, one for the whole run) is written as `running` at its start and whole at its end; when a
    stage raises, the record still lands (the stages done, a `failed` row naming the stage and the error, the
    run `failed` with it) with a Prefect artifact, and the error goes on up. A stage run started by a pipeline
    (`parent_run_id`) writes only its stage rows: the pipeline's run row counts its time. The config checks
    are the run's first stage, `config`."""

    def __init__(self, flow_name: str, root: str, run_id: str | None, parent_run_id: str | None = None):
        check_root(root)   # the run's record goes under the root: nothing can be recorded without it
        self.flow_name, self.root, self.parent = flow_name, root, parent_run_id or ""
        self.run_id = claim_run_id(root, run_id)
        self.results: list[dict] = []   # its own stages' results; a stage run's carry that run's "run_id"
        self.stage_runs: list[str] = []
        self.weights = ""
        self.started_at, self.started = now(), time.monotonic()
        self.flow_run_id = _flow_run_id()
        if not self.parent:
            self._write("running")

    def _own(self) -> list[dict]:
        return [r for r in self.results if r.get("run_id", self.run_id) == self.run_id]

    def _total(self, status: str, error: str = "") -> dict:
        seconds = None if status == "running" else time.monotonic() - self.started
        note = f"{len(self.stage_runs)} stage run(s) started: {', '.join(self.stage_runs)}" if self.stage_runs else ""
        return run_row(self.run_id, self.flow_name, status, self.started_at, seconds,
                       sum(r["duration_s"] for r in self.results), self.weights, self.flow_run_id, error, note)

    def _write(self, status: str, error: str = "") -> dict | None:
        self.weights = _weights(self.results) or self.weights
        rows = [stage_row(self.run_id, self.parent, self.flow_name, r, self.weights, self.flow_run_id)
                for r in self._own()]
        total = None if self.parent else self._total(status, error)
        record(self.root, self.run_id, rows + ([total] if total else []))
        return total

    @contextlib.contextmanager
    def recording(self, stage: str) -> Iterator[None]:
        began, clock = now(), time.monotonic()
        try:
            yield
        except Exception as error:
            if not isinstance(error, StageRunFailed):   # a stage run's failure is in its own rows already
                self.results.append({"stage": stage, "key": "", "status": "failed", "started_at": began,
                                     "ended_at": now(), "duration_s": round(time.monotonic() - clock, 3),
                                     "path": "", "error": failure_text(error)})
            failed = next(r for r in reversed(self.results) if r["status"] == "failed")
            self._write("failed", failed["error"])
            publish_failure(self.run_id, failed["stage"], error)
            raise

    def checked(self, config: TFConfig, config_path: str | None, levels: list[int] | None = None,
                **parameters) -> TFConfig:
        """The run's config, checked and recorded (_run.json); settings it does not use are named in one
        line before any stage, since they build nothing new (storage.keys.ignored_note: no key moves)."""
        with self.recording("config"):
            config = checked_config(self.flow_name, self.root, config, config_path, levels)
        write_run_config(self.root, self.run_id, {
            "flow": self.flow_name, "parent_run_id": self.parent, "flow_run_id": self.flow_run_id,
            "prefect_url": _prefect_url(self.flow_run_id), "config": config.model_dump(mode="json"),
            "parameters": {"config_path": config_path, "levels": levels, **parameters}})
        note = ignored_note(config)
        if note:
            get_run_logger().warning(f"config: {note}")
        return config

    def __call__(self, stage: str, config: TFConfig, work: Callable[[], list[dict]]) -> None:
        recorded: list[dict] = []

        def record_now(result: dict) -> None:   # one of several stages in this call (_finished)
            nonlocal began
            self.results += _stamped([result], began)
            began = self.results[-1]["ended_at"]
            recorded.append(result)
            self._write("running")

        token = _ON_FINISHED.set(record_now)
        try:
            with self.recording(stage), stage_slot(self.root, stage, config):
                began = now()
                done = work()
        finally:
            _ON_FINISHED.reset(token)
        self.results += _stamped([r for r in done if not any(r is seen for seen in recorded)], began)
        self._write("running")   # the record so far: progress to read, and what a waiting stage run waits for

    def start_deployed(self, stages: tuple[str, ...], pool: str, config: TFConfig, force: str | None,
                       after: list[str]):
        """Start the stages as one run of the deployment `stages/tf-stages-<pool>` (a worker of that pool runs
        them in one process) and return its flow run at once: it waits for the stages `after` to show done in
        this run's record, so its start (a worker's poll, a process, its imports) overlaps them."""
        from prefect.deployments import run_deployment

        child = f"{self.run_id}-{stages[0]}"   # free: this run's id is unique on the root
        self.stage_runs.append(child)
        with self.recording(stages[0]):
            # config_path=None: the deployment's default file must not replace the config this run checked
            parameters = {"stages": list(stages), "config": config.model_dump(mode="json"), "config_path": None,
                          "root": self.root, "run_id": child, "parent_run_id": self.run_id, "force": force,
                          "after": after}
            return run_deployment(f"stages/tf-stages-{pool}", parameters=parameters, timeout=0)

    def deployed(self, flow_run, stages: tuple[str, ...], pool: str) -> None:
        """Wait for a stage run `start_deployed` started; its rows in the runs table (run id `<this run>-<first
        stage>`, parent this run) join this run's report. A stage run that ended without recording its
        failure (its process was killed) gets a failed row from here."""
        from prefect.client.orchestration import get_client

        child = f"{self.run_id}-{stages[0]}"
        with self.recording(stages[0]):
            began, clock = now(), time.monotonic()
            with get_client(sync_client=True) as client:
                while not (flow_run := client.read_flow_run(flow_run.id)).state.is_final():
                    time.sleep(1)
            runs = load_runs(self.root)
            self.results += [{**row, "run_id": child} for row in runs[runs.run_id == child].to_dict("records")]
            if flow_run.state.is_completed():
                return
            error = (f"StageRunFailed: stage run {child} (deployment run {flow_run.name} of tf-stages-{pool}) "
                     f"ended {flow_run.state.name}: {flow_run.state.message}")
            if not any(r["status"] == "failed" for r in self.results if r.get("run_id") == child):
                done = {r["stage"].split("-")[0] for r in self.results if r.get("run_id") == child}
                stage = next((s for s in stages if s not in done), stages[-1])
                failed = {"stage": stage, "key": "", "status": "failed", "started_at": began, "ended_at": now(),
                          "duration_s": round(time.monotonic() - clock, 3), "path": "", "error": error[:2000]}
                kept = [r for r in self.results if r.get("run_id") == child]   # the rows it wrote before it died
                record(self.root, child, kept + [stage_row(child, self.run_id, "stages", failed, self.weights, "")])
                self.results.append({**failed, "run_id": child})
            raise StageRunFailed(error)

    def finish(self) -> dict:
        total = self._write("completed")
        table = Path(self.root) / "tables" / "runs" / f"run_id={self.run_id}"
        outputs = {"run table": str(table)}
        for r in self.results:
            if "metrics_table" in r:
                outputs.update({"metrics": r["metrics_table"], "grid": r["grid_png"]})
            elif r["stage"] == "evaluate" and r.get("run_id", self.run_id) != self.run_id:   # in a stage run
                outputs.update({"metrics": f"run {r['run_id']} (parent_run_id {self.run_id})",
                                "grid": str(Path(r["path"]) / "grid.png")})
        if total is not None:
            publish_report(self.run_id, self.results, total)
        # logged, so `prefect flow-run logs` and `prefect deployment run --watch` show it; Prefect's console
        # handler shows it in the terminal
        get_run_logger().info("\n" + format_report(self.run_id, self.results, outputs, total))
        _flush_logs()
        return {"run_id": self.run_id, "stages": self.results, "outputs": outputs, "total": total}


def _prefect_url(flow_run_id: str) -> str:
    """The flow run's page in the Prefect UI, where there is a server to show it ("" with the ephemeral API)."""
    if not flow_run_id or not _api_server():
        return ""
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run_id) or ""


def _flush_logs() -> None:
    """Send the run's logs to the API now: `prefect deployment run --watch` stops listening 3 s after the run's
    final state, and the log batch (every 2 s, later on a busy machine) would otherwise miss the stage table."""
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


def _alone(stage: str, config: TFConfig, config_path: str | None, root: str, run_id: str | None,
           force: str | None, levels: list[int] | None = None) -> dict:
    """A flow of one stage: the checks, the stage, the run's record."""
    run = _Run(stage, root, run_id)
    config = run.checked(config, config_path, levels, force=force)
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
                  run_id: str | None = None, force: Stage | None = None, score_new: bool = False) -> dict:
    """The judge (reused when complete), then the evaluation.

    score_new (the scheduled tf-evaluate's setting): score what changed since the last such run, i.e. this
    config's evaluation and those of the configs that runs since then trained models for, each one whose models
    are complete and whose evaluation is not; every other one gets a `nothing new` row saying why (already
    scored, and by which run; or waiting for its models, which only a pipeline or `tf train` trains). So a
    scheduled evaluation never fails for want of models, on a fresh root either: it waits for them."""
    run = _Run("evaluate", root, run_id)
    config = run.checked(config, config_path, force=force, score_new=score_new)
    due = [config]
    if score_new:
        from flows.scheduled import due_evaluations

        with run.recording("evaluate"):
            due, idle = due_evaluations(root, config, run.run_id)
        run.results += idle
    for wanted in due:
        for stage in ("judge", "evaluate"):
            run(stage, wanted, lambda: _stage(stage, wanted, root, run.run_id, force))
    return run.finish()


@flow(name="stages")
def stages_flow(stages: list[Stage] | None = None, config: TFConfig = DEFAULTS, config_path: str | None = None,
                root: str = "data", run_id: str | None = None, parent_run_id: str | None = None,
                force: Stage | None = None, after: list[Stage] | None = None):
    """The named stages (all, when None) one after the other in this process: what a routed pipeline starts on a
    work pool for each group of its stages that run there (`tf-stages-cpu`, `tf-stages-gpu`), as its child
    `parent_run_id`.
    `after`: stages that must show done in the pipeline's record first; this run loads its code meanwhile,
    and is cancelled if the pipeline ends before they are done (it failed in one of them)."""
    from prefect.states import Cancelled

    stages = list(stages or ORDER)
    run = _Run("stages", root, run_id, parent_run_id)
    config = run.checked(config, config_path, force=force, stages=stages, after=after)
    for stage in stages:   # imports (torch, timm, ...: seconds) while the stages before these run
        importlib.import_module(STAGE_MODULES[stage])
    if after and (ended := _wait_for_parent(root, parent_run_id or "", after, _parent_flow_ended)):
        return Cancelled(message=ended)
    fuse = "hierarchy" in stages   # encode then fills the teacher in its own pass where it can
    for stage in ORDER:
        if stage in stages:
            run(stage, config, lambda: _stage(stage, config, root, run.run_id, force,
                                              done=run.results if fuse else None))
    return run.finish()


STAGE_MODULES = {"ingest": "tasks.ingest.stage", "encode": "tasks.encode.stage", "hierarchy": "tasks.hierarchy.stage",
                 "train": "tasks.train.stage", "judge": "tasks.judge.stage", "evaluate": "tasks.evaluate.stage"}


def _wait_for_parent(root: str, parent: str, after: list[str], parent_ended: Callable[[], str | None],
                     poll_s: float = 1.0) -> str | None:
    """Until the stages `after` show done (computed or reused) in the record of the pipeline `parent` (its
    own rows, or its other stage runs'): None. `parent_ended()`'s reason, when the pipeline ended first."""
    while True:
        rows = load_run_family(root, parent)
        done = {row.stage.split("-")[0] for row in rows.itertuples()
                if row.kind == "stage" and row.status in ("computed", "reused")}
        if set(after) <= done:
            return None
        if ended := parent_ended():
            return f"pipeline run {parent} {ended} before {', '.join(sorted(set(after) - done))} could finish"
        time.sleep(poll_s)


def _parent_flow_ended() -> str | None:
    """How this subflow's parent flow run ended ("ended Failed"), None while it runs."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    parent = flow_run.get_parent_flow_run_id()
    if not parent:
        return None
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(parent).state
    return f"ended {state.name}" if state.is_final() else None


def stage_pool(stage: str) -> str:
    """The work pool a routed pipeline runs a stage on: image decoding (ingest, many processes) on `cpu`, the
    rest on `gpu`. The hierarchy too: its batched backend runs on the accelerator, and the reference backend
    on the gpu machine's CPUs costs less than a cpu stage run between two gpu ones (a run to start, a process
    and its imports: 15-30 s on 2 busy cores, bench/launch_overhead.py). Run tf-hierarchy on the cpu pool for
    a long reference clustering."""
    return "cpu" if stage == "ingest" else "gpu"


def stage_groups() -> list[tuple[str, tuple[str, ...]]]:
    """(pool, stages) for each run of consecutive stages on one pool, in pipeline order."""
    groups: list[tuple[str, tuple[str, ...]]] = []
    for stage in ORDER:
        pool = stage_pool(stage)
        if groups and groups[-1][0] == pool:
            groups[-1] = (pool, groups[-1][1] + (stage,))
        else:
            groups.append((pool, (stage,)))
    return groups


def _own_pool() -> str | None:
    """The work pool of the deployment this flow run belongs to (None outside a deployment run)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if not deployment.id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment.id).work_pool_name


@flow(name="pipeline")
def pipeline_flow(config: TFConfig = DEFAULTS, config_path: str | None = None, root: str = "data",
                  run_id: str | None = None, force: Stage | None = None,
                  stages_as_deployments: bool = False) -> dict:
    """image source -> ingest -> encode -> hierarchy -> train (decoder, levels) -> judge -> evaluate.

    stages_as_deployments: inside a deployment run, run each stage on its work pool (`stage_pool`: ingest on
    `cpu`, the rest on `gpu`): consecutive stages of one pool are one stage run (a run of `tf-stages-<pool>`,
    one process, so imports load once), and those of this run's own pool run here, with no run to start: from
    the cpu pool, ingest here and one gpu stage run for the rest. Every stage run starts at once and waits for
    the stages before it (flows.stages.stages_flow `after`), so its start overlaps them; the stages run one
    after the other, and the pipeline fails when one fails. Outside a deployment run (`tf pipeline`, a plain call) every
    stage runs in this process whatever it says."""
    run = _Run("pipeline", root, run_id)
    config = run.checked(config, config_path, force=force, stages_as_deployments=stages_as_deployments)
    pool = _own_pool() if stages_as_deployments else None
    groups = stage_groups() if pool else [(None, ORDER)]
    started = {}   # every stage run at once: each waits for the stages before it, so its start overlaps them
    for i, (where, stages) in enumerate(groups):
        if where is not None and where != pool:
            before = [stage for _, group in groups[:i] for stage in group]
            started[i] = run.start_deployed(stages, where, config, force, before)
    for i, (where, stages) in enumerate(groups):
        if i in started:
            run.deployed(started[i], stages, where)
        else:
            for stage in stages:
                run(stage, config, lambda: _stage(stage, config, root, run.run_id, force, done=run.results))
    return run.finish()


FLOWS = {"pipeline": pipeline_flow, "ingest": ingest_flow, "encode": encode_flow,
         "hierarchy": hierarchy_flow, "train": train_flow, "judge": judge_flow, "evaluate": evaluate_flow,
         "stages": stages_flow}
