"""Per-image region hierarchy over a token grid (DESIGN section 3, "Hierarchy").

Level 0 splits object from background with k-means; levels 1.. cut one
agglomerative tree of the object tokens at decreasing heights, so every level is
nested in the one above it. The teacher clusters the standardised latents (per-channel
(token - mean) / std with the dataset statistics: `stats`), what the generators see,
as the reference does. `region_canvas` turns a partition into the canvas that the
generator of that level is trained on (region-mean latents). `ground_truth_hierarchies`
is the oracle teacher: ground-truth masks voted down to the token grid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

# scipy, sklearn and threadpoolctl are imported by the functions that cluster: the generators' training and
# sampling import region_canvas from here and need none of them (sklearn alone takes ~1 s to import).
if TYPE_CHECKING:   # torch is imported by region_canvas alone: the hierarchy's Dask workers never need it
    import torch

# centroid, median and ward assume Euclidean distances; the part distance is cosine + spatial
LINKAGE_METHODS = ("single", "complete", "average", "weighted")
CUT_MODES = ("height", "quantile")
BACKGROUND_ID = 0
OBJECT_ID = 1
_MAX_INT16 = np.iinfo(np.int16).max
_NORM_EPS = 1e-12
_IDENTICAL_TOL = 1e-9  # features closer than this count as identical
TIE_TOL = 1e-9  # mean distances to the centre closer than this are tied (rounding is ~1e-16)


@dataclass(frozen=True, kw_only=True)
class HierarchySpec:
    """The teacher's rule. No defaults: every field is a setting of storage.config.HierarchyConfig,
    which defines and validates it (tasks.plan.hierarchy_spec builds this from it)."""

    k: int
    alpha: float
    lam: float
    cuts: tuple[float, ...]
    cut_mode: str  # "height" | "quantile"
    linkage: str
    seed: int

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"k must be >= 2, got {self.k}")
        if self.alpha < 0 or self.lam < 0:
            raise ValueError(f"alpha and lam must be >= 0, got {self.alpha}, {self.lam}")
        if self.cut_mode not in CUT_MODES:
            raise ValueError(f"cut_mode must be one of {CUT_MODES}, got {self.cut_mode!r}")
        if self.linkage not in LINKAGE_METHODS:
            raise ValueError(f"linkage must be one of {LINKAGE_METHODS}, got {self.linkage!r}")
        cuts = tuple(float(c) for c in self.cuts)
        if any(not np.isfinite(c) or c < 0 for c in cuts):
            raise ValueError(f"cuts must be finite and at least 0, got {self.cuts}")
        if any(later > earlier for earlier, later in zip(cuts, cuts[1:])):
            # An increasing cut would make a finer level coarser than its parent.
            raise ValueError(f"cuts must be non-increasing, got {self.cuts}")
        if self.cut_mode == "quantile" and any(not 0.0 <= c <= 1.0 for c in cuts):
            raise ValueError(f"quantile cuts must lie in [0, 1], got {self.cuts}")
        object.__setattr__(self, "cuts", cuts)

    @property
    def partition_levels(self) -> int:
        """Number of partitions returned: level 0 plus one per cut."""
        return len(self.cuts) + 1


def grid_coordinates(height: int, width: int) -> np.ndarray:
    """[H * W, 2] (row, col) coordinates in raster order, each axis scaled to [0, 1]."""
    rows = np.linspace(0.0, 1.0, height) if height > 1 else np.full(1, 0.5)
    cols = np.linspace(0.0, 1.0, width) if width > 1 else np.full(1, 0.5)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1)


def _l2_normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, _NORM_EPS)


def _all_identical(rows: np.ndarray) -> bool:
    return bool(np.max(np.abs(rows - rows[0])) <= _IDENTICAL_TOL)


def object_mask(unit_tokens: np.ndarray, coords: np.ndarray, spec: HierarchySpec) -> np.ndarray:
    """Level 0 as a boolean [T] mask: True for the k-means cluster nearest the image centre.

    unit_tokens are L2-normalised [T, C]; coords are [T, 2] in [0, 1].
    """
    features = unit_tokens
    if spec.alpha > 0:
        features = np.concatenate([unit_tokens, spec.alpha * coords], axis=1)
    all_object = np.ones(len(features), dtype=bool)
    if _all_identical(features):
        return all_object
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Fewer distinct tokens than k: sklearn warns and leaves a cluster empty, handled below.
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(n_clusters=spec.k, n_init=1, random_state=spec.seed)
        labels = kmeans.fit_predict(features)
    counts = np.bincount(labels, minlength=spec.k)
    if np.any(counts == 0):
        return all_object
    distance_to_centre = np.linalg.norm(coords - 0.5, axis=1)
    mean_distance = np.bincount(labels, weights=distance_to_centre, minlength=spec.k) / counts
    return labels == object_cluster(mean_distance)


def object_cluster(mean_distance: np.ndarray) -> int:
    """The object's k-means cluster: the nearest the image centre on average. The reference's rule
    (`obj_id = 0 if d0 < d1 else 1`) makes a cluster the object only when it is strictly nearer than
    the later ones, so a tie goes to the later cluster. Ties are exact in real arithmetic (mirror-image
    clusters hold the same distances) but not in floats, where the order of a sum rounds them apart:
    means within TIE_TOL count as tied, so every implementation picks alike (models.hierarchy.batched)."""
    tied = np.flatnonzero(mean_distance <= mean_distance.min() + TIE_TOL)
    return int(tied[-1])


def part_distances(unit_tokens: np.ndarray, coords: np.ndarray, lam: float) -> np.ndarray:
    """Condensed pairwise distances (1 - cos) + lam * ||coord_i - coord_j|| (scipy layout)."""
    from scipy.spatial.distance import pdist

    cosine_distance = np.clip(1.0 - unit_tokens @ unit_tokens.T, 0.0, 2.0)
    upper_i, upper_j = np.triu_indices(len(unit_tokens), k=1)
    return cosine_distance[upper_i, upper_j] + lam * pdist(coords)


def _normalised_tree(condensed: np.ndarray, method: str) -> np.ndarray:
    """Linkage matrix whose merge heights are min-max scaled to [0, 1]."""
    from scipy.cluster.hierarchy import linkage

    tree = linkage(condensed, method=method)
    heights = tree[:, 2]
    span = heights.max() - heights.min()
    # Equal heights carry no scale: treat them all as 0.
    tree[:, 2] = (heights - heights.min()) / span if span > 0 else 0.0
    return tree


def _cut_thresholds(normalised_heights: np.ndarray, spec: HierarchySpec) -> list[float]:
    if spec.cut_mode == "height":
        return list(spec.cuts)
    # Min-max scaling is monotone affine, so quantiles of scaled heights equal
    # scaled quantiles of the raw heights.
    return [float(np.quantile(normalised_heights, q)) for q in spec.cuts]


def _canonical_ids(labels: np.ndarray) -> np.ndarray:
    """Relabel to 1..k in order of first appearance (labels are in raster order)."""
    unique_labels, first_index = np.unique(labels, return_index=True)
    rank = np.empty(len(unique_labels), dtype=np.int64)
    rank[np.argsort(first_index)] = np.arange(1, len(unique_labels) + 1)
    return rank[np.searchsorted(unique_labels, labels)]


def part_levels(unit_tokens: np.ndarray, coords: np.ndarray, spec: HierarchySpec) -> np.ndarray:
    """Object-token ids for every cut: int64 [len(cuts), n], canonical ids 1..k per row."""
    n = len(unit_tokens)
    if n == 1 or not spec.cuts:
        return np.ones((len(spec.cuts), n), dtype=np.int64)
    from scipy.cluster.hierarchy import fcluster

    tree = _normalised_tree(part_distances(unit_tokens, coords, spec.lam), spec.linkage)
    levels = [
        _canonical_ids(fcluster(tree, t=threshold, criterion="distance"))
        for threshold in _cut_thresholds(tree[:, 2], spec)
    ]
    return np.stack(levels)


Stats = tuple[np.ndarray, np.ndarray]   # per-channel (mean [C], std [C]) of the latents


def _checked_stats(stats: Stats | None, channels: int) -> Stats | None:
    if stats is None:
        return None
    mean, std = (np.asarray(v, np.float64).reshape(-1) for v in stats)
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"stats must be (mean [{channels}], std [{channels}]), got {mean.shape}, {std.shape}")
    if not np.all(std > 0):
        raise ValueError("stats: every std must be positive")
    return mean, std


def _single_image_hierarchy(tokens: np.ndarray, spec: HierarchySpec, stats: Stats | None = None) -> np.ndarray:
    height, width, channels = tokens.shape
    if height * width > _MAX_INT16:
        raise ValueError(f"grid of {height}x{width} tokens does not fit int16 region ids")
    flat = tokens.reshape(height * width, channels).astype(np.float64)
    if stats is not None:
        flat = (flat - stats[0]) / stats[1]
    if not np.all(np.isfinite(flat)):
        raise ValueError("tokens contain NaN or inf")

    unit_tokens = _l2_normalise(flat)
    if _all_identical(unit_tokens):
        # No content to split: any partition would be spatial tie-breaking noise.
        return np.full((spec.partition_levels, height, width), OBJECT_ID, dtype=np.int16)
    coords = grid_coordinates(height, width)
    is_object = object_mask(unit_tokens, coords, spec)
    object_index = np.flatnonzero(is_object)  # ascending, i.e. raster order

    ids = np.full((spec.partition_levels, height * width), BACKGROUND_ID, dtype=np.int16)
    ids[0, object_index] = OBJECT_ID
    if spec.cuts:
        ids[1:, object_index] = part_levels(unit_tokens[object_index], coords[object_index], spec)
    return ids.reshape(spec.partition_levels, height, width)


def build_hierarchy(tokens: np.ndarray, spec: HierarchySpec, stats: Stats | None = None) -> np.ndarray:
    """[g, g, C] -> int16 [len(spec.cuts)+1, g, g] region ids (level 0 = object/background).

    With `stats` = (mean, std) the tokens are standardised per channel first (in float64), as the
    teacher does; without, they are clustered as given.
    Background is 0 at every level; object regions are 1..k in raster first-appearance order.
    Tokens identical up to scale (or all zero) give one object region (1) at every level.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [g, g, C], got shape {tokens.shape}")
    stats = _checked_stats(stats, tokens.shape[-1])
    from threadpoolctl import threadpool_limits

    # Problems are tiny; thread pools only add start-up cost and contention.
    with threadpool_limits(limits=1):
        return _single_image_hierarchy(tokens, spec, stats)


def build_hierarchies(tokens: np.ndarray, spec: HierarchySpec, stats: Stats | None = None) -> np.ndarray:
    """[N, g, g, C] -> int16 [N, len(cuts)+1, g, g]; loops build_hierarchy (CPU), `stats` as there."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 4:
        raise ValueError(f"tokens must be [N, g, g, C], got shape {tokens.shape}")
    stats = _checked_stats(stats, tokens.shape[-1])
    out = np.empty((tokens.shape[0], spec.partition_levels, *tokens.shape[1:3]), dtype=np.int16)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        for index, image_tokens in enumerate(tokens):
            out[index] = _single_image_hierarchy(image_tokens, spec, stats)
    return out


def _patch_majority(patches: np.ndarray, allowed: np.ndarray, bins: int) -> np.ndarray:
    """patches [M, P] int codes in [0, bins), allowed bool [M, P] -> [M] the most frequent allowed
    code per row; ties go to the smallest code (argmax takes the first maximum)."""
    rows = len(patches)
    index = (np.arange(rows)[:, None] * bins + patches).ravel()
    counts = np.bincount(index, weights=allowed.ravel(), minlength=rows * bins)
    return counts.reshape(rows, bins).argmax(1)


def _canonical_object_ids(keys: np.ndarray) -> np.ndarray:
    """[N, T] keys (< 0: background) -> int16 ids: background 0, others 1..k per image in raster
    first-appearance order (the clustered teacher's convention)."""
    out = np.zeros(keys.shape, dtype=np.int16)
    for image, row in enumerate(keys):
        inside = row >= 0
        if inside.any():
            out[image, inside] = _canonical_ids(row[inside])
    return out


def ground_truth_hierarchies(masks: np.ndarray, grid: int) -> np.ndarray:
    """The oracle teacher: ground-truth masks [N, L, H, W] (level 0 object vs background, then finer
    levels, id 0 = background) -> int16 [N, L, grid, grid] region ids in the clustered teacher's format.

    Each token is a patch of (H/grid) x (W/grid) pixels and takes the most frequent ground-truth id
    of its patch, ties to the smallest id. At levels l > 0 the vote counts only the patch's pixels
    inside the token's level-(l-1) region: that is the plain majority wherever that one nests, and it
    keeps a token that straddles a boundary inside its parent. Ids are renumbered to the project's
    convention (background 0, object regions 1..k in raster first-appearance order); a level-l region
    is a (parent region, ground-truth id) pair, so level 0 contains level 1 contains level 2 by
    construction, and the background (level 0's) stays one region at every level.
    """
    masks = np.asarray(masks)
    if masks.ndim != 4:
        raise ValueError(f"masks must be [N, levels, H, W], got shape {masks.shape}")
    n, levels, height, width = masks.shape
    if grid <= 0 or height % grid or width % grid:
        raise ValueError(f"mask size {height}x{width} is not divisible by the token grid {grid}")
    if grid * grid > _MAX_INT16:
        raise ValueError(f"grid of {grid}x{grid} tokens does not fit int16 region ids")
    tokens = n * grid * grid
    # [N, L, H, W] -> [L, N*g*g, P]: one row of P pixels per token, tokens in raster order per image
    patches = masks.reshape(n, levels, grid, height // grid, grid, width // grid)
    patches = patches.transpose(1, 0, 2, 4, 3, 5).reshape(levels, tokens, -1)
    ids = np.zeros((n, levels, grid * grid), dtype=np.int16)
    parent_raw = parent_pixels = None
    parent_ids = np.ones((n, grid * grid), dtype=np.int64)   # above level 0: one region, the whole image
    for level in range(levels):
        values, codes = np.unique(patches[level], return_inverse=True)   # sorted: smallest code = smallest id
        codes = codes.reshape(tokens, -1)
        allowed = np.ones(codes.shape, bool) if parent_raw is None else parent_pixels == parent_raw[:, None]
        raw = values[_patch_majority(codes, allowed, len(values))]
        background = (raw == 0) if level == 0 else (parent_ids.reshape(-1) == 0)
        keys = np.where(background, -1, parent_ids.reshape(-1) * len(values) + np.searchsorted(values, raw))
        ids[:, level] = _canonical_object_ids(keys.reshape(n, grid * grid))
        parent_ids, parent_raw, parent_pixels = ids[:, level].astype(np.int64), raw, patches[level]
    return ids.reshape(n, levels, grid, grid)


def region_canvas(x: torch.Tensor, ids: torch.Tensor, bound: int | None = None) -> torch.Tensor:
    """x [B, T, C] float, ids [B, T] int64 (>= 0) -> [B, T, C]: each token replaced by the
    mean of x over its region in the same image (scatter based, no loop over images).

    Differentiable in x. Ids may be sparse and differ in count between images. With `bound` (every id is
    below it: a teacher's ids are at most T) the rows are image * bound + id, with no host synchronisation
    (what a training step on the GPU wants); the sums are the same either way.
    """
    import torch

    if x.ndim != 3 or ids.shape != x.shape[:2]:
        raise ValueError(f"expected x [B, T, C] and ids [B, T], got {tuple(x.shape)}, {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    batch, tokens, channels = x.shape
    ids = ids.long()
    if bound is not None:
        region_row = (ids + torch.arange(batch, device=ids.device).unsqueeze(1) * bound).reshape(-1)
        num_regions = batch * bound
    else:
        id_stride = int(ids.max()) + 1 if ids.numel() else 1
        image_offset = torch.arange(batch, device=ids.device).unsqueeze(1) * id_stride
        # Compact (image, region) pairs to dense row ids so memory scales with the
        # number of regions present, not with the largest id.
        _, region_row = torch.unique((ids + image_offset).reshape(-1), return_inverse=True)
        num_regions = int(region_row.max()) + 1 if region_row.numel() else 0

    # Half-precision sums lose too much; accumulate in float32.
    accumulate_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    flat_x = x.reshape(batch * tokens, channels).to(accumulate_dtype)
    sums = flat_x.new_zeros(num_regions, channels).index_add(0, region_row, flat_x)
    counts = flat_x.new_zeros(num_regions).index_add(0, region_row, flat_x.new_ones(batch * tokens))
    means = sums / counts.unsqueeze(1)
    return means.index_select(0, region_row).reshape(batch, tokens, channels).to(x.dtype)
