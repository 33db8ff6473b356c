"""Checks of the fused Triton k-means (models.hierarchy.kmeans_triton), run by tests/models/test_kmeans_triton.py
in a subprocess with TRITON_INTERPRET=1 (set before triton.language is first imported; see
linkage_triton_checks.py). Prints one JSON object: check name -> "ok" or the failure's traceback.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: specs
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from specs import hierarchy_spec  # noqa: E402
from triton_interpreter import run_checks  # noqa: E402

from models.hierarchy.reference import HierarchySpec  # noqa: E402
from models.hierarchy.batched import (_kmeans_plus_plus, _kmeans_torch, _kmeans_triton,  # noqa: E402
                                      build_hierarchies_batched, centred_gram, grid_coordinates_t,
                                      object_masks, sklearn_plusplus_draws)
from models.hierarchy.kmeans_triton import kmeans_gram_triton  # noqa: E402


def _images(batch: int, side: int, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """unit tokens [B, side*side, C] (a blob of one direction on a background of another, plus
    noise; image 1 all identical, image 2 with duplicated tokens) and coords [T, 2]."""
    generator = torch.Generator().manual_seed(seed)
    coords = grid_coordinates_t(side, side, "cpu")
    blob = ((coords - 0.5).norm(dim=1) < 0.3).float()[None, :, None]            # [1, T, 1]
    inside, outside = torch.randn(2, batch, 1, channels, generator=generator)
    x = blob * inside + (1 - blob) * outside + 0.8 * torch.randn(batch, side * side, channels, generator=generator)
    x[1] = x[1, :1]
    x[2, 1::2] = x[2, 0::2][: x[2, 1::2].shape[0]]
    return torch.nn.functional.normalize(x, dim=-1), coords


def check_labels(side: int, spec: HierarchySpec, iterations: int) -> None:
    unit, coords = _images(6, side, 12, seed=side + spec.k)
    want, want_identical = _kmeans_torch(unit, coords, spec, iterations)
    got, identical = _kmeans_triton(unit, coords, spec, iterations)
    assert torch.equal(identical, want_identical), (identical, want_identical)
    assert torch.equal(got, want), f"labels differ in images {(got != want).any(1).nonzero().ravel().tolist()}"
    assert len(torch.unique(want[0])) == spec.k, "no split: the case tests little"
    if iterations > 1:   # Lloyd moved labels after the first step: the incremental update is exercised
        assert not torch.equal(_kmeans_torch(unit, coords, spec, 1)[0], want), "converged at once: tests little"


def check_plusplus(side: int, k: int) -> None:
    """The k-means++ centre tokens are those of the torch code (on the features)."""
    spec = hierarchy_spec(k=k, alpha=0.3)
    unit, coords = _images(5, side, 10, seed=k)
    features = torch.cat([unit.double(), spec.alpha * coords.double().expand(len(unit), -1, -1)], -1)
    features = features - features.mean(1, keepdim=True)
    want = _kmeans_plus_plus(features, k, spec.seed)
    first, uniforms = sklearn_plusplus_draws(side * side, k, spec.seed)
    _, centres = kmeans_gram_triton(centred_gram(unit, coords, spec.alpha), k, first, uniforms, 0)
    got = features[torch.arange(len(unit))[:, None], centres]
    assert torch.equal(got, want), "k-means++ picked other tokens"
    gram = centred_gram(unit, coords, spec.alpha)
    assert (gram - features @ features.transpose(1, 2)).abs().max() < 1e-12, "Gram matrix differs"


def check_masks_and_hierarchies() -> None:
    unit, coords = _images(4, 6, 16, seed=3)
    for spec in (hierarchy_spec(alpha=0.5, seed=7), hierarchy_spec()):
        want = object_masks(unit, coords, spec, kmeans="torch")
        assert torch.equal(object_masks(unit, coords, spec, kmeans="triton"), want), "object masks differ"
    assert want[1].all() and not want[0].all(), "identical image not all object, or no split elsewhere"
    tokens = torch.from_numpy(unit.reshape(4, 6, 6, 16).numpy() * 3.0)
    spec = hierarchy_spec(cuts=(0.8, 0.5))
    loop = build_hierarchies_batched(tokens, spec, linkage="torch", kmeans="torch")
    fused = build_hierarchies_batched(tokens, spec, linkage="torch", kmeans="triton")
    assert torch.equal(fused, loop), "ids differ"


CHECKS = {
    "labels_T49_k2": lambda: check_labels(7, hierarchy_spec(), 50),              # T not a power of two
    "labels_T36_k3_alpha": lambda: check_labels(6, hierarchy_spec(k=3, alpha=0.4, seed=2), 50),
    "labels_T25_two_iterations": lambda: check_labels(5, hierarchy_spec(seed=1), 2),   # stops before convergence
    "labels_T16_no_iteration": lambda: check_labels(4, hierarchy_spec(), 0),
    "plusplus_T30_k2": lambda: check_plusplus(6, 2),
    "plusplus_T30_k5": lambda: check_plusplus(6, 5),                          # 3 local trials per centre
    "masks_and_hierarchies": check_masks_and_hierarchies,
}


if __name__ == "__main__":
    run_checks(CHECKS)
