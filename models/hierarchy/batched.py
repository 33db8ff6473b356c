"""The per-image hierarchy of models.hierarchy.reference, batched over images in torch (GPU or CPU).

Same algorithm, written for a batch [B, T, C] at once instead of a loop over images:

- level 0: k-means (k = spec.k, k-means++ start, Lloyd iterations) on the L2-normalised tokens
  (plus alpha * coordinates); the cluster nearest the image centre is the object; on CUDA one
  Triton kernel on the per-image Gram matrices (models.hierarchy.kmeans_triton), else a torch loop;
- levels 1..: average-linkage (UPGMA) agglomeration of the object tokens under
  (1 - cos) + lam * ||coord_i - coord_j||, with the Lance-Williams update on a [B, T, T]
  distance matrix, one merge per step for every image at once; merge heights are min-max
  normalised per image and the tree is cut at each threshold (as scipy's fcluster
  "distance"); ids are canonical (1..k in raster first-appearance order), background 0.

Average linkage has no inversions, so "every merge at height <= t" is a prefix of the merge
order: the labels after each merge are kept and the cut picks the right prefix. The region ids equal
the scipy/scikit-learn reference's token for token on the test sets (tests/models/test_hierarchy_batched.py:
the same k-means++ draws, float64 level 0, the reference's tie rule); the float32 merge loop could still
order two merges of equal height apart from scipy (bench/dataplane.py reports the ARI on real data).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from models.hierarchy.reference import BACKGROUND_ID, OBJECT_ID, TIE_TOL, HierarchySpec

_INF = float("inf")


def grid_coordinates_t(height: int, width: int, device, dtype=torch.float32) -> Tensor:
    """[H*W, 2] raster-order (row, col) coordinates scaled to [0, 1], as models.hierarchy.reference.grid_coordinates."""
    rows = torch.linspace(0.0, 1.0, height, device=device, dtype=dtype) if height > 1 else torch.full((1,), 0.5, device=device, dtype=dtype)
    cols = torch.linspace(0.0, 1.0, width, device=device, dtype=dtype) if width > 1 else torch.full((1,), 0.5, device=device, dtype=dtype)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], 1)


def sklearn_plusplus_draws(tokens: int, k: int, seed: int) -> tuple[int, list[np.ndarray]]:
    """The random draws scikit-learn's KMeans(n_init=1, random_state=seed) makes for k-means++ on
    `tokens` equally weighted samples: the first centre's index and, per further centre, the
    uniforms of its local trials. They depend on (tokens, k, seed) only, so one set serves a batch."""
    rng = np.random.RandomState(seed)
    first = int(rng.choice(tokens, p=np.full(tokens, 1.0 / tokens)))
    trials = 2 + int(np.log(k))
    return first, [rng.uniform(size=trials) for _ in range(1, k)]


def _kmeans_plus_plus(x: Tensor, k: int, seed: int) -> Tensor:
    """[B, T, D] -> k starting centres [B, k, D]: k-means++ with greedy local trials, drawn as
    scikit-learn draws them, so batched and reference k-means start from the same centres."""
    batch, tokens, _ = x.shape
    rows = torch.arange(batch, device=x.device)
    first, uniforms = sklearn_plusplus_draws(tokens, k, seed)
    centres = [x[:, first]]
    closest = ((x - centres[0][:, None]) ** 2).sum(-1)                          # [B, T]
    potential = closest.sum(1)
    for draws in uniforms:
        targets = torch.as_tensor(draws, dtype=x.dtype, device=x.device)[None] * potential[:, None]
        candidates = torch.searchsorted(closest.cumsum(1), targets).clamp(max=tokens - 1)   # [B, trials]
        picked = x[rows[:, None], candidates]                                    # [B, trials, D]
        to_candidates = ((x[:, None] - picked[:, :, None]) ** 2).sum(-1)        # [B, trials, T]
        to_candidates = torch.minimum(to_candidates, closest[:, None])
        best = to_candidates.sum(-1).argmin(1)                                   # [B]
        closest = to_candidates[rows, best]
        potential = closest.sum(1)
        centres.append(x[rows, candidates[rows, best]])
    return torch.stack(centres, 1)


BACKENDS = ("auto", "triton", "torch")


def uses_triton(choice: str, device: torch.device, part: str = "linkage") -> bool:
    """Whether `choice` ("auto", "triton" or "torch") for `part` ("kmeans" or "linkage") runs as its
    Triton kernel on `device`: "auto" means on CUDA where triton is installed."""
    if choice not in BACKENDS:
        raise ValueError(f"{part} must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return False
    from models.hierarchy.linkage_triton import triton_available

    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{part}='triton' needs triton, which is not installed")
        return True
    return device.type == "cuda" and triton_available()


def _kmeans_torch(unit: Tensor, coords: Tensor, spec: HierarchySpec, iterations: int) -> tuple[Tensor, Tensor]:
    """k-means labels long [B, T] and identical-image flags [B] with the torch loop: k-means++ then
    `iterations` Lloyd steps on the float64 features (a fixed count; after convergence a step
    changes nothing)."""
    batch, tokens, _ = unit.shape
    features = unit.double()   # float64 like the reference: k-means starts and ties depend on it
    coords = coords.double()
    if spec.alpha > 0:
        features = torch.cat([features, spec.alpha * coords.expand(batch, -1, -1)], -1)
    features = features - features.mean(1, keepdim=True)   # scikit-learn centres the data too
    centres = _kmeans_plus_plus(features, spec.k, spec.seed)
    for _ in range(iterations):
        labels = torch.cdist(features, centres).argmin(-1)                       # [B, T]
        onehot = torch.nn.functional.one_hot(labels, spec.k).to(features.dtype)  # [B, T, k]
        counts = onehot.sum(1)                                                    # [B, k]
        sums = onehot.transpose(1, 2) @ features                                  # [B, k, D]
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)
    labels = torch.cdist(features, centres).argmin(-1)
    identical = (features - features[:, :1]).abs().amax((1, 2)) <= 1e-9
    return labels, identical


def centred_gram(unit: Tensor, coords: Tensor, alpha: float, chunk: int = 512) -> Tensor:
    """float64 [B, T, T] Gram matrices X X^T of the k-means features X = [unit, alpha * coords]
    centred per image (what _kmeans_torch clusters), without materialising X for the whole batch."""
    batch, tokens, _ = unit.shape
    coords = coords.double()
    gram = torch.empty((batch, tokens, tokens), dtype=torch.float64, device=unit.device)
    spatial = torch.zeros((tokens, tokens), dtype=torch.float64, device=unit.device)
    if alpha > 0:
        placed = alpha * coords
        placed = placed - placed.mean(0, keepdim=True)
        spatial = placed @ placed.T
    for start in range(0, batch, chunk):
        part = unit[start:start + chunk]
        centred = part - part.mean(1, keepdim=True, dtype=torch.float64)   # float64 [b, T, C]
        torch.baddbmm(spatial.expand(len(part), -1, -1), centred, centred.transpose(1, 2),
                      out=gram[start:start + chunk])
    return gram


def _kmeans_triton(unit: Tensor, coords: Tensor, spec: HierarchySpec, iterations: int) -> tuple[Tensor, Tensor]:
    """_kmeans_torch on the Gram matrices with the fused kernel of models.hierarchy.kmeans_triton."""
    from models.hierarchy.kmeans_triton import kmeans_gram_triton

    batch, tokens, _ = unit.shape
    gram = centred_gram(unit, coords, spec.alpha)
    first, uniforms = sklearn_plusplus_draws(tokens, spec.k, spec.seed)
    labels, _ = kmeans_gram_triton(gram, spec.k, first, uniforms, iterations)
    spread = (unit - unit[:, :1]).abs().amax((1, 2)).double() if tokens else unit.new_zeros(batch, dtype=torch.float64)
    if spec.alpha > 0:
        placed = spec.alpha * coords.double()
        spread = torch.maximum(spread, (placed - placed[:1]).abs().amax())
    return labels, spread <= 1e-9


def object_masks(unit: Tensor, coords: Tensor, spec: HierarchySpec, iterations: int = 50,
                 kmeans: str = "auto") -> Tensor:
    """Level 0 for a batch: unit tokens [B, T, C], coords [T, 2] -> bool [B, T] (True = object).

    `kmeans` picks the implementation: "triton" (models.hierarchy.kmeans_triton: one fused kernel on the
    Gram matrices, 6 ms instead of 205 ms per 1024 images of 256 tokens on an H200:
    bench/linkage_check.py --kmeans), "torch" (the loop of _kmeans_torch) or "auto" (triton on
    CUDA where it is installed); the same labels up to ties at rounding level.
    An image whose tokens are all identical, or whose k-means leaves a cluster empty, is all object.
    """
    if uses_triton(kmeans, unit.device, "kmeans"):
        labels, identical = _kmeans_triton(unit, coords, spec, iterations)
    else:
        labels, identical = _kmeans_torch(unit, coords, spec, iterations)
    coords = coords.double()
    onehot = torch.nn.functional.one_hot(labels, spec.k).double()
    counts = onehot.sum(1)
    centre_distance = (coords - 0.5).norm(dim=1)                                  # [T]
    mean_distance = (onehot * centre_distance[None, :, None]).sum(1) / counts.clamp(min=1)
    mean_distance = torch.where(counts > 0, mean_distance, torch.full_like(mean_distance, _INF))
    # the reference's rule (models.hierarchy.reference.object_cluster): the last cluster within TIE_TOL
    # of the nearest, so a tie goes to the later cluster
    tied = mean_distance <= mean_distance.amin(-1, keepdim=True) + TIE_TOL
    last_tied = spec.k - 1 - tied.flip(-1).int().argmax(-1, keepdim=True)
    is_object = labels == last_tied
    degenerate = identical | (counts == 0).any(-1)
    return is_object | degenerate[:, None]


def _canonical(labels: Tensor, valid: Tensor) -> Tensor:
    """Relabel each row's valid entries to 1..k in order of first appearance; invalid -> 0."""
    batch, tokens = labels.shape
    position = torch.arange(tokens, device=labels.device).expand(batch, -1)
    big = torch.full_like(position, tokens)
    # first position of each label value (labels are token indices 0..T-1)
    first = torch.full((batch, tokens), tokens, device=labels.device, dtype=torch.long)
    first = first.scatter_reduce(1, labels, torch.where(valid, position, big), reduce="amin")
    present = first < tokens
    order = torch.argsort(torch.where(present, first, big), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(1, tokens + 1, device=labels.device).expand(batch, -1))
    return torch.where(valid, rank.gather(1, labels), torch.zeros_like(labels))


class _Linkage:
    """State of a batched UPGMA run, updated in place so the whole loop can be a CUDA graph."""

    def __init__(self, batch: int, tokens: int, steps: int, device, dtype=torch.float32):
        self.steps = steps
        self.dist = torch.empty((batch, tokens, tokens), dtype=dtype, device=device)
        self.size = torch.empty((batch, tokens), dtype=dtype, device=device)
        self.label = torch.empty((batch, tokens), dtype=torch.long, device=device)
        self.heights = torch.empty((batch, max(steps, 1)), dtype=dtype, device=device)
        self.snapshots = torch.empty((steps + 1, batch, tokens), dtype=torch.int16, device=device)
        self.rows = torch.arange(batch, device=device)
        self.start = torch.arange(tokens, device=device).expand(batch, -1)
        self.inf = torch.full((), _INF, dtype=dtype, device=device)   # a device value: no host copy in a graph
        self.graph = None

    def load(self, dist: Tensor, size: Tensor) -> None:
        self.dist.copy_(dist)
        self.size.copy_(size)

    def run(self) -> None:
        """One merge per step for every image: the closest pair (i < j) becomes cluster i."""
        dist, size, label, rows = self.dist, self.size, self.label, self.rows
        batch, tokens = label.shape
        label.copy_(self.start)
        self.heights.fill_(_INF)
        self.snapshots[0].copy_(label)
        for step in range(self.steps):
            best, where = dist.reshape(batch, -1).min(1)
            live = torch.isfinite(best)
            i, j = where // tokens, where % tokens
            self.heights[:, step] = best
            si, sj = size[rows, i], size[rows, j]
            merged = (si[:, None] * dist[rows, i] + sj[:, None] * dist[rows, j]) / (si + sj).clamp(min=1)[:, None]
            merged[rows, i] = self.inf
            merged[rows, j] = self.inf
            # finished images (no finite pair left) keep their matrix: write back what is there
            new_i = torch.where(live[:, None], merged, dist[rows, i])
            dist[rows, i] = new_i
            dist[rows, :, i] = new_i
            gone = torch.where(live[:, None], torch.full_like(new_i, _INF), dist[rows, j])
            dist[rows, j] = gone
            dist[rows, :, j] = gone
            size[rows, i] = torch.where(live, si + sj, si)
            label.copy_(torch.where(live[:, None] & (label == j[:, None]), i[:, None], label))
            self.snapshots[step + 1].copy_(label)

    def capture(self) -> None:
        """Record run() as a CUDA graph: one launch instead of ~20 per merge step."""
        stream = torch.cuda.Stream(self.dist.device)
        stream.wait_stream(torch.cuda.current_stream(self.dist.device))
        with torch.cuda.stream(stream):
            self.run()   # warm-up outside the graph, as CUDA graphs require
        torch.cuda.current_stream(self.dist.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (data loading) may use CUDA while this captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.run()

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.run()


_GRAPHS: dict[tuple, _Linkage] = {}


def _linkage_for(batch: int, tokens: int, steps: int, device: torch.device, use_graph: bool) -> _Linkage:
    if not (use_graph and device.type == "cuda" and torch.cuda.is_available()):
        return _Linkage(batch, tokens, steps, device)
    key = (batch, tokens, device)
    if key not in _GRAPHS:
        linkage = _Linkage(batch, tokens, tokens - 1, device)   # static step count: every shape the same graph
        linkage.dist.fill_(_INF)
        linkage.size.fill_(1.0)
        linkage.capture()
        _GRAPHS[key] = linkage
    return _GRAPHS[key]


def merge_loop(dist: Tensor, valid: Tensor, linkage: str = "auto", use_graph: bool = True,
               static_steps: bool | None = None) -> tuple[Tensor, Tensor, int]:
    """UPGMA over float32 [B, T, T] distances (inf on the diagonal and for invalid tokens; overwritten) of the
    tokens `valid` [B, T]: (heights [B, steps], inf where no merge; snapshots int16 [steps + 1, B, T], each
    token's cluster after 0..steps merges, a cluster named by its first token; steps). The Triton kernel
    on CUDA ("auto"), else the torch loop (a CUDA graph on CUDA). static_steps (default on CUDA): T - 1
    steps whatever the valid counts, so every batch of a shape reuses one graph."""
    batch, tokens, _ = dist.shape
    device = dist.device
    if static_steps is None:
        static_steps = device.type == "cuda"
    steps = tokens - 1 if static_steps else max(int(valid.sum(1).max()) - 1, 0)
    if uses_triton(linkage, device, "linkage"):
        from models.hierarchy.linkage_triton import run_linkage_triton

        heights, snapshots = run_linkage_triton(dist, valid.to(dist.dtype), steps, inplace=True)
        return heights, snapshots, steps
    state = _linkage_for(batch, tokens, steps, device, use_graph)
    state.load(dist, valid.to(dist.dtype))
    state.replay()
    return state.heights, state.snapshots, state.steps


def linkage_distances(unit: Tensor, coords: Tensor, is_object: Tensor, lam: float) -> Tensor:
    """The merge loop's input: float [B, T, T] (1 - cos) + lam * ||coord_i - coord_j|| between object
    tokens, inf on the diagonal and wherever a background token takes part."""
    tokens = unit.shape[1]
    cosine = (1.0 - unit @ unit.transpose(1, 2)).clamp(0.0, 2.0)
    dist = cosine + lam * torch.cdist(coords, coords)[None]
    pair_ok = is_object[:, :, None] & is_object[:, None, :]
    eye = torch.eye(tokens, dtype=torch.bool, device=unit.device)[None]
    return torch.where(pair_ok & ~eye, dist, torch.full_like(dist, _INF))


def part_levels_batched(unit: Tensor, coords: Tensor, is_object: Tensor, spec: HierarchySpec,
                        use_graph: bool = True, static_steps: bool | None = None,
                        linkage: str = "auto") -> Tensor:
    """Object-token ids for every cut: long [B, len(cuts), T]; background tokens 0.

    The merge loop runs as one fused Triton kernel (models.hierarchy.linkage_triton, one program per
    image) with linkage="triton", or "auto" on CUDA where triton is installed. Otherwise
    ("torch") it is the torch loop here; on CUDA it runs as a captured CUDA graph (one per batch
    shape), since each step is ~20 small kernels and eager launches would dominate. A graph needs
    a fixed step count (static_steps, default on CUDA): T - 1 steps, where finished images idle.
    Both give the same heights and ids."""
    batch, tokens, device = unit.shape[0], unit.shape[1], unit.device
    cuts = len(spec.cuts)
    if cuts == 0:
        return torch.zeros((batch, 0, tokens), dtype=torch.long, device=device)
    if spec.linkage != "average" or spec.cut_mode != "height":
        raise ValueError("the batched hierarchy implements average linkage with height cuts; "
                         "use the reference backend for other settings")
    dist = linkage_distances(unit, coords, is_object, spec.lam)
    heights, snapshots, steps = merge_loop(dist, is_object, linkage, use_graph, static_steps)
    rows = torch.arange(batch, device=device)
    merges = torch.isfinite(heights)
    low = torch.where(merges, heights, torch.full_like(heights, _INF)).amin(1, keepdim=True)
    high = torch.where(merges, heights, torch.full_like(heights, -_INF)).amax(1, keepdim=True)
    span = high - low
    normalised = torch.where(span > 0, (heights - low) / span.clamp(min=1e-30), torch.zeros_like(heights))
    out = []
    for threshold in spec.cuts:
        # fcluster "distance" merges every link at height <= t; with no inversions that is a prefix
        taken = ((normalised <= threshold) & merges).sum(1)
        labels = snapshots[taken.clamp(max=steps), rows].long()
        out.append(_canonical(labels, is_object))
    return torch.stack(out, 1)


def device_stats(stats: tuple, channels: int, device) -> tuple[Tensor, Tensor]:
    """(mean, std) [C] as float64 tensors on `device`, checked on the host (std > 0) when they come as
    arrays; tensors already there pass as they are, so a pass that makes them once never waits on a copy."""
    if all(torch.is_tensor(v) and v.device == torch.device(device) and v.dtype == torch.float64
           and v.shape == (channels,) for v in stats):
        return stats[0], stats[1]
    mean, std = (np.asarray(v.cpu() if torch.is_tensor(v) else v, np.float64).reshape(-1) for v in stats)
    if mean.shape != (channels,) or std.shape != (channels,) or not bool((std > 0).all()):
        raise ValueError(f"stats must be (mean [{channels}], std [{channels}]) with std > 0")
    return torch.from_numpy(mean).to(device), torch.from_numpy(std).to(device)


@torch.no_grad()
def build_hierarchies_batched(tokens: Tensor, spec: HierarchySpec,
                              kmeans_iterations: int = 50, static_steps: bool | None = None,
                              use_graph: bool = True, linkage: str = "auto", kmeans: str = "auto",
                              stats: tuple | None = None, nonfinite: Tensor | None = None) -> Tensor:
    """[N, g, g, C] tokens (any float dtype, any device) -> int16 [N, len(cuts)+1, g, g] region ids.

    Computed in float32 on the tokens' device; `linkage` picks the merge loop (part_levels_batched:
    "auto" = the Triton kernel on CUDA where triton is installed, else torch; same ids) and
    `kmeans` level 0 (object_masks: the same choice). `stats` = (mean, std) [C] standardises the
    tokens per channel first (in float64, then float32), as the teacher does; device_stats makes
    them once for a pass. Tokens with NaN or inf raise, which waits for the device; a pass that
    must not wait passes `nonfinite`, a bool device scalar the check ORs into, and reads it later.
    Equals models.hierarchy.reference.build_hierarchies (with the same `stats`) on the test sets.
    """
    if tokens.ndim != 4:
        raise ValueError(f"tokens must be [N, g, g, C], got shape {tuple(tokens.shape)}")
    n, height, width, channels = tokens.shape
    flat = tokens.reshape(n, height * width, channels)
    if stats is not None:
        mean, std = device_stats(stats, channels, tokens.device)
        flat = (flat.double() - mean) / std
    flat = flat.float()
    if nonfinite is not None:
        nonfinite.logical_or_(~torch.isfinite(flat).all())
    elif not torch.isfinite(flat).all():
        raise ValueError("tokens contain NaN or inf")
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    # level 0 takes float64 coordinates, as the reference: in float32 the rows of a grid are not mirror
    # images (1/3 rounds), which tips the tie between mirror-image clusters (object_masks)
    coords64 = grid_coordinates_t(height, width, tokens.device, torch.float64)
    coords = coords64.float()
    identical = (unit - unit[:, :1]).abs().amax((1, 2)) <= 1e-9
    is_object = object_masks(unit, coords64, spec, kmeans_iterations, kmeans=kmeans)
    ids = torch.full((n, spec.partition_levels, height * width), BACKGROUND_ID, dtype=torch.long, device=tokens.device)
    ids[:, 0] = torch.where(is_object, OBJECT_ID, BACKGROUND_ID)
    if spec.cuts:
        ids[:, 1:] = part_levels_batched(unit, coords, is_object, spec, use_graph=use_graph,
                                         static_steps=static_steps, linkage=linkage)
    ids = torch.where(identical[:, None, None], torch.full_like(ids, OBJECT_ID), ids)
    return ids.reshape(n, spec.partition_levels, height, width).to(torch.int16)
