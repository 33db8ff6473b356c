"""The scenes judge: shapes, id-free targets, a short training run that beats chance, FD-scenes wiring."""
import numpy as np
import pytest
import torch

from models.evaluation.eval_stats import JUDGE, metric_values, reference_stats
from models.evaluation.judge import (JudgeTraining, SceneJudge, SceneJudgeConfig, canonical_regions, class_slots, holdout_scores,
                          judge_fn, mode_pool, train_judge)
from models.evaluation.metrics import StreamingStats, matched_miou
from models.evaluation.streaming_eval import StreamingEvalResult
from storage.scenes import masks_to_grid, render_scenes


@pytest.mark.parametrize("input_size,stem,segment", [(56, 1, 28), (112, 2, 28), (64, 2, 16)])
def test_forward_shapes(input_size, stem, segment, single_thread):
    model = SceneJudge(SceneJudgeConfig(6, (2, 5, 9), input_size=input_size, stem_stride=stem, width=8,
                                        feature_dim=32)).eval()
    out = model(torch.randn(3, 3, input_size, input_size))
    assert out["features"].shape == (3, 32) and out["logits"].shape == (3, 6)
    assert [s.shape for s in out["segments"]] == [(3, k, segment, segment) for k in (2, 5, 9)]
    assert model.config.segment_size == segment
    with torch.no_grad():   # the evaluation's view: per-token regions on the token grid
        verdict = judge_fn(model, grid=4)(np.zeros((2, 56, 56, 3), np.uint8))
    assert verdict["regions"].shape == (2, 3, 4, 4) and verdict["features"].shape == (2, 32)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        SceneJudgeConfig(6, (2, 5), input_size=60, stem_stride=2)
    with pytest.raises(ValueError):
        SceneJudgeConfig(6, (1, 5))


def test_canonical_targets_count_regions_from_the_last_drawn():
    masks = np.array([[[[0, 1, 1, 1]], [[0, 1, 3, 2]]]], np.uint8)   # [1 image, 2 levels, 1 x 4]
    assert canonical_regions(masks).tolist() == [[[[0, 1, 1, 1]], [[0, 3, 1, 2]]]]
    # the partition is the same up to renaming, so ARI / mIoU against it are unchanged
    assert matched_miou(canonical_regions(masks)[0, 1], masks[0, 1]) == 1.0


def test_mode_pool_is_the_ground_truths_majority_vote():
    masks = render_scenes(range(4), seed=3, size=56)["masks"]
    for grid in (4, 14, 28):
        ours = torch.stack([mode_pool(torch.from_numpy(masks[:, l].astype(np.int64)), grid, 32) for l in range(3)], 1)
        assert np.array_equal(ours.numpy(), masks_to_grid(masks, grid))


def test_a_short_training_run_on_tiny_scenes_beats_chance_clearly(single_thread):
    data = render_scenes(range(144), seed=0, size=56)   # configs/tiny.yaml's scene size
    train, test = slice(0, 120), slice(120, 144)
    torch.manual_seed(0)
    model = SceneJudge(SceneJudgeConfig(6, class_slots(data["masks"][train]), input_size=56, stem_stride=1, width=8))
    history = train_judge(model, data["image"][train], data["label"][train], data["masks"][train],
                          JudgeTraining(steps=60, batch_size=16, lr=5e-3))
    assert history["loss"][-1] < history["loss"][0]
    scores = holdout_scores(model, data["image"][test], data["label"][test], data["masks"][test],
                            masks_to_grid(data["masks"][test], 4), 4)
    assert scores["accuracy"] >= 0.5   # chance: 1/6
    # an all-background partition is the trivial answer: the judge must separate the object clearly
    trivial = np.mean([matched_miou(np.zeros_like(m[0]), m[0]) for m in data["masks"][test]])
    assert scores["miou"][0] > trivial + 0.2, (scores["miou"], trivial)
    assert len(scores["miou_grid"]) == len(scores["ari_grid"]) == 3


def test_a_judge_training_that_turns_nan_stops_naming_the_update(single_thread):
    from models.nonfinite import NonFiniteTraining

    data = render_scenes(range(32), seed=0, size=56)
    torch.manual_seed(0)
    model = SceneJudge(SceneJudgeConfig(6, class_slots(data["masks"]), input_size=56, stem_stride=1, width=8))
    with pytest.raises(NonFiniteTraining, match=r"non-finite (loss|gradient norm) at update \d+"):
        train_judge(model, data["image"], data["label"], data["masks"], JudgeTraining(steps=30, batch_size=8, lr=1e6))


def _spread(mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Points m +- scale_i * sqrt(2D - 1) e_i / sqrt(2): mean exactly m, unbiased covariance exactly diag(scale^2)."""
    dim = len(mean)
    offsets = np.diag(scale * np.sqrt((2 * dim - 1) / 2.0))
    return np.concatenate([mean + offsets, mean - offsets])


def test_fd_scenes_is_the_frechet_distance_of_the_judge_features():
    """Identity features of two point sets with known Gaussian fits: FD = |m1-m2|^2 + sum (s1 - s2)^2."""
    real = _spread(np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 0.5]))
    fake = _spread(np.array([1.0, 1.0, 0.0]), np.array([2.0, 2.0, 1.5]))
    identity = {"judge": lambda images: images.reshape(len(images), -1)}
    reference = reference_stats([(real[:2], []), (real[2:], [])], None, feature_fns=identity, tokens_per_sample=0)
    generated = StreamingStats(3)
    generated.update(fake)
    result = StreamingEvalResult(num_samples=len(fake), num_levels=2, stats={JUDGE: generated},
                                 per_sample={"class_correct": np.array([1.0, 0.0, 1.0, 1.0])}, kept=None,
                                 reservoirs={}, timing={}, counts={})
    values = {v.metric: v for v in metric_values(result, reference)}
    expected = 1.0 + 0.0 + 4.0 + (1 - 2) ** 2 + 0.0 + (0.5 - 1.5) ** 2
    assert values["fd_scenes"].values[0] == pytest.approx(expected, rel=1e-9)
    assert values["fd_scenes"].extra["n"] == len(fake) and values["fd_scenes"].pooled
    assert values["class_accuracy"].values.mean() == 0.75 and not values["class_accuracy"].pooled
