import pytest

from storage.config import load_config
from storage.keys import stage_keys


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source:\n  num_images: 10\nhierarchy:\n  cuts: [0.7, 0.3]\n")
    cfg = load_config(path, ["generator.steps=5", "hierarchy.cuts=[0.6, 0.2]", "encoder.weights=null"])
    assert cfg.source.num_images == 10 and cfg.generator.steps == 5
    assert cfg.hierarchy.cuts == [0.6, 0.2] and cfg.encoder.weights is None
    assert cfg.hierarchy.num_levels == 4


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
    assert _changed(base, moved) == ["evaluate", "generator_L2", "generator_L3", "teacher"]


def test_h_part_change_moves_levels_1_and_2():
    base = stage_keys(load_config(None, []))
    moved = stage_keys(load_config(None, ["hierarchy.cuts=[0.7, 0.35]"]))
    assert _changed(base, moved) == ["evaluate", "generator_L1", "generator_L2", "teacher"]


def test_tree_change_moves_levels_1_to_3_and_split_change_all():
    base = stage_keys(load_config(None, []))
    tree = stage_keys(load_config(None, ["hierarchy.lam=0.3"]))
    assert _changed(base, tree) == ["evaluate", "generator_L1", "generator_L2", "generator_L3", "teacher"]
    split = stage_keys(load_config(None, ["hierarchy.alpha=0.5"]))
    assert _changed(base, split) == ["evaluate"] + [f"generator_L{l}" for l in range(4)] + ["teacher"]


def test_encoder_change_moves_everything_but_images():
    base = stage_keys(load_config(None, []))
    moved = stage_keys(load_config(None, ["encoder.model=vit_base_patch14_reg4_dinov2"]))
    assert "images" not in _changed(base, moved) and "latents" in _changed(base, moved)


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
