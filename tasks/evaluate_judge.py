"""The evaluation's scenes-judge rows (DESIGN §4): FD-scenes, class accuracy, pixel-space plan adherence.

With source.kind scenes the evaluation loads the judge (training it first if its stage is not
complete), streams every decoded final image through it (models.streaming_eval's judge_fn) and
writes, under feature_extractor "scenes-judge" and extractor_weights "judge-<key>":

- quality fd_scenes: Frechet distance of the judge's penultimate features, generated finals against
  every real scene (statistics cached with the image store, as FD-DINOv2's are);
- quality class_accuracy: the judge's class of each generated final against its conditioning label;
- structure judge_plan_ari / judge_plan_miou per level: the judge's partition of the decoded final,
  put on the token grid, against the trajectory's own level-l regions (mirrors re-encode agreement);
- the same on the judge's held-out real scenes as reference rows (variant "real_holdout"): class
  accuracy against the true label, ARI / mIoU of its partition against the ground truth at the token
  grid, and fd_scenes of the held-out features against the real statistics (a real-vs-real floor;
  the held-out scenes are part of the reference set).

Other sources get every one of these rows as skipped, with the reason.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from models.eval_stats import JUDGE
from models.judge import EXTRACTOR, judge_features, judge_fn, judge_outputs, partition_scores
from models.metrics import feature_stats, frechet_distance
from models.trajectory_metrics import MetricValues
from storage.config import TFConfig
from storage.keys import Layout
from storage.scenes import masks_to_grid
from storage.tables import metric_row
from tasks.evaluate_reference import image_reference
from tasks.judge import NOT_SCENES, ensure_judge, load_judge, load_real_scenes

JUDGE_METRICS = ("fd_scenes", "class_accuracy", "judge_plan_ari", "judge_plan_miou")
FLAT_REASON = "flat baseline: no staged plan (own level regions) to compare the judge's partition with"


def judge_labels(layout: Layout) -> dict:
    return {"feature_extractor": EXTRACTOR, "extractor_weights": f"judge-{layout.keys.judge}" if layout.keys.judge else ""}


def prepare_judge(cfg: TFConfig, root: str, layout: Layout, index: np.ndarray, grid: int, device: str,
                  batch_size: int) -> dict | None:
    """None unless the source is scenes; else the judge, its streaming fn (per-token regions on `grid`)
    and the real statistics of its features over the store samples `index`."""
    if cfg.source.kind != "scenes":
        return None
    ensure_judge(cfg, root)   # reused when complete; trained here when evaluate runs without the pipeline
    model, meta = load_judge(layout.judge(), device)
    digest = hashlib.sha256((layout.judge() / "judge.safetensors").read_bytes()).hexdigest()[:12]
    run = judge_fn(model, grid, device, batch_size=min(batch_size, 128))

    def features(images: np.ndarray) -> np.ndarray:
        return judge_features(model, images, device=device, batch_size=min(batch_size, 128))

    # keyed by the weights' digest too: a re-trained judge (--force judge) never reads stale statistics
    reference, reused = image_reference(layout.images(), index, f"{EXTRACTOR}:{layout.keys.judge}:{digest}",
                                        feature_fns={JUDGE: features}, device=device, batch_size=batch_size)
    return {"model": model, "meta": meta, "fn": run, "grid": grid, "device": device,
            "reference": {k: v for k, v in reference.items() if k.startswith(f"{JUDGE}.")}, "reused": reused}


def _skipped(levels: int, reason: str, labels: dict, metrics=JUDGE_METRICS, variants=("",)) -> list[dict]:
    rows = []
    for variant in variants:
        for metric in metrics:
            group = "structure" if metric.startswith("judge_plan") else "quality"
            for level in (range(levels - 1) if group == "structure" else (-1,)):
                rows.append(metric_row(group, metric, None, level=level, variant=variant, status="skipped",
                                       reason=reason, **labels))
    return rows


def _holdout_rows(judge: dict, layout: Layout, levels: int, labels: dict) -> list[dict]:
    """The judge on its held-out real scenes: what its numbers look like when the images are real."""
    real = load_real_scenes(layout.images(), np.asarray(judge["meta"]["holdout_index"], dtype=np.int64))
    out = judge_outputs(judge["model"], real["image"], grid=judge["grid"], device=judge["device"])
    held = len(real["index"])
    correct = (out["logits"].argmax(1) == real["label"]).astype(np.float64)
    rows = [metric_row("quality", "class_accuracy", float(correct.mean()), variant="real_holdout", n=held, **labels)]
    ref = judge["reference"]
    fd = None
    if held >= 2 and f"{JUDGE}.mean" in ref:
        mu, sigma = feature_stats(out["features"])
        fd = frechet_distance(mu, sigma, ref[f"{JUDGE}.mean"], ref[f"{JUDGE}.cov"])
    rows.append(metric_row("quality", "fd_scenes", fd, variant="real_holdout", n=held, **labels))
    truth = masks_to_grid(real["masks"], judge["grid"])
    scores = partition_scores(out["regions"], truth)
    for level in range(levels - 1):
        for metric, key in (("judge_plan_ari", "ari"), ("judge_plan_miou", "miou")):
            value = scores[key][level] if level < len(scores[key]) else None
            rows.append(metric_row("structure", metric, value, level=level, variant="real_holdout", n=held,
                                   reason="" if value is not None else "the judge has no partition at this level",
                                   **labels))
    return rows


def judge_rows(cfg: TFConfig, layout: Layout, judge: dict | None, values: list[MetricValues], levels: int,
               flat: bool, make_rows: Callable[..., list[dict]]) -> list[dict]:
    """Every scenes-judge row of one evaluation. values: the metric_values entries in JUDGE_METRICS;
    make_rows(values, **labels): the evaluation's own rows-with-intervals writer."""
    labels = judge_labels(layout)
    if judge is None:
        reason = NOT_SCENES + f" (source.kind is {cfg.source.kind!r})"
        return _skipped(levels, reason, labels, variants=("", "real_holdout"))
    rows = make_rows(values, **labels)
    have = {(r["metric"], r["level"]) for r in rows}
    missing = [m for m in ("fd_scenes", "class_accuracy") if (m, -1) not in have]
    rows += _skipped(levels, "too few samples for this metric", labels, metrics=missing)
    if flat:
        rows += _skipped(levels, FLAT_REASON, labels, metrics=("judge_plan_ari", "judge_plan_miou"))
    elif not any(m.startswith("judge_plan") for m, _ in have):
        rows += _skipped(levels, "no structure-scored samples (evaluate.structure_samples = 0)", labels,
                         metrics=("judge_plan_ari", "judge_plan_miou"))
    return rows + _holdout_rows(judge, layout, levels, labels)

