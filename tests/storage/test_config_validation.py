"""Config validation: clear messages, a fuzzed loader that only ever says ValueError, impossible
combinations refused before any work, and stores of another config or schema refused with the diff."""
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.cli import main
from storage import zarr_store
from storage.config import TFConfig, load_config, preflight
from storage.keys import stage_keys
from storage.zarr_store import ArraySpec, IncompatibleStore

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"
SECTIONS = list(TFConfig.model_fields)
FIELDS = {name: list(field.annotation.model_fields) for name, field in TFConfig.model_fields.items()
          if hasattr(field.annotation, "model_fields")}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
# Mostly real section/field names, so the fuzz reaches the validators and not only "extra field".
section_bodies = st.fixed_dictionaries({}, optional={s: st.dictionaries(
    st.sampled_from(FIELDS[s]) | st.text(max_size=6), values, max_size=4) for s in FIELDS})
documents = st.one_of(section_bodies, values, st.text(max_size=60))
override = st.builds(lambda k, v: f"{k}={v}",
                     st.sampled_from([f"{s}.{f}" for s in FIELDS for f in FIELDS[s]] + SECTIONS) | st.text(max_size=10),
                     st.text(max_size=10) | st.sampled_from(["[1,2]", "null", "-3", "0.5", "{a: 1}", "[0.9, 0.1]"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents, overrides=st.lists(override, max_size=3))
def test_fuzzed_configs_load_or_fail_with_a_value_error(tmp_path, document, overrides):
    path = tmp_path / "fuzz.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document, allow_unicode=True))
    try:
        cfg = load_config(path, overrides)
    except ValueError as error:   # pydantic's ValidationError is a ValueError
        assert str(error).strip()
        return
    # Whatever loads is a usable config: keys hash, and it survives a YAML round trip unchanged.
    assert stage_keys(cfg).images
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(again) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["source.image_size=100"], "not a multiple of the patch size 14"),
    (["encoder.model=vit_base_patch16_224", "source.image_size=56"], "patch size 16"),
    (["hierarchy.cuts=[0.2, 0.5]"], "non-increasing"),
    (["hierarchy.cuts=[]"], "non-empty"),
    (["hierarchy.k=1"], "greater than or equal to 2"),
    (["source.kind=imagefolder"], "source.path is required"),
    (["generator.steps=0"], "greater than or equal to 1"),
    (["generator.device_batch=0"], r"generator.device_batch\s+Input should be greater than or equal to 1"),
    (["nonsense.key=1"], "Extra inputs are not permitted"),
    (["source=5", "source.kind=scenes"], "source is not a section"),
])
def test_bad_values_are_refused_with_a_message_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIG, overrides)


def test_broken_yaml_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("source: {kind: scenes\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        load_config(path)


def test_missing_weights_without_random_init_refused_before_any_work(tmp_path, capsys):
    root = tmp_path / "root"
    args = ["pipeline", "--config", str(CONFIG), "--root", str(root), "--set", "encoder.allow_random_init=false"]
    assert main(args + ["--set", f"encoder.weights={tmp_path / 'nope.safetensors'}"]) == 2
    assert "nope.safetensors does not exist and encoder.allow_random_init is false" in capsys.readouterr().err
    assert main(args) == 2
    assert "encoder.weights is not set" in capsys.readouterr().err
    assert not root.exists()   # nothing was started, not even the root folder


def test_levels_that_do_not_match_the_hierarchy_are_refused(tmp_path, capsys):
    assert main(["train", "--config", str(CONFIG), "--root", str(tmp_path / "r"), "--level", "4"]) == 2
    assert "--level [4] does not match the hierarchy" in capsys.readouterr().err
    cfg = load_config(CONFIG)
    preflight(cfg, "train", [0, 3])   # levels 0..3 exist for two cuts
    with pytest.raises(ValueError, match="decoder.checkpoint"):
        preflight(load_config(CONFIG, ["decoder.checkpoint=/nowhere/decoder"]), "train")


def _store(path, attrs):
    zarr_store.create_store(path, {"sample": ArraySpec((4,), str, ("sample",), fill_value="")}, 2, attrs)


def test_store_of_another_config_is_refused_with_what_differs(tmp_path):
    _store(tmp_path / "s", {"stage": "images", "key": "k1", "source": {"num_images": 48, "seed": 0}})
    with pytest.raises(IncompatibleStore) as error:
        _store(tmp_path / "s", {"stage": "images", "key": "k1", "source": {"num_images": 64, "seed": 0}})
    assert "source.num_images: stored 48, now 64" in str(error.value)
    assert "seed" not in str(error.value)   # only what differs


def test_store_of_another_schema_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(zarr_store, "SCHEMA_VERSION", 0)
    _store(tmp_path / "s", {"stage": "images", "key": "k1"})
    monkeypatch.undo()
    with pytest.raises(IncompatibleStore, match="schema version 0, this code reads version 1"):
        zarr_store.check_compatible(tmp_path / "s", {"stage": "images", "key": "k1"})


def test_a_complete_store_under_the_wrong_key_is_not_reused(tmp_path):
    from tasks.ingest.stage import ingest_images
    from storage.keys import Layout

    cfg = load_config(CONFIG)
    path = Layout(tmp_path, cfg).images()
    _store(path, {"stage": "images", "key": "somebody-else"})
    zarr_store.mark_complete(path, {"samples": 4})
    with pytest.raises(IncompatibleStore, match="key: stored 'somebody-else'"):
        ingest_images.fn(cfg, str(tmp_path))
    assert np.all(zarr_store.open_array(path, "sample")[:] == "")   # left as it was


def test_the_region_cut_default_is_the_metrics_one():
    from models.evaluation.metrics import REGION_THRESHOLD
    from storage.config import EvaluateConfig

    assert EvaluateConfig().region_threshold == REGION_THRESHOLD
    assert EvaluateConfig().snap_threshold() is None
    assert EvaluateConfig(snap_canvases=True, region_threshold=0.2).snap_threshold() == 0.2
