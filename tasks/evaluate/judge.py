"""The evaluation's scenes judge (DESIGN §4): loaded for the streaming engine, and scored on held-out real scenes.

With source.kind scenes the evaluation loads the judge (training it first if its stage is not
complete), streams every decoded final image through it (the judge scorer of
models.evaluation.streaming_eval) and writes its metrics (models.evaluation.entries.judge: fd_scenes,
class_accuracy, judge_plan_ari / judge_plan_miou) under feature_extractor "scenes-judge" and
extractor_weights "judge-<key>". The same metrics on the judge's held-out real scenes are reference
values (variant "real_holdout"), computed here because they read the store: class accuracy against
the true label, ARI / mIoU of its partition against the ground truth at the token grid, and
fd_scenes of the held-out features against the real statistics (a real-vs-real floor; the held-out
scenes are part of the reference set). Other sources get every judge row as skipped, with the reason.
"""
from __future__ import annotations

import hashlib

import numpy as np

from models.evaluation.entries.judge import HOLDOUT, JUDGE
from models.evaluation.judge import EXTRACTOR, judge_features, judge_fn, judge_outputs, partition_scores
from models.evaluation.registry import MetricValues, pooled
from models.evaluation.metrics import feature_stats, frechet_distance
from storage.config import TFConfig
from storage.keys import Layout
from storage.scenes import masks_to_grid
from tasks.evaluate.reference import image_reference
from tasks.judge.stage import ensure_judge, load_judge, load_real_scenes


def judge_labels(layout: Layout) -> dict:
    return {"feature_extractor": EXTRACTOR, "extractor_weights": f"judge-{layout.keys.judge}" if layout.keys.judge else ""}


def prepare_judge(cfg: TFConfig, root: str, layout: Layout, index: np.ndarray, grid: int, device: str,
                  batch_size: int) -> dict | None:
    """None unless the source is scenes; else the judge, its streaming fn (per-token regions on `grid`)
    and the real statistics of its features over the store samples `index`."""
    if cfg.source.kind != "scenes":
        return None
    ensure_judge(cfg, root)   # reused: evaluate_run trains it first when it is missing
    model, meta = load_judge(layout.judge(), device)
    digest = hashlib.sha256((layout.judge() / "judge.safetensors").read_bytes()).hexdigest()[:12]
    run = judge_fn(model, grid, device, batch_size=min(batch_size, 128))

    def features(images: np.ndarray) -> np.ndarray:
        return judge_features(model, images, device=device, batch_size=min(batch_size, 128))

    # keyed by the weights' digest too: a re-trained judge (--force judge) never reads stale statistics
    reference, reused = image_reference(layout.images(), index, f"{EXTRACTOR}:{layout.keys.judge}:{digest}",
                                        feature_fns={"judge": features}, device=device, batch_size=batch_size)
    return {"model": model, "meta": meta, "fn": run, "grid": grid, "device": device,
            "reference": {k: v for k, v in reference.items() if k.startswith(f"{JUDGE}.")}, "reused": reused}


def holdout_values(judge: dict, layout: Layout, levels: int) -> dict[str, list[MetricValues]]:
    """The judge on its held-out real scenes, what its numbers look like when the images are real:
    supplied values of the judge's registry entries, by entry name (a level it has no partition for
    has none)."""
    real = load_real_scenes(layout.images(), np.asarray(judge["meta"]["holdout_index"], dtype=np.int64))
    out = judge_outputs(judge["model"], real["image"], grid=judge["grid"], device=judge["device"])
    held = len(real["index"])
    correct = (out["logits"].argmax(1) == real["label"]).astype(np.float64)
    ref = judge["reference"]
    fd = float("nan")
    if held >= 2 and f"{JUDGE}.mean" in ref:
        mu, sigma = feature_stats(out["features"])
        fd = frechet_distance(mu, sigma, ref[f"{JUDGE}.mean"], ref[f"{JUDGE}.cov"])
    scores = partition_scores(out["regions"], masks_to_grid(real["masks"], judge["grid"]))
    plan = [pooled("structure", metric, scores[key][level], held, level, HOLDOUT)
            for level in range(levels - 1) for metric, key in (("judge_plan_ari", "ari"), ("judge_plan_miou", "miou"))
            if level < len(scores[key])]
    return {"class_accuracy": [pooled("quality", "class_accuracy", float(correct.mean()), held, variant=HOLDOUT)],
            JUDGE: [pooled("quality", JUDGE, fd, held, variant=HOLDOUT)], "judge_plan": plan}
