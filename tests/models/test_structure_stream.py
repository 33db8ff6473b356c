"""The hierarchy that evaluation rebuilds (final latent, re-encoded image) follows the teacher's rule:
it clusters the standardised latents, i.e. the normalised final latent as it is and the raw re-encoded
tokens standardised with the latent store's mean/std."""
import numpy as np

from models.hierarchy.reference import build_hierarchies
from models.evaluation.structure_stream import final_hierarchy, structure_chunk
from specs import hierarchy_spec


def test_rebuilt_hierarchies_cluster_standardised_latents():
    rng = np.random.default_rng(0)
    n, g, channels = 4, 6, 8
    scale = np.array([40.0, 40.0, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02])   # loud and quiet channels
    mean, std = rng.normal(0, 30, channels), scale
    final = rng.standard_normal((n, g * g, channels)).astype(np.float32)  # normalised latents
    final[:, :18, 2:] += 2.0                                              # structure in the quiet channels
    raw = final.astype(np.float64) * std + mean                           # what the encoder would give
    spec = hierarchy_spec()
    expected = build_hierarchies(final.reshape(n, g, g, channels), spec).reshape(n, -1, g * g)
    np.testing.assert_array_equal(final_hierarchy(final, spec, (mean, std)), expected)
    assert not np.array_equal(expected, build_hierarchies(raw.reshape(n, g, g, channels), spec).reshape(n, -1, g * g))

    # flat baseline block: its regions are the rebuilt final hierarchy; the re-encoded raw tokens of the
    # same latents rebuild the same hierarchy once standardised (agreement 1 at every level)
    out = structure_chunk(final[None], raw.reshape(n, g, g, channels), 0.05, spec, n, latent_stats=(mean, std))
    np.testing.assert_array_equal(out["regions"], expected)
    np.testing.assert_allclose(out["values"]["reencode_ari_final"], 1.0)
    assert "nesting" not in out["values"] and "reencode_ari" not in out["values"]   # no plan in a flat block
