"""Every config setting, changed alone, moves exactly the stage keys it should.

storage/keys.py builds the keys from the `keyed(...)` declarations beside each field in storage/config.py.
The expected moves are written out here, independently of those declarations: a setting wrongly declared
as one that does not key (`generator.steps` as run-only, say, which would reuse stale weights) fails here.
"""
import types
import typing

import pytest
from pydantic import BaseModel

from storage.config import TFConfig, load_config
from storage.keys import ignored_note, ignored_settings, stage_keys

EVALUATIONS = {"evaluate", "evaluate_flat"}
LEVELS = [f"generator_L{level}" for level in range(4)]   # the default's two cuts: levels 0..3
GENERATORS = set(LEVELS) | {"generator_shared", "generator_flat"}
DECODER = {"decoder"} | EVALUATIONS
JUDGE = {"judge"} | EVALUATIONS
GENERATOR = GENERATORS | EVALUATIONS
SPLIT = {"teacher", "generator_shared", *LEVELS} | EVALUATIONS               # level 0: every level's input
TREE = {"teacher", "generator_shared", *LEVELS[1:]} | EVALUATIONS            # the part tree: levels 1..
LATENTS = {"latents", "teacher", "decoder"} | GENERATORS | EVALUATIONS
ALL = {"images", "judge"} | LATENTS
NONE: set[str] = set()

# What a change of a setting moves under the default config (scenes, clustered teacher, per-level
# generators): its section's stage and everything downstream, but for the exceptions below.
SECTION_MOVES = {"": NONE, "source": ALL, "ingest": NONE, "encoder": LATENTS, "hierarchy": SPLIT,
                 "generator": GENERATOR, "decoder": DECODER, "evaluate": EVALUATIONS, "judge": JUDGE,
                 "concurrency": NONE}
EXCEPTIONS = {
    # how a stage runs, not what it makes
    "encoder.batch_size": NONE, "encoder.gpus": NONE, "encoder.readers": NONE, "encoder.read_timeout_s": NONE,
    "encoder.writers": NONE, "encoder.cpu_decode_share": NONE, "encoder.cuda_graph": NONE,
    "encoder.cpu_decode_processes": NONE, "encoder.gil_switch_ms": NONE, "encoder.nvjpeg_batch": NONE,
    "encoder.gpu_decoder": NONE, "encoder.hierarchy_graph": NONE, "encoder.decode_ahead": NONE,
    "encoder.decode_priority": NONE,
    "encoder.verify_images": NONE,         # a check after the pass: it changes no stored value
    "generator.compile": NONE, "generator.compile_tuning": NONE, "generator.checkpoint_every": NONE,
    "generator.jvp_attention": NONE, "generator.device_batch": NONE, "decoder.checkpoint_every": NONE,
    "generator.mode": NONE,                # picks the folders a run trains and evaluates, each keyed alike
    "generator.sharing": {"evaluate"},     # which generators the staged evaluation samples
    "encoder.read_from": NONE,             # auto and image_store both read the scenes' image store
    "ingest.sample_pixels": NONE,          # the scenes keep every image (see the direct-read test)
    "hierarchy.lam": TREE, "hierarchy.linkage": TREE, "hierarchy.cut_mode": TREE,
    "hierarchy.cuts": {"teacher", "generator_shared", "generator_L2", "generator_L3"} | EVALUATIONS,
}
# A valid other value where the generic one (changed_value) would not be.
CHANGED = {"source.image_size": 126,                       # a multiple of the patch size 14
           "source.resize_short": 126, "judge.input_size": 128,   # a multiple of 8 * stem_stride
           "hierarchy.cuts": [0.65, 0.3],                  # the second cut: levels 2 and 3
           "encoder.read_from": "image_store"}             # files: refused for the scenes
FIXED = {"hierarchy.algorithm"}                            # one allowed value: nothing to change it to


def settings(model: type[BaseModel], prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted name, field info) of every setting, sections walked into."""
    out = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += settings(info.annotation, f"{name}.")
        else:
            out.append((prefix + name, info))
    return out


def _value(cfg: TFConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def changed_value(dotted: str, info, current):
    """Another valid value of a setting: the other choice, half the number, one more, a longer string."""
    if dotted in CHANGED:
        return CHANGED[dotted]
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return next(option for option in typing.get_args(annotation) if option != current)
    if current is None:   # an optional setting left unset: set it
        kind = args[0]
        return {str: "/elsewhere/x", int: 64, float: 0.5}[kind]
    if isinstance(current, bool):
        return not current
    if isinstance(current, float):
        return current / 2 if current else 0.1
    if isinstance(current, int):
        return current + 1
    if isinstance(current, str):
        return current + "x"
    if isinstance(current, list):
        return current[:-1] if len(current) > 1 else [0.5]
    raise TypeError(f"no changed value for {dotted} = {current!r}")


def moved(base: TFConfig, other: TFConfig) -> set[str]:
    a, b = stage_keys(base).as_dict(), stage_keys(other).as_dict()
    return {k for k in a if a[k] != b[k]}


def _override(dotted: str, value) -> str:
    return f"{dotted}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"


@pytest.mark.parametrize("dotted", [name for name, _ in settings(TFConfig)])
def test_each_setting_moves_exactly_the_keys_it_should(dotted):
    base_overrides = ["source.path=/data"] if dotted == "source.kind" else []   # imagefolder needs a path
    base = load_config(None, base_overrides)
    info = dict(settings(TFConfig))[dotted]
    if dotted in FIXED:
        assert len(typing.get_args(info.annotation)) == 1, f"{dotted} has more than one value now: test it"
        return
    value = changed_value(dotted, info, _value(base, dotted))
    other = load_config(None, base_overrides + [_override(dotted, value)])
    assert _value(other, dotted) != _value(base, dotted)
    section = dotted.split(".")[0] if "." in dotted else ""
    expected = EXCEPTIONS.get(dotted, SECTION_MOVES[section])
    assert moved(base, other) == expected, dotted


def test_every_setting_is_covered():
    names = {name for name, _ in settings(TFConfig)}
    assert set(EXCEPTIONS) <= names and set(CHANGED) <= names and FIXED <= names   # no stale entries
    assert len(names) > 100


def test_direct_read_settings_move_the_image_store_and_the_decoder():
    """With encode reading the source's files, the image store keeps a pixel sample (ingest.sample_pixels)
    that the decoder trains on; encoder.read_from picks that path, `auto` resolving to it."""
    base = load_config(None, ["source.kind=imagefolder", "source.path=/data"])
    assert moved(base, load_config(None, ["source.kind=imagefolder", "source.path=/data",
                                          "ingest.sample_pixels=32"])) == {"images"} | DECODER
    assert moved(base, load_config(None, ["source.kind=imagefolder", "source.path=/data",
                                          "encoder.read_from=files"])) == NONE
    assert moved(base, load_config(None, ["source.kind=imagefolder", "source.path=/data",
                                          "encoder.read_from=image_store"])) == ALL - {"judge"}   # no judge


GROUND_TRUTH_IGNORES = ["hierarchy.k=3", "hierarchy.alpha=0.5", "hierarchy.lam=0.5", "hierarchy.cuts=[0.6, 0.3]",
                        "hierarchy.cut_mode=quantile", "hierarchy.linkage=complete", "hierarchy.seed=4",
                        "hierarchy.backend=batched"]


@pytest.mark.parametrize("override", GROUND_TRUTH_IGNORES)
def test_the_ground_truth_teacher_ignores_every_clustering_setting(override):
    """The oracle teacher is the scenes' masks: no clustering setting shapes it, so none moves its key
    (no new teacher store, no re-evaluation), and the config says it ignores the setting."""
    base = load_config(None, ["hierarchy.source=ground_truth"])
    other = load_config(None, ["hierarchy.source=ground_truth", override])
    assert moved(base, other) == NONE
    name = override.split("=")[0]
    assert list(ignored_settings(other)) == [name] and not ignored_settings(base)
    note = ignored_note(other)
    assert name in note and "ground_truth" in note and "\n" not in note
    # the same setting under the clustered teacher is used, and moves the teacher
    assert "teacher" in moved(load_config(None, []), load_config(None, [override]))
    assert not ignored_settings(load_config(None, [override]))


def test_switching_the_teacher_moves_every_level():
    assert moved(load_config(None, ["hierarchy.source=ground_truth"]), load_config(None, [])) == SPLIT


def test_the_scenes_ignore_the_pixel_sample_and_say_so():
    cfg = load_config(None, ["ingest.sample_pixels=8"])
    assert list(ignored_settings(cfg)) == ["ingest.sample_pixels"] and "image store" in ignored_note(cfg)
    assert ignored_note(load_config(None, [])) is None


def test_a_setting_without_a_declaration_is_refused_when_the_section_is_made():
    from typing import Annotated

    from storage.config import UNKEYED, _Part

    with pytest.raises(TypeError, match="Extra.forgotten: declare the stage keys"):
        types.new_class("Extra", (_Part,), exec_body=lambda ns: ns.update(
            {"__annotations__": {"kept": Annotated[int, UNKEYED], "forgotten": int}, "kept": 1, "forgotten": 2}))
