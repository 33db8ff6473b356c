"""tasks.plan: every model spec comes from the one config, each rule of the hierarchy lives in the config
and the math accepts whatever the config accepts, and the two level counts keep their meaning."""
import dataclasses
import itertools
import math

import pytest

from models.decoder import DecoderSpec
from models.evaluation.plan import EvalPlan
from models.generator.dit import DiTConfig
from models.hierarchy.reference import HierarchySpec
from models.generator.meanflow import MeanFlowConfig
from models.generator.optim import OptimConfig
from storage.config import HierarchyConfig, TFConfig, load_config
from tasks.plan import (decoder_spec, decoder_optim, eval_plan, generator_config, generator_optim, hierarchy_spec,
                        objective_config, project)

CONFIG = "configs/tiny.yaml"


@pytest.mark.parametrize("setting, message", [
    ({"k": 1}, "greater than or equal to 2"),
    ({"alpha": -0.1}, "greater than or equal to 0"),
    ({"lam": -1.0}, "greater than or equal to 0"),
    ({"cuts": []}, "non-empty"),
    ({"cuts": [0.2, 0.5]}, "non-increasing"),
    ({"cuts": [0.5, -0.1]}, "at least 0"),
    ({"cuts": [float("nan")]}, "at least 0"),
    ({"cuts": [float("inf")]}, "finite"),
    ({"cuts": [1.5], "cut_mode": "quantile"}, "quantiles in \\[0, 1\\]"),
    ({"linkage": "ward"}, "Input should be"),
    ({"backend": "batched", "linkage": "complete"}, "average linkage with height cuts"),
    ({"backend": "batched", "cut_mode": "quantile"}, "average linkage with height cuts"),
])
def test_each_hierarchy_rule_refuses_on_the_config_alone(setting, message):
    with pytest.raises(ValueError, match=message):
        HierarchyConfig(**setting)


def test_a_height_cut_above_one_is_a_valid_linkage_height():
    """Average linkage of cosine distances plus the spatial term can merge above 1."""
    assert hierarchy_spec(HierarchyConfig(cuts=[1.4, 0.3])).cuts == (1.4, 0.3)


def _spec_accepts(values: dict) -> bool:
    try:
        HierarchySpec(**{**values, "cuts": tuple(values["cuts"]), "seed": 0})
        return True
    except ValueError:
        return False


def test_every_hierarchy_the_config_accepts_the_math_builds_and_what_the_math_refuses_the_config_refuses():
    grid = {"k": [1, 2, 3], "alpha": [-0.5, 0.0, 0.3], "lam": [-0.2, 0.0, 0.2],
            "cuts": [[], [0.65, 0.35], [0.2, 0.5], [1.5, 0.5], [0.5, -0.1], [math.nan], [0.5, 0.5]],
            "cut_mode": ["height", "quantile"], "linkage": ["average", "single", "complete", "weighted"]}
    checked = 0
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        try:
            config = HierarchyConfig(**values)
        except ValueError:
            config = None
        if config is not None:
            assert hierarchy_spec(config) == HierarchySpec(**{**values, "cuts": tuple(values["cuts"]), "seed": 0})
        if not _spec_accepts(values):
            assert config is None, values
        checked += 1
    assert checked == 3 * 3 * 3 * 7 * 2 * 4


def test_the_spec_takes_every_field_from_the_config():
    config = HierarchyConfig(k=3, alpha=0.25, lam=0.5, cuts=[0.8, 0.4, 0.1], cut_mode="quantile",
                             linkage="complete", seed=7)
    spec = hierarchy_spec(config)
    assert dataclasses.asdict(spec) == {"k": 3, "alpha": 0.25, "lam": 0.5, "cuts": (0.8, 0.4, 0.1),
                                        "cut_mode": "quantile", "linkage": "complete", "seed": 7}


def test_objective_and_optimiser_follow_every_setting_they_read():
    """Each MeanFlowConfig field set to a value unlike its default in the config reaches the objective."""
    changed = {"logit_mean": -0.4, "logit_std": 1.3, "time_shift": 2.0, "time_dist": "shifted",
               "uniform_share": 0.3, "equal_share": 0.2, "t_floor": 0.1, "adaptive_eps": 0.02, "v_weight": 0.5,
               "region_weight": 2.0, "label_dropout": 0.1, "v_tangent": "same", "jvp_attention": "math",
               "cond_noise": 0.3}
    assert set(changed) == {f.name for f in dataclasses.fields(MeanFlowConfig)}
    cfg = TFConfig(generator=changed)
    assert dataclasses.asdict(objective_config(cfg)) == changed
    optim = generator_optim(TFConfig(generator={"lr": 1e-3, "batch_size": 5, "grad_clip": 0.5, "ema_kind": "constant",
                                                "ema_decay": 0.99, "ema_decays": [0.9], "optimizer": "muon"}), seed=3)
    assert (optim.lr, optim.batch_size, optim.grad_clip, optim.optimizer, optim.seed) == (1e-3, 5, 0.5, "muon", 3)
    assert optim.ema_decays == [0.9, 0.99]   # the listed ones and the sampled one
    assert optim.ema_halflives_kimg == [500.0, 1000.0, 2000.0]   # the EDM copies are kept beside them


def test_decoder_specs_come_from_the_decoder_section_and_the_data():
    cfg = TFConfig(decoder={"width": 64, "depth": 2, "heads": 2, "steps": 9, "lr": 5e-4, "batch_size": 7, "seed": 4})
    assert decoder_spec(cfg, grid=8, dim=384) == DecoderSpec(token_dim=384, grid=8, patch=14, width=64, depth=2,
                                                                 heads=2)
    optim = decoder_optim(cfg)
    assert (optim.steps, optim.lr, optim.batch_size, optim.seed, optim.ema_decays) == (9, 5e-4, 7, 4, [])


def test_a_parameter_the_config_does_not_define_is_an_error_not_a_silent_default():
    with pytest.raises(TypeError, match="OptimConfig.muon_momentum is not set"):
        project(OptimConfig, TFConfig().generator, ema_decays=[], ema_halflives_kimg=[])
    with pytest.raises(TypeError, match="no field"):
        project(MeanFlowConfig, TFConfig().generator, not_a_field=1)


def test_a_spec_field_named_like_a_method_of_the_section_is_not_filled_with_the_method():
    """`project` fills a spec from the section's settings (model_fields), not from any attribute: a spec
    field `copy` (a pydantic method) or `partition_levels` (a property) is an error unless given."""
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Odd:
        copy: int
        lam: float

    with pytest.raises(TypeError, match="Odd.copy is not set by the config section HierarchyConfig"):
        project(Odd, TFConfig().hierarchy)
    assert project(Odd, TFConfig().hierarchy, copy=2) == Odd(copy=2, lam=0.2)


def test_an_explicit_step_count_is_kept_even_zero():
    cfg = TFConfig()
    assert generator_optim(cfg, seed=0).steps == cfg.generator.steps
    assert generator_optim(cfg, seed=0, steps=0).steps == 0
    assert generator_optim(cfg, seed=0, steps=7).steps == 7


def test_a_models_spec_keeps_a_default_only_for_its_own_constants_and_the_plan_sets_every_other_field():
    """A default on a config setting would be a second definition of it (they once disagreed): each spec's
    defaulted fields are exactly its documented constants, none of them a setting of its config section,
    and the plan builds every spec from the config alone (each required field set)."""
    cfg = TFConfig()
    built = [(hierarchy_spec(cfg.hierarchy), set(), cfg.hierarchy),
             (objective_config(cfg), set(), cfg.generator),
             (generator_optim(cfg, seed=0), {"muon_momentum"}, cfg.generator),
             (decoder_optim(cfg), {"muon_momentum"}, cfg.decoder),
             (generator_config(cfg, grid=8, dim=384, num_classes=6), {"mlp_ratio"}, cfg.generator),
             (decoder_spec(cfg, grid=8, dim=384), {"mlp_ratio"}, cfg.decoder),
             (eval_plan(cfg, keep=4), {"token_seed", "kid_reservoir", "is_reservoir"}, cfg.evaluate)]
    assert {type(spec) for spec, _, _ in built} == {HierarchySpec, MeanFlowConfig, OptimConfig, DiTConfig,
                                                    DecoderSpec, EvalPlan}
    for spec, constants, section in built:
        defaulted = {f.name for f in dataclasses.fields(spec)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
        assert defaulted == constants, type(spec).__name__
        assert not constants & set(type(section).model_fields), type(spec).__name__
        assert all(getattr(spec, name) == getattr(type(spec), name) for name in constants)
        with pytest.raises(TypeError, match="missing"):   # nothing else can be left out
            type(spec)()


def test_the_two_level_counts_mean_partitions_and_trajectory_states():
    cfg = load_config(CONFIG, ["hierarchy.cuts=[0.7, 0.5, 0.2]"])
    h = cfg.hierarchy
    assert (h.partition_levels, h.generator_levels) == (4, 5)
    assert hierarchy_spec(h).partition_levels == h.partition_levels   # the teacher store's levels
    assert generator_config(cfg, grid=4, dim=8, num_classes=3).num_levels == h.generator_levels


def test_the_evaluation_key_follows_the_metric_registry_and_no_other_key_does(tmp_path):
    from models.evaluation.registry import Metric, register, signature, unregister
    from storage.keys import Layout
    from tasks.plan import layout

    cfg = load_config(CONFIG)
    before = layout(tmp_path, cfg)
    assert before.metrics == signature() and len(signature()) >= 5   # the package's entries, name@version

    class Toy(Metric):
        name = "toy_key_metric"

    try:
        register(Toy())
        added = layout(tmp_path, cfg)
        Toy.version = "2"
        revised = layout(tmp_path, cfg)
    finally:
        unregister("toy_key_metric")
    assert layout(tmp_path, cfg).evaluation() == before.evaluation()   # removed again: the key comes back
    evaluations = {before.evaluation(), added.evaluation(), revised.evaluation()}
    assert len(evaluations) == 3   # added, then revised: each moves the key
    assert len({before.flat_evaluation(), added.flat_evaluation()}) == 2
    moved = {k for k, v in added.keys.as_dict().items() if before.keys.as_dict()[k] != v}
    assert moved == {"evaluate", "evaluate_flat"}
    with pytest.raises(ValueError, match="tasks.plan.layout"):   # a layout that cannot know the metric set
        Layout(tmp_path, cfg).evaluation()
    assert Layout(tmp_path, cfg).teacher() == before.teacher()
