import numpy as np
import pytest

from storage.scene_objects import OBJECT_SPECS, Frame, LayeredCanvas
from storage.scenes import SCENE_CLASSES, masks_to_grid, render_scene, render_scenes

REQUIRED_CLASSES = {"house", "tree", "car", "boat", "flower", "lighthouse"}


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    return render_scenes(range(240), seed=0, size=112)


def brute_force_grid(masks: np.ndarray, grid: int) -> np.ndarray:
    height, width = masks.shape[-2:]
    ph, pw = height // grid, width // grid
    flat = masks.reshape(-1, height, width)
    out = np.zeros((flat.shape[0], grid, grid), dtype=masks.dtype)
    for n in range(flat.shape[0]):
        for row in range(grid):
            for col in range(grid):
                patch = flat[n, row * ph:(row + 1) * ph, col * pw:(col + 1) * pw]
                out[n, row, col] = np.bincount(patch.ravel().astype(np.int64)).argmax()
    return out.reshape(*masks.shape[:-2], grid, grid)


def test_required_classes_are_present():
    assert REQUIRED_CLASSES <= set(SCENE_CLASSES)
    assert len(set(SCENE_CLASSES)) == len(SCENE_CLASSES)


def test_same_call_gives_same_bytes():
    first, second = render_scene(11, seed=4), render_scene(11, seed=4)
    assert first.image.tobytes() == second.image.tobytes()
    assert first.masks.tobytes() == second.masks.tobytes()
    assert first.label == second.label


def test_scene_does_not_depend_on_batch_or_order():
    indices = [9, 3, 17, 0]
    forward = render_scenes(indices, seed=2)
    backward = render_scenes(indices[::-1], seed=2)
    for position, index in enumerate(indices):
        alone = render_scene(index, seed=2)
        assert np.array_equal(forward["image"][position], alone.image)
        assert np.array_equal(forward["masks"][position], alone.masks)
        assert forward["label"][position] == alone.label
        assert np.array_equal(backward["image"][len(indices) - 1 - position], alone.image)


def test_different_seeds_and_indices_differ():
    base = render_scene(5, seed=0)
    assert not np.array_equal(base.image, render_scene(5, seed=1).image)
    assert not np.array_equal(base.image, render_scene(6, seed=0).image)
    labels = {(render_scene(i, seed=0).label, render_scene(i, seed=1).label) for i in range(12)}
    assert any(a != b for a, b in labels)


@pytest.mark.parametrize("size", [56, 112, 224])
def test_shapes_and_dtypes(size: int):
    out = render_scenes([0, 1, 2], seed=0, size=size)
    assert out["image"].shape == (3, size, size, 3) and out["image"].dtype == np.uint8
    assert out["label"].shape == (3,) and out["label"].dtype == np.int64
    assert out["masks"].shape == (3, 3, size, size) and out["masks"].dtype == np.uint8
    assert set(np.unique(out["masks"][:, 0])) <= {0, 1}
    assert ((0 <= out["label"]) & (out["label"] < len(SCENE_CLASSES))).all()


def test_empty_batch_keeps_shapes():
    out = render_scenes([], size=112)
    assert out["image"].shape == (0, 112, 112, 3) and out["masks"].shape == (0, 3, 112, 112)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        render_scene(0, size=48)
    with pytest.raises(ValueError):
        render_scene(-1)


def test_every_class_appears(batch):
    counts = np.bincount(batch["label"], minlength=len(SCENE_CLASSES))
    assert (counts >= 15).all(), counts


def check_nesting(masks: np.ndarray, contiguous: bool = True) -> None:
    objects, parts, subparts = masks.astype(np.int64)
    assert np.array_equal(parts > 0, objects == 1)
    assert np.array_equal(subparts > 0, parts > 0)
    pairs = np.unique(np.stack([subparts[subparts > 0], parts[subparts > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1], "a subpart id spans two parts"
    for level in (parts, subparts) if contiguous else ():  # ids renumbered 1..k after occlusion
        present = np.unique(level[level > 0])
        assert np.array_equal(present, np.arange(1, len(present) + 1))


def test_nesting_holds_exactly(batch):
    for masks in batch["masks"]:
        check_nesting(masks)
    for masks in render_scenes(range(6), seed=3, size=224)["masks"]:
        check_nesting(masks)


def test_masks_to_grid_matches_brute_force():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 4, size=(2, 3, 12, 12)).astype(np.uint8)
    for grid in (1, 3, 4, 6):
        result = masks_to_grid(masks, grid)
        assert result.dtype == masks.dtype and result.shape == (2, 3, grid, grid)
        assert np.array_equal(result, brute_force_grid(masks, grid))


def test_masks_to_grid_on_rendered_masks(batch):
    masks = batch["masks"][:8]
    assert np.array_equal(masks_to_grid(masks, 8), brute_force_grid(masks, 8))


def test_masks_to_grid_breaks_ties_to_smallest_and_checks_divisibility():
    assert masks_to_grid(np.array([[2, 1], [1, 2]], dtype=np.uint8), 1)[0, 0] == 1
    with pytest.raises(ValueError):
        masks_to_grid(np.zeros((112, 112), np.uint8), 5)


def test_objects_have_parts_with_subparts(batch):
    for masks in batch["masks"]:
        assert len(np.unique(masks[1])) - 1 >= 2
    for label, name in enumerate(SCENE_CLASSES):
        rich = []
        for masks in batch["masks"][batch["label"] == label]:
            parts, subparts = masks[1], masks[2]
            rich.append(max(len(np.unique(subparts[parts == p])) for p in range(1, parts.max() + 1)) >= 2)
        assert np.mean(rich) >= 0.8, name


def test_object_covers_a_good_share_and_parts_span_tokens(batch):
    coverage = batch["masks"][:, 0].mean(axis=(1, 2))
    for label, name in enumerate(SCENE_CLASSES):
        assert 0.2 <= np.median(coverage[batch["label"] == label]) <= 0.5, name
    assert coverage.min() > 0.1 and coverage.max() < 0.7
    tokens = masks_to_grid(batch["masks"], 8)
    parts_on_grid = np.array([len(np.unique(t[1][t[1] > 0])) for t in tokens])
    assert np.mean(parts_on_grid >= 2) >= 0.9


@pytest.mark.parametrize("name", sorted(OBJECT_SPECS))
@pytest.mark.parametrize("mirrored", [False, True])
def test_masks_are_exactly_the_painted_pixels(name: str, mirrored: bool):
    """On a black canvas, the object mask must be exactly the pixels the drawer changed."""
    size = 112
    canvas = LayeredCanvas(np.zeros((size, size, 3), np.uint8))
    spec = OBJECT_SPECS[name]
    height = 0.7 * size
    width = min(height * spec.aspect[0], 0.9 * size)
    frame = Frame((size - width) / 2, 0.15 * size, width, height, mirrored=mirrored)
    spec.draw(canvas, frame, np.random.default_rng(1))
    image, masks = canvas.to_arrays()
    assert np.array_equal(image.any(axis=-1), masks[0] == 1)
    check_nesting(masks, contiguous=False)
    parts, subparts = masks[1], masks[2]
    part_ids = np.unique(parts[parts > 0])
    assert len(part_ids) >= 2
    assert max(len(np.unique(subparts[parts == p])) for p in part_ids) >= 2
