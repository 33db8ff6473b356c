"""The streaming evaluation engine against the all-in-memory computation on the same samples."""
import numpy as np
import pytest
import timm
import torch
from torch import nn

from models.decoder import DecoderSpec, TokenDecoder, tensor_to_images
from models.encoder import encode_images
from models.hierarchy.reference import build_hierarchies, region_canvas
from models.evaluation.metrics import fd_from_features, feature_stats
from models.evaluation.streaming_eval import (DINOV2, FID, KID_FEATURES, PHASES, Runtime, Scorers,
                                   evaluate_streaming, level_key, metric_values, reference_stats, token_subsample)
from models.generator.trajectory import level_noises, sample_trajectory
from tasks.evaluate.structure_pool import process_structure
from models.evaluation.trajectory_metrics import (generated_regions, per_level_fd, reencode_agreement,
                                       structural_consistency)
from specs import eval_plan, hierarchy_spec

LEVELS, GRID, C, CLASSES, PATCH = 4, 4, 16, 5, 14
T = GRID * GRID
N, KEEP, REENCODE, TOKENS = 24, 5, 6, 3
THRESHOLD = 0.05
SPEC = hierarchy_spec(cuts=(0.65, 0.35))
SEEDS = 1_000 + np.arange(N)
LABEL_POOL = np.array([0, 1, 1, 3, 4])


class StubGenerator(nn.Module):
    """Real interface; elementwise maths and region means over a partition read off z and cond, so every
    sample's canvas is bit-identical in any batch and the partitioned levels are piecewise constant."""

    def __init__(self, level: int):
        super().__init__()
        g = torch.Generator().manual_seed(level)
        self.scale = nn.Parameter(torch.randn(C, generator=g))
        self.label_embed = nn.Parameter(torch.randn(CLASSES, C, generator=g))
        self.regions = (2, 4, 7, 0)[level]

    def forward(self, z, h, cond, label, level):
        base = torch.tanh(z * self.scale + 0.5 * cond + self.label_embed[label][:, None, :])
        if self.regions:
            ids = (z[..., : self.regions] + cond[..., : self.regions]).argmax(-1)
            base = region_canvas(base, ids)
        return base, z - base


def stub_dinov2(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float64) / 255.0
    return np.concatenate([x.mean((1, 2)), x.std((1, 2))], 1)            # [n, 6]


def stub_inception(images: np.ndarray) -> dict:
    x = images.astype(np.float64) / 255.0
    half = x.shape[1] // 2
    pool = np.concatenate([x[:, :half].mean((1, 2)), x[:, half:].mean((1, 2))], 1)   # [n, 6]
    logits = np.concatenate([pool * 7.0, x.max((1, 2))], 1)                           # [n, 9]
    return {"pool": pool.astype(np.float32), "logits": logits.astype(np.float32)}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    generators = [StubGenerator(level).eval() for level in range(LEVELS)]
    decoder = TokenDecoder(DecoderSpec(token_dim=C, grid=GRID, patch=PATCH, width=32, depth=1, heads=2))
    nn.init.normal_(decoder.head.weight, std=0.3)   # the zero head would paint every image grey
    decoder.eval()
    encoder = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=GRID * PATCH,
                                depth=2, embed_dim=32, num_heads=2, num_classes=0).eval()
    return generators, decoder, encoder


@pytest.fixture(scope="module")
def real():
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(N, GRID * PATCH, GRID * PATCH, 3), dtype=np.uint8)
    canvases = [rng.standard_normal((N, T, C)).astype(np.float32) for _ in range(LEVELS)]
    return images, canvases


@pytest.fixture(scope="module")
def reference(real):
    images, canvases = real
    batches = [(images[i:i + 7], [c[i:i + 7] for c in canvases]) for i in range(0, N, 7)]
    return reference_stats(batches, stub_dinov2, inception_fn=stub_inception, tokens_per_sample=TOKENS)


@pytest.fixture(scope="module")
def in_memory(models):
    """What tasks/evaluate/stage.py computes with everything in memory."""
    generators, decoder, encoder = models
    labels = np.random.default_rng(0).choice(LABEL_POOL, N)
    noises = level_noises(LEVELS, T, C, SEEDS.tolist(), "cpu")
    with torch.no_grad():
        trajectory = sample_trajectory(generators, noises, torch.from_numpy(labels))
        generated = [c.float().numpy() for c in trajectory]
        images = [tensor_to_images(decoder(c)) for c in trajectory]
    regions = generated_regions(generated, THRESHOLD)
    reencoded = encode_images(encoder, images[-1][:REENCODE])
    rebuilt = build_hierarchies(reencoded, SPEC).reshape(REENCODE, LEVELS - 1, -1)
    final_ids = build_hierarchies(generated[-1][:REENCODE].reshape(REENCODE, GRID, GRID, C), SPEC)
    final_ids = final_ids.reshape(REENCODE, LEVELS - 1, -1)
    return {"labels": labels, "generated": generated, "images": images, "regions": regions,
            "structure": structural_consistency(generated, regions),
            "reencode": reencode_agreement([r[:REENCODE] for r in regions], rebuilt),
            "reencode_final": reencode_agreement([final_ids[:, l] for l in range(LEVELS - 1)], rebuilt),
            "dinov2": stub_dinov2(images[-1]), "inception": stub_inception(images[-1])}


def run(models, batch_size, judge=None, runtime=Runtime(), **plan):
    generators, decoder, encoder = models
    scorers = Scorers(stub_dinov2, stub_inception, judge, encoder, SPEC)
    options = dict(batch_size=batch_size, keep=KEEP, reencode_samples=REENCODE, tokens_per_sample=TOKENS,
                   region_threshold=THRESHOLD, label_seed=0)   # label_seed: as `in_memory` draws them
    return evaluate_streaming(generators, decoder, SEEDS, LABEL_POOL, scorers, eval_plan(**{**options, **plan}), runtime)


@pytest.fixture(scope="module")
def results(models):
    return {batch: run(models, batch) for batch in (3, 16, N)}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def by_key(values):
    return {(v.group, v.metric, v.level, v.variant): v for v in values}


def test_streamed_fd_equals_in_memory(results, in_memory, reference, real):
    real_images, real_canvases = real
    real_picks = token_subsample(np.arange(N), T, TOKENS)
    gen_picks = token_subsample(np.arange(N), T, TOKENS)
    expected = {("quality", DINOV2, -1, ""): fd_from_features(in_memory["dinov2"], stub_dinov2(real_images)),
                ("quality", FID, -1, ""): fd_from_features(in_memory["inception"]["pool"],
                                                           stub_inception(real_images)["pool"])}
    for level, (gen, ref) in enumerate(zip(in_memory["generated"], real_canvases)):
        expected[("per_level", "fd_level", level, "mean_pooled")] = fd_from_features(
            gen.astype(np.float64).mean(1), ref.astype(np.float64).mean(1))
        expected[("per_level", "fd_level", level, "tokens")] = fd_from_features(
            np.take_along_axis(gen, gen_picks[..., None], 1).reshape(-1, C),
            np.take_along_axis(ref, real_picks[..., None], 1).reshape(-1, C))
    pooled_in_float32 = {(v.level, v.variant): float(v.values[0])
                         for v in per_level_fd(in_memory["generated"], real_canvases) if v.variant == "mean_pooled"}
    for batch, result in results.items():
        values = by_key(metric_values(result, reference))
        for key, value in expected.items():
            assert rel(float(values[key].values[0]), value) < 1e-6, (batch, key)
            assert values[key].pooled
        for level in range(LEVELS):   # the existing per_level_fd pools in float32; the engine in float64
            streamed = float(values[("per_level", "fd_level", level, "mean_pooled")].values[0])
            assert rel(streamed, pooled_in_float32[(level, "mean_pooled")]) < 1e-4
        stats = result.stats[DINOV2]
        mu, sigma = feature_stats(in_memory["dinov2"])
        np.testing.assert_allclose(stats.mean, mu, rtol=1e-10)
        np.testing.assert_allclose(stats.cov, sigma, rtol=1e-9, atol=1e-14)
        assert stats.count == N


def test_per_sample_structure_is_identical_for_any_batch_size(results, in_memory):
    expected = {}
    for v in in_memory["structure"] + in_memory["reencode"]:
        expected.setdefault(v.metric, []).append(v.values)
    for v in in_memory["reencode_final"]:
        expected.setdefault(v.metric + "_final", []).append(v.values)
    expected = {metric: np.stack(columns, 1) for metric, columns in expected.items()}
    assert expected["nesting"].shape == (N, LEVELS - 2) and expected["reencode_ari"].shape == (REENCODE, LEVELS - 1)
    assert np.isfinite(expected["plan_adherence"]).all() and 0 < np.nanmean(expected["nesting"]) <= 1
    for batch, result in results.items():
        for metric, array in expected.items():
            np.testing.assert_array_equal(result.per_sample[metric], array, err_msg=f"{metric} batch {batch}")
        values = [v for v in metric_values(result, {}) if v.group == "structure"]
        assert [(v.metric, v.level) for v in values] == (
            [("nesting", l) for l in range(LEVELS - 2)] + [("plan_adherence", l) for l in range(LEVELS - 1)]
            + [(m, l) for m in ("reencode_ari", "reencode_miou") for l in range(LEVELS - 1)] * 2)
        assert {v.variant for v in values if v.metric == "reencode_ari"} == {"", "final_hierarchy"}


def test_kept_subset_is_the_first_k_trajectories(results, in_memory):
    for result in results.values():
        kept = result.kept
        np.testing.assert_array_equal(kept.seeds, SEEDS[:KEEP])
        np.testing.assert_array_equal(kept.labels, in_memory["labels"][:KEEP])
        np.testing.assert_array_equal(kept.canvases, np.stack(in_memory["generated"], 1)[:KEEP])
        np.testing.assert_array_equal(kept.images, np.stack(in_memory["images"], 1)[:KEEP])
        np.testing.assert_array_equal(kept.regions, np.stack(in_memory["regions"], 1)[:KEEP])
        assert kept.canvases.shape == (KEEP, LEVELS, T, C) and kept.images.dtype == np.uint8


def test_reservoirs_hold_their_caps_and_are_the_first_samples(models, in_memory, reference):
    result = run(models, 5, kid_reservoir=7, is_reservoir=11, reencode_samples=0, structure_samples=4)
    np.testing.assert_array_equal(result.inception_pool, in_memory["inception"]["pool"][:7])
    np.testing.assert_array_equal(result.inception_logits, in_memory["inception"]["logits"][:11])
    assert result.counts["kid_reservoir"] == 7 and result.counts["is_reservoir"] == 11
    assert result.per_sample["plan_adherence"].shape == (4, LEVELS - 1) and "reencode_ari" not in result.per_sample
    values = by_key(metric_values(result, reference, kid_subset_size=5, kid_subsets=3))
    assert values[("quality", "kid_mean", -1, "")].extra["n"] == 7 and values[("quality", "kid_std", -1, "")].pooled
    assert values[("quality", "is_mean", -1, "")].extra["n"] == 11 and values[("quality", "is_mean", -1, "")].extra["splits"] == 5


def test_timing_and_counts(results):
    for batch, result in results.items():
        assert set(PHASES) | {"structure_cpu", "structure_copy", "features_busy", "total"} <= set(result.timing)
        assert all(v >= 0 for v in result.timing.values()) and result.timing["structure_cpu"] > 0
        assert result.counts["samples"] == N and result.counts["batches"] == -(-N // batch)
        assert result.counts["reencode_samples"] == REENCODE and result.counts["kept"] == KEEP


def test_threads_and_worker_processes_match_inline(models, results):
    result = run(models, 10, runtime=Runtime(noise_threads=2, structure_runner=process_structure(1, 2),
                                             overlap_features=True))
    inline = results[3]
    for metric in ("nesting", "plan_adherence", "reencode_ari", "reencode_miou", "reencode_ari_final"):
        np.testing.assert_array_equal(result.per_sample[metric], inline.per_sample[metric])
    np.testing.assert_array_equal(result.kept.regions, inline.kept.regions)
    assert result.timing["structure_cpu"] > 0 and result.timing["features_busy"] > 0
    for name in (DINOV2, FID):
        np.testing.assert_allclose(result.stats[name].cov, inline.stats[name].cov, rtol=1e-9, atol=1e-14)
    np.testing.assert_array_equal(result.inception_logits, inline.inception_logits)
    np.testing.assert_allclose(result.stats[level_key(3, "tokens")].cov, inline.stats[level_key(3, "tokens")].cov,
                               rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("structure_runner", [None, process_structure(1, 2)], ids=["inline", "processes"])
def test_regions_found_on_the_device_in_batch_give_the_same_scores(models, results, structure_runner):
    """regions_on_device: the generated regions come from the batched merge loop (here its torch loop on the
    CPU; the Triton kernel on CUDA) instead of scipy in the structure runner, and the plan adherence with them,
    so the runner gets canvases only for the re-encoded rows: every value is the same (plan adherence up to
    float64 summation order)."""
    result = run(models, 10, runtime=Runtime(structure_runner=structure_runner, regions_on_device=True))
    inline = results[3]
    for metric in ("nesting", "reencode_ari", "reencode_miou", "reencode_ari_final"):
        np.testing.assert_array_equal(result.per_sample[metric], inline.per_sample[metric])
    np.testing.assert_allclose(result.per_sample["plan_adherence"], inline.per_sample["plan_adherence"],
                               rtol=1e-12, atol=1e-14)
    assert result.per_sample["plan_adherence"].shape == inline.per_sample["plan_adherence"].shape
    np.testing.assert_array_equal(result.kept.regions, inline.kept.regions)


def test_reference_stats_stream(real, reference):
    images, canvases = real
    whole = reference_stats([(images, canvases)], stub_dinov2, inception_fn=stub_inception, tokens_per_sample=TOKENS)
    assert set(whole) == set(reference)
    for key, value in reference.items():
        np.testing.assert_allclose(value, whole[key], rtol=1e-9, atol=1e-14, err_msg=key)
    mu, sigma = feature_stats(stub_inception(images)["pool"])
    np.testing.assert_allclose(reference[f"{FID}.mean"], mu, rtol=1e-6)
    np.testing.assert_allclose(reference[f"{FID}.cov"], sigma, rtol=1e-5, atol=1e-12)
    assert int(reference[f"{level_key(0, 'tokens')}.count"]) == N * TOKENS
    assert reference[KID_FEATURES].shape == (N, 6)


def test_token_subsample_depends_on_the_sample_only():
    whole = token_subsample(np.arange(50), T, 4, seed=3)
    assert whole.shape == (50, 4) and whole.min() >= 0 and whole.max() < T
    np.testing.assert_array_equal(token_subsample(np.arange(20, 30), T, 4, seed=3), whole[20:30])
    assert not np.array_equal(token_subsample(np.arange(50), T, 4, seed=4), whole)


def test_flat_mode_scores_the_final_latent_alone(models, in_memory, reference, real):
    """The flat baseline: one model, one step from the last level's noise; only what a final latent has."""
    from models.generator.flat import sample_flat

    _, decoder, encoder = models
    flat_model = StubGenerator(LEVELS - 1).eval()
    labels = torch.from_numpy(in_memory["labels"])
    with torch.no_grad():
        final = sample_flat(flat_model, level_noises(LEVELS, T, C, SEEDS.tolist())[-1], labels, LEVELS).numpy()
        images = tensor_to_images(decoder(torch.from_numpy(final)))
    rebuilt = build_hierarchies(encode_images(encoder, images[:REENCODE]), SPEC).reshape(REENCODE, LEVELS - 1, -1)
    m = max(KEEP, REENCODE)
    own = build_hierarchies(final[:m].reshape(m, GRID, GRID, C), SPEC).reshape(m, LEVELS - 1, -1)
    expected = reencode_agreement([own[:REENCODE, l] for l in range(LEVELS - 1)], rebuilt)
    for batch, runner in ((5, None), (10, process_structure(1, 2))):
        result = evaluate_streaming([flat_model], decoder, SEEDS, LABEL_POOL,
                                    Scorers(stub_dinov2, stub_inception, encoder=encoder, hierarchy_spec=SPEC),
                                    eval_plan(batch_size=batch, keep=KEEP, reencode_samples=REENCODE,
                                              tokens_per_sample=TOKENS, mode="flat", label_seed=0),
                                    Runtime(structure_runner=runner))
        assert result.mode == "flat" and result.kept.canvases.shape == (KEEP, 1, T, C)
        np.testing.assert_array_equal(result.kept.canvases[:, 0], final[:KEEP])
        np.testing.assert_array_equal(result.kept.images[:, 0], images[:KEEP])
        np.testing.assert_array_equal(result.kept.regions, own[:KEEP])
        values = by_key(metric_values(result, reference))
        assert {k[2] for k in values if k[1] == "fd_level"} == {LEVELS - 1}
        assert not [k for k in values if k[1] in ("nesting", "plan_adherence")]
        assert {k[3] for k in values if k[1] in ("reencode_ari", "reencode_miou")} == {"final_hierarchy"}
        for v in expected:
            np.testing.assert_array_equal(values[("structure", v.metric, v.level, "final_hierarchy")].values, v.values)
        assert rel(float(values[("quality", DINOV2, -1, "")].values[0]),
                   fd_from_features(stub_dinov2(images), stub_dinov2(real[0]))) < 1e-6


def stub_judge(images: np.ndarray) -> dict:
    """The scenes judge's interface: features, class logits and a partition per token (brightness bands)."""
    x = images.astype(np.float64) / 255.0
    tokens = x.reshape(len(x), GRID, PATCH, GRID, PATCH, 3).mean((2, 4, 5))            # [n, g, g]
    flat = tokens.reshape(len(x), -1)   # bands at each image's own brightness quantiles (batch-independent)
    bands = np.stack([sum(tokens > np.quantile(flat, q, axis=1)[:, None, None] for q in cuts)
                      for cuts in ([0.5], [0.3, 0.7], [0.2, 0.5, 0.8])], 1)
    return {"features": stub_dinov2(images), "logits": np.concatenate([x.mean((1, 2)), x.std((1, 2))[:, :2]], 1),
            "regions": bands}


def test_judge_rows_stream_like_in_memory(models, in_memory, real):
    """FD-scenes, class accuracy and the judge's partition against the trajectory's own regions, inline and
    in worker processes, equal the same computed on the whole set at once."""
    real_images, _ = real
    reference = reference_stats([(real_images, [])], None, feature_fns={"judge": lambda im: stub_judge(im)["features"]},
                                tokens_per_sample=0)
    verdict = stub_judge(in_memory["images"][-1])
    expected = reencode_agreement(in_memory["regions"], verdict["regions"].reshape(N, 3, -1))
    assert all(np.ptp(v.values) > 0 for v in expected)   # the stub partitions are not degenerate
    for result in (run(models, 5, judge=stub_judge),
                   run(models, 10, judge=stub_judge, runtime=Runtime(structure_runner=process_structure(1, 2)))):
        values = by_key(metric_values(result, reference))
        fd = fd_from_features(verdict["features"], stub_judge(real_images)["features"])
        assert rel(values[("quality", "fd_scenes", -1, "")].values[0], fd) < 1e-6
        correct = verdict["logits"].argmax(1) == in_memory["labels"]
        np.testing.assert_array_equal(values[("quality", "class_accuracy", -1, "")].values, correct)
        for v in expected:
            metric = v.metric.replace("reencode", "judge_plan")
            np.testing.assert_array_equal(result.per_sample[metric][:, v.level], v.values)
            np.testing.assert_array_equal(values[("structure", metric, v.level, "")].values, v.values)
