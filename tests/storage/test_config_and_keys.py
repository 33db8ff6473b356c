import pytest

from storage.config import load_config
from storage.keys import stage_keys


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source:\n  num_images: 10\nhierarchy:\n  cuts: [0.7, 0.3]\n")
    cfg = load_config(path, ["generator.steps=5", "hierarchy.cuts=[0.6, 0.2]", "encoder.weights=null"])
    assert cfg.source.num_images == 10 and cfg.generator.steps == 5
    assert cfg.hierarchy.cuts == [0.6, 0.2] and cfg.encoder.weights is None
    assert cfg.hierarchy.generator_levels == 4


@pytest.mark.parametrize("bad", [["hierarchy.cuts=[0.3, 0.6]"], ["source.image_size=100"],
                                 ["nonsense.key=1"], ["source.kind=imagefolder"], ["generator.steps"]])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ValueError):
        load_config(None, bad)


def _changed(before, after):
    a, b = before.as_dict(), after.as_dict()
    return sorted(k for k in a if a[k] != b[k])


def test_h_sub_change_moves_only_levels_2_and_3_and_downstream():
    base = stage_keys(load_config(None, []))
    moved = stage_keys(load_config(None, ["hierarchy.cuts=[0.65, 0.3]"]))
    assert _changed(base, moved) == ["evaluate", "evaluate_flat", "generator_L2", "generator_L3", "generator_shared", "teacher"]


def test_h_part_change_moves_levels_1_and_2():
    base = stage_keys(load_config(None, []))
    moved = stage_keys(load_config(None, ["hierarchy.cuts=[0.7, 0.35]"]))
    assert _changed(base, moved) == ["evaluate", "evaluate_flat", "generator_L1", "generator_L2", "generator_shared", "teacher"]


def test_tree_change_moves_levels_1_to_3_and_split_change_all():
    base = stage_keys(load_config(None, []))
    tree = stage_keys(load_config(None, ["hierarchy.lam=0.3"]))
    assert _changed(base, tree) == ["evaluate", "evaluate_flat", "generator_L1", "generator_L2", "generator_L3", "generator_shared",
                                    "teacher"]
    split = stage_keys(load_config(None, ["hierarchy.alpha=0.5"]))
    assert _changed(base, split) == ["evaluate", "evaluate_flat"] + [f"generator_L{l}" for l in range(4)] + ["generator_shared",
                                                                                             "teacher"]


def test_encoder_change_moves_everything_but_images():
    base = stage_keys(load_config(None, []))
    moved = stage_keys(load_config(None, ["encoder.model=vit_base_patch14_reg4_dinov2"]))
    assert "images" not in _changed(base, moved) and "latents" in _changed(base, moved)


def test_a_new_cut_moves_every_generator_key_and_a_stored_model_of_another_shape_never_loads():
    """The level count sizes the level embedding: with a third cut every generator (per level, shared,
    flat) gets a new key, so old checkpoints are never reused; loading one by hand fails naming it."""

    from models.generator.dit import TrajectoryDiT, dit_config

    base = stage_keys(load_config(None, []))
    more = stage_keys(load_config(None, ["hierarchy.cuts=[0.65, 0.35, 0.15]"]))
    assert len(more.generators) == 5
    assert not set(base.generators) & set(more.generators)
    assert base.shared_generator != more.shared_generator and base.flat_generator != more.flat_generator
    four = TrajectoryDiT(dit_config("tiny", token_dim=8, grid=2, num_classes=6, num_levels=4))
    five = TrajectoryDiT(dit_config("tiny", token_dim=8, grid=2, num_classes=6, num_levels=5))
    with pytest.raises(RuntimeError, match="level_embed"):
        five.load_state_dict(four.state_dict())


def test_sharing_picks_the_folder_not_the_per_level_keys():
    base = stage_keys(load_config(None, []))
    shared = stage_keys(load_config(None, ["generator.sharing=shared"]))
    assert shared.generators == base.generators and shared.shared_generator == base.shared_generator
    assert shared.shared_generator not in base.generators and shared.evaluate != base.evaluate
    assert stage_keys(load_config(None, ["generator.v_tangent=same"])).generators != base.generators


def test_run_only_settings_keep_the_model_keys():
    """compile, snapshot period and mode change how a model is trained, not its weights' key."""
    from storage.config import load_config
    from storage.keys import stage_keys

    base = stage_keys(load_config("configs/tiny.yaml"))
    same = stage_keys(load_config("configs/tiny.yaml", ["generator.compile=true", "generator.checkpoint_every=7",
                                                        "generator.compile_tuning=true",
                                                        "decoder.checkpoint_every=9", "generator.mode=flat"]))
    assert same.generators == base.generators and same.decoder == base.decoder
    other = stage_keys(load_config("configs/tiny.yaml", ["generator.lr=0.002"]))
    assert other.generators != base.generators and other.decoder == base.decoder


def test_ground_truth_teacher_is_keyed_apart_from_the_clustered_one():
    """hierarchy.source is in the teacher key and the partition keys: the two teachers (and the generators
    trained on them) sit side by side over the same latents."""
    base = stage_keys(load_config("configs/tiny.yaml"))
    oracle = stage_keys(load_config("configs/tiny.yaml", ["hierarchy.source=ground_truth"]))
    assert _changed(base, oracle) == ["evaluate", "evaluate_flat"] + [f"generator_L{l}" for l in range(4)] + ["generator_shared",
                                                                                              "teacher"]
    assert oracle.latents == base.latents and oracle.decoder == base.decoder
    assert not set(oracle.partitions[:-1]) & set(base.partitions[:-1]) and oracle.partitions[-1] == "raw"
    assert len(set(oracle.partitions)) == len(oracle.partitions)   # one key per level
    # no clustering setting shapes a ground-truth partition, so none moves its generators
    other = stage_keys(load_config("configs/tiny.yaml", ["hierarchy.source=ground_truth", "hierarchy.lam=0.5",
                                                         "hierarchy.k=3", "hierarchy.cuts=[0.6, 0.2]"]))
    assert other.partitions == oracle.partitions and other.generators == oracle.generators


def test_ground_truth_source_is_refused_where_there_is_no_ground_truth():
    with pytest.raises(ValueError, match=r"hierarchy.source 'ground_truth' needs source.kind 'scenes'.*'imagefolder'"):
        load_config(None, ["hierarchy.source=ground_truth", "source.kind=imagefolder", "source.path=/x"])
    with pytest.raises(ValueError, match=r"3 ground-truth levels .* hierarchy.cuts \[0.7, 0.4, 0.2\] gives "
                                         r"len\(cuts\) \+ 1 = 4 partition levels"):
        load_config(None, ["hierarchy.source=ground_truth", "hierarchy.cuts=[0.7, 0.4, 0.2]"])
    assert load_config(None, ["hierarchy.source=ground_truth"]).hierarchy.source == "ground_truth"
    assert load_config(None, []).hierarchy.source == "clustered"


def test_condition_noise_moves_every_generator_key_and_off_is_the_key_without_it():
    base = stage_keys(load_config(None, []))
    off = stage_keys(load_config(None, ["generator.cond_noise=0.0"]))
    on = stage_keys(load_config(None, ["generator.cond_noise=0.3"]))
    assert off == base
    assert set(on.generators).isdisjoint(base.generators)
    assert on.shared_generator != base.shared_generator and on.flat_generator != base.flat_generator
    assert on.decoder == base.decoder and on.teacher == base.teacher
    with pytest.raises(ValueError):
        load_config(None, ["generator.cond_noise=-0.1"])
