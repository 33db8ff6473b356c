"""Agreement of partitions: a pair of single-region partitions is left out, not scored a perfect 1.0."""
import numpy as np
import pytest

from models.evaluation.trajectory_metrics import reencode_agreement, teacher_structure
from tasks.evaluate.rows import values_rows

T = 8
ONE_REGION = np.zeros(T, np.int64)
HALVES = np.repeat([0, 1], T // 2)
QUARTERS = np.repeat([0, 1, 2, 3], T // 4)


def _agreement(pairs):
    own = [np.stack([o for o, _ in pairs])]
    rebuilt = np.stack([r for _, r in pairs])[:, None, :]
    return {v.metric: v for v in reencode_agreement(own, rebuilt)}


def test_two_single_region_partitions_carry_no_agreement():
    """A grey canvas and a grey image are each one region; ARI and mIoU would both call that 1.0."""
    values = _agreement([(ONE_REGION, ONE_REGION)])
    assert np.isnan(values["reencode_ari"].values[0])
    assert np.isnan(values["reencode_miou"].values[0])


def test_a_single_region_against_a_split_is_still_scored():
    values = _agreement([(ONE_REGION, HALVES), (QUARTERS, ONE_REGION)])
    assert values["reencode_ari"].values == pytest.approx([0.0, 0.0])
    # own one region (the target), rebuilt halves: the best match covers half of it
    assert values["reencode_miou"].values[0] == pytest.approx(0.5)
    # own quarters, rebuilt one region: one of the four own regions is matched, with IoU 1/4
    assert values["reencode_miou"].values[1] == pytest.approx(1 / 16)


def test_rows_count_only_the_informative_pairs():
    values = _agreement([(ONE_REGION, ONE_REGION), (HALVES, HALVES[::-1]), (QUARTERS, ONE_REGION)])
    [row] = values_rows([values["reencode_ari"]], n_boot=50)
    assert row["n"] == 2
    assert row["value"] == pytest.approx(0.5)   # (1.0 + 0.0) / 2, the trivial pair not counted
    [skipped] = values_rows([_agreement([(ONE_REGION, ONE_REGION)])["reencode_ari"]], n_boot=50)
    assert skipped["status"] == "skipped"


def test_teacher_structure_counts_parts_the_cut_merges_across_an_object_border_as_not_nested():
    a, b, c, d = np.eye(4)[:, :4]
    level0 = np.array([[a, a, b, b]])                      # object | background: two regions
    level1 = np.array([[c, d, d, a]])                      # token 1 (object) and token 2 (background) alike
    latent = np.array([[a, b, c, d]])
    out = teacher_structure([level0, level1, latent], threshold=0.3)
    assert out["two_region_L0"] == 1.0 and out["regions_L0"] == 2 and out["regions_L1"] == 3
    assert out["nesting_L0"] == pytest.approx(2 / 3)       # {t0} and {t3} nest; {t1, t2} straddles the border
    apart = teacher_structure([level0, np.array([[c, d, a, b]]), latent], threshold=0.3)
    assert apart["nesting_L0"] == 1.0                      # distinct parts: perfectly nested
