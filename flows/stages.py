"""One Prefect flow per stage, and `pipeline`, which chains them (DESIGN §1 data flow).

image source -> ingest -> encode -> hierarchy -> train (decoder, level 0..L-1) -> evaluate
                    ingest -> judge (scenes only: a small network on the real scenes) -> evaluate

With `generator.mode: flat` the train stage trains the flat baseline (one one-step model straight to
the latent) in place of the level generators, and evaluate samples and scores it (tasks.evaluate).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from prefect import flow, get_run_logger

from flows.report import format_report, publish_failure, publish_report, record_failure, record_run
from storage.config import TFConfig
from storage.keys import Stage
from storage.tables import claim_run_id
from tasks.encode import encode_latents
from tasks.evaluate import evaluate_run
from tasks.hierarchy import build_teacher
from tasks.ingest import ingest_images
from tasks.judge import train_judge_task
from tasks.train import train_decoder_task, train_flat_task, train_level_task, train_shared_task


# Each stage's upstream stages: the judge reads the real scenes only, so it hangs off ingest.
UPSTREAM = {"ingest": (), "encode": ("ingest",), "hierarchy": ("encode",), "train": ("hierarchy",),
            "judge": ("ingest",), "evaluate": ("train", "judge")}
ORDER = tuple(UPSTREAM)


def forced(stage: str, force: str | None) -> bool:
    """`--force X` recomputes X and everything downstream of it."""
    return force is not None and (stage == force or any(forced(up, force) for up in UPSTREAM[stage]))


def _judge(config: TFConfig, root: str, force: bool) -> list[dict]:
    """The scenes judge, which evaluate scores with; other sources have none (their judge rows say skipped)."""
    return [train_judge_task(config, root, force)] if config.source.kind == "scenes" else []


def _weights(results: list[dict]) -> str:
    """The encoder weights label the stages report (the encode stage's), for every row of the run."""
    return next((r["encoder_weights"] for r in results if "encoder_weights" in r), "")


def _finish(flow_name: str, config: TFConfig, root: str, run_id: str, results: list[dict]) -> dict:
    table = record_run(root, run_id, flow_name, results, _weights(results))
    publish_report(run_id, results)
    outputs = {"run table": str(table)}
    for r in results:
        if "metrics_table" in r:
            outputs.update({"metrics": r["metrics_table"], "grid": r["grid_png"]})
    # logged, so `prefect flow-run logs` holds it too; Prefect's console handler shows it in the terminal
    get_run_logger().info("\n" + format_report(run_id, results, outputs))
    return {"run_id": run_id, "stages": results, "outputs": outputs}


class _Run:
    """One flow run's stages in order: `run("encode", work)` runs a stage and keeps its results; when a
    stage raises, the run's record still lands (the stages done, then a `failed` row naming the stage
    and the error) with a Prefect artifact, and the error goes on up."""

    def __init__(self, flow_name: str, config: TFConfig, root: str, run_id: str | None):
        self.flow_name, self.config, self.root = flow_name, config, root
        self.run_id = claim_run_id(root, run_id)
        self.results: list[dict] = []
        self.started = time.monotonic()

    def __call__(self, stage: str, work: Callable[[], dict | list[dict]]) -> None:
        try:
            out = work()
        except Exception as error:
            record_failure(self.root, self.run_id, self.flow_name, self.results, stage, error,
                           time.monotonic() - self.started, _weights(self.results))
            publish_failure(self.run_id, stage, error)
            raise
        self.results += out if isinstance(out, list) else [out]

    def finish(self) -> dict:
        return _finish(self.flow_name, self.config, self.root, self.run_id, self.results)


@flow(name="ingest")
def ingest_flow(config: TFConfig = TFConfig(), root: str = "data", run_id: str | None = None,
                force: Stage | None = None) -> dict:
    run = _Run("ingest", config, root, run_id)
    run("ingest", lambda: ingest_images(config, root, forced("ingest", force)))
    return run.finish()


@flow(name="encode")
def encode_flow(config: TFConfig = TFConfig(), root: str = "data", run_id: str | None = None,
                force: Stage | None = None) -> dict:
    run = _Run("encode", config, root, run_id)
    run("encode", lambda: encode_latents(config, root, forced("encode", force)))
    return run.finish()


@flow(name="hierarchy")
def hierarchy_flow(config: TFConfig = TFConfig(), root: str = "data", run_id: str | None = None,
                   force: Stage | None = None) -> dict:
    run = _Run("hierarchy", config, root, run_id)
    run("hierarchy", lambda: build_teacher(config, root, forced("hierarchy", force)))
    return run.finish()


def _train(config: TFConfig, root: str, levels: list[int] | None, force: bool) -> list[dict]:
    if config.generator.mode == "flat":   # one model for the whole latent: there are no levels to pick
        if levels is not None:
            raise ValueError("generator.mode is flat: --levels does not apply (the flat model has no levels)")
        return [train_decoder_task(config, root, force), train_flat_task(config, root, force)]
    if config.generator.sharing == "shared":   # one model for every level: --level names none of its own
        if levels is not None:
            raise ValueError("generator.sharing is shared: --levels does not apply (one model serves every level)")
        return [train_decoder_task(config, root, force), train_shared_task(config, root, force)]
    wanted = range(config.hierarchy.num_levels) if levels is None else levels
    return [train_decoder_task(config, root, force)] + [train_level_task(config, root, l, force) for l in wanted]


@flow(name="train")
def train_flow(config: TFConfig = TFConfig(), root: str = "data", levels: list[int] | None = None,
               run_id: str | None = None, force: Stage | None = None) -> dict:
    run = _Run("train", config, root, run_id)
    run("train", lambda: _train(config, root, levels, forced("train", force)))
    return run.finish()


@flow(name="judge")
def judge_flow(config: TFConfig = TFConfig(), root: str = "data", run_id: str | None = None,
               force: Stage | None = None) -> dict:
    run = _Run("judge", config, root, run_id)

    def judge() -> list[dict]:
        if config.source.kind != "scenes":
            raise ValueError(f"the scenes judge needs source.kind 'scenes', got {config.source.kind!r}")
        return _judge(config, root, forced("judge", force))

    run("judge", judge)
    return run.finish()


@flow(name="evaluate")
def evaluate_flow(config: TFConfig = TFConfig(), root: str = "data", run_id: str | None = None,
                  force: Stage | None = None) -> dict:
    run = _Run("evaluate", config, root, run_id)
    run("judge", lambda: _judge(config, root, forced("judge", force)))   # reused when complete
    run("evaluate", lambda: evaluate_run(config, root, run.run_id, forced("evaluate", force)))
    return run.finish()


@flow(name="pipeline")
def pipeline_flow(config: TFConfig = TFConfig(), root: str = "data", run_id: str | None = None,
                  force: Stage | None = None) -> dict:
    """image source -> ingest -> encode -> hierarchy -> train (decoder, levels) -> judge -> evaluate."""
    run = _Run("pipeline", config, root, run_id)
    run("ingest", lambda: ingest_images(config, root, forced("ingest", force)))
    run("encode", lambda: encode_latents(config, root, forced("encode", force)))
    run("hierarchy", lambda: build_teacher(config, root, forced("hierarchy", force)))
    run("train", lambda: _train(config, root, None, forced("train", force)))
    run("judge", lambda: _judge(config, root, forced("judge", force)))
    run("evaluate", lambda: evaluate_run(config, root, run.run_id, forced("evaluate", force)))
    return run.finish()


FLOWS = {"pipeline": pipeline_flow, "ingest": ingest_flow, "encode": encode_flow,
         "hierarchy": hierarchy_flow, "train": train_flow, "judge": judge_flow, "evaluate": evaluate_flow}
