"""Stage keys (DESIGN §5): hash of a stage's own config, its upstream keys and a code version.

A generator is keyed by the partitions it reads (levels l and l-1), so changing one
hierarchy cut retrains only the levels whose inputs moved.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel

from storage.config import KeyRule, TFConfig, declaration, encode_reads_files

# The stages a run can be forced to recompute (with everything downstream): a choice list, so Prefect
# validates `force` before the run starts and shows it as a dropdown, and the CLI offers the same.
Stage = Literal["ingest", "encode", "hierarchy", "train", "judge", "evaluate"]

# Bump a stage's version when its output would change for the same config.
CODE_VERSIONS = {
    "images": "1",
    "latents": "2",    # 2: final norm without its affine (ref, RAE)
    "teacher": "2",    # 2: clusters the standardised latents; hierarchy.source (ground-truth oracle)
    "clustering": "2",  # the clustered teacher's partitions alone (not the ground-truth one's); 2: an exact
                        # tie between the k-means clusters for the object goes to the later one, as the
                        # reference's `0 if d0 < d1 else 1`, in both backends alike
    "decoder": "3",     # 2: EDM EMA with ramp-up; 3: its k-th update at step k, 1024 images a step (ref)
    "generator": "3",   # 2: reference-exact objective (plateau times, x-pred v head, summed loss, EDM EMA);
                        # 3: the EMA's k-th update at step k, 1024 images a step; optimizer muon is optax's
    "evaluate": "5",   # 2: streamed, FD-DINOv2 on the class token; 3: final_hierarchy re-encode rows, mode;
                       # 4: scenes-judge rows (FD-scenes, class accuracy, pixel plan adherence);
                       # 5: a snapped trajectory's own regions are its pieces (snap_canvases).
                       # The engine's version: the metrics themselves enter the key as the registry's
                       # signature (`metrics`, one `name@version` per entry), so adding one needs no bump here.
    "judge": "1",
}


def stable_hash(obj: object, length: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


_OMIT = object()

# The rules under which a setting can go unused: whether this config uses it, and why not when not.
_USED_WHEN = {
    "reads_files": (encode_reads_files, "encode reads the image store, not the source's files (encoder.read_from)"),
    "clustered": (lambda cfg: cfg.hierarchy.source == "clustered",
                  "hierarchy.source is ground_truth: the scenes' masks are the teacher"),
}


def _used(rule: str, cfg: TFConfig) -> bool:
    return rule not in _USED_WHEN or _USED_WHEN[rule][0](cfg)


def _hashed(rule: str, value, default, cfg: TFConfig):
    """What a setting contributes to a key part under its rule (storage.config.KeyRule): a value, or _OMIT."""
    if rule == "always":
        return value
    if rule == "set":
        return _OMIT if value == default else value
    if rule == "reads_files":
        return value if _used(rule, cfg) else _OMIT
    if rule == "read_path":
        return "files" if encode_reads_files(cfg) else _OMIT
    if rule == "clustered":
        return value if _used(rule, cfg) else default
    if rule == "picks":
        return _OMIT
    raise ValueError(f"unknown key rule {rule!r}")


assert set(get_args(KeyRule)) == {"always", "set", "reads_files", "read_path", "clustered", "picks"}


def _default(section: BaseModel, name: str):
    return type(section).model_fields[name].get_default(call_default_factory=True)


def keyed_settings(section: BaseModel, part: str, cfg: TFConfig) -> dict:
    """The settings of one config section that key `part` hashes, each as its declaration says
    (storage.config: the `keyed(...)` beside every field). The only way a setting enters a key."""
    dumped = section.model_dump()
    out = {}
    for name in type(section).model_fields:
        rule = declaration(type(section), name).rule(part)
        if rule is not None:
            value = _hashed(rule, dumped[name], _default(section, name), cfg)
            if value is not _OMIT:
                out[name] = value
    return out


def ignored_settings(cfg: TFConfig) -> dict[str, str]:
    """{`section.field`: why} of every setting set away from its default that this config does not use
    (the cuts of a ground-truth teacher, the pixel sample when encode reads the image store): it moves
    no key and changes nothing, which a run says before it starts."""
    ignored = {}
    for section_name in TFConfig.model_fields:
        section = getattr(cfg, section_name)
        if not isinstance(section, BaseModel):
            continue
        for name in type(section).model_fields:
            unused = [rule for _, rule in declaration(type(section), name).parts if not _used(rule, cfg)]
            if unused and getattr(section, name) != _default(section, name):
                ignored[f"{section_name}.{name}"] = _USED_WHEN[unused[0]][1]
    return ignored


def ignored_note(cfg: TFConfig) -> str | None:
    """One line naming the settings this config ignores (ignored_settings) and why, or None."""
    dumped, by_reason = cfg.model_dump(), {}
    for setting, why in ignored_settings(cfg).items():
        section, name = setting.split(".")
        by_reason.setdefault(why, []).append(f"{setting}={dumped[section][name]}")
    if not by_reason:
        return None
    return "; ".join(f"ignored ({why}): {', '.join(settings)}" for why, settings in by_reason.items()) + \
        "; they change nothing and no stage is recomputed for them"


def partition_keys(cfg: TFConfig) -> list[str]:
    """One key per level 0..L-1 saying what that level's partition depends on (with the teacher's
    code version: a change of how partitions are made moves the generators that read them)."""
    h = cfg.hierarchy
    if h.source == "ground_truth":   # the scenes' masks at the token grid: no clustering setting enters
        return [stable_hash({"source": h.source, "level": level, "v": CODE_VERSIONS["teacher"]})
                for level in range(h.partition_levels)] + ["raw"]
    versions = {"v": CODE_VERSIONS["teacher"], "clustering": CODE_VERSIONS["clustering"]}
    split = keyed_settings(h, "split", cfg) | versions
    tree = keyed_settings(h, "tree", cfg)
    keys = [stable_hash({"split": split})]
    for cut in keyed_settings(h, "cuts", cfg)["cuts"]:
        keys.append(stable_hash({"split": split, "tree": tree, "cut": cut}))
    keys.append("raw")  # the last level is the latent itself
    return keys


@dataclass(frozen=True)
class StageKeys:
    images: str
    latents: str
    teacher: str
    decoder: str
    generators: tuple[str, ...]
    evaluate: str
    partitions: tuple[str, ...] = field(default=())
    shared_generator: str = ""   # generator.sharing: shared, one model for every level
    flat_generator: str = ""     # generator.mode: flat, the one-step baseline
    judge: str = ""              # the scenes judge (source.kind scenes only; "" otherwise)
    flat_evaluate: str = ""      # the flat baseline's evaluation (generator.mode: flat)

    def as_dict(self) -> dict[str, str]:
        out = {"images": self.images, "latents": self.latents, "teacher": self.teacher,
               "decoder": self.decoder, "evaluate": self.evaluate}
        out.update({f"generator_L{l}": k for l, k in enumerate(self.generators)})
        out.update({"generator_shared": self.shared_generator, "generator_flat": self.flat_generator})
        out["judge"] = self.judge
        out["evaluate_flat"] = self.flat_evaluate
        return out


def stage_keys(cfg: TFConfig, metrics: tuple[str, ...] = ()) -> StageKeys:
    """Every stage's key. `metrics`: the evaluation's metric set (models.evaluation.registry.signature(),
    handed in by tasks.plan.layout: storage does not import models); it enters the evaluate keys only."""
    v = CODE_VERSIONS
    # The direct path (encoder.read_from files) keeps only a sample of pixels and preprocesses on the
    # device; it enters the keys only when on (the rules read_path and reads_files), so image-store
    # configs (the scenes) keep theirs.
    # Direct latents hang off the listing (the source), not off the sampled pixels, so changing
    # ingest.sample_pixels re-ingests a few images and re-encodes none.
    direct = encode_reads_files(cfg)
    source = keyed_settings(cfg.source, "images", cfg)
    listing = stable_hash({"source": source, "v": v["images"]})
    pixels = keyed_settings(cfg.ingest, "images", cfg) | keyed_settings(cfg.encoder, "images", cfg)
    images = stable_hash({"source": source, "v": v["images"], "pixels": pixels}) if pixels else listing
    encoder = keyed_settings(cfg.encoder, "latents", cfg)
    latents = stable_hash({"encoder": encoder, "up": listing, "v": v["latents"]})
    teacher_part = {"hierarchy": keyed_settings(cfg.hierarchy, "teacher", cfg), "up": latents, "v": v["teacher"]}
    if cfg.hierarchy.source == "clustered":
        teacher_part["clustering"] = v["clustering"]
    teacher = stable_hash(teacher_part)
    decoder_part = {"decoder": keyed_settings(cfg.decoder, "decoder", cfg), "up": latents, "v": v["decoder"]}
    if direct:   # it trains on the image store's pixel sample (tasks.ingest.stage.with_stored_pixels)
        decoder_part["pixels"] = images
    decoder = stable_hash(decoder_part)
    parts = partition_keys(cfg)
    # The level count sizes the level embedding, so it is in every generator's key; how the levels are
    # held (sharing) picks the folder, not the weights of a per-level model.
    gen_cfg = keyed_settings(cfg.generator, "generator", cfg)
    num_levels = len(parts)
    generators = tuple(
        stable_hash({"generator": gen_cfg, "latents": latents, "level": level, "num_levels": num_levels,
                     "target": parts[level], "condition": parts[level - 1] if level else "none",
                     "v": v["generator"]})
        for level in range(num_levels)
    )
    shared = stable_hash({"generator": gen_cfg, "latents": latents, "partitions": parts, "shared": True,
                          "v": v["generator"]})
    flat = stable_hash({"generator": gen_cfg, "latents": latents, "num_levels": num_levels, "flat": True,
                        "v": v["generator"]})
    # The judge reads the real scenes only (images, labels, masks), so the image store is its one upstream.
    judge = stable_hash({"judge": keyed_settings(cfg.judge, "judge", cfg), "up": images, "v": v["judge"]}) \
        if cfg.source.kind == "scenes" else ""
    sampled = [shared] if cfg.generator.sharing == "shared" else list(generators)   # generator.sharing picks
    evaluation = keyed_settings(cfg.evaluate, "evaluate", cfg)
    evaluate = stable_hash({"evaluate": evaluation, "generators": sampled,
                            "decoder": decoder, "teacher": teacher, "judge": judge, "v": v["evaluate"],
                            "metrics": sorted(metrics)})
    # The flat baseline's evaluation: the same settings over the flat generator, beside the staged one.
    flat_evaluate = stable_hash({"evaluate": evaluation, "generators": [flat], "mode": "flat",
                                 "decoder": decoder, "teacher": teacher, "judge": judge, "v": v["evaluate"],
                                 "metrics": sorted(metrics)})
    return StageKeys(images, latents, teacher, decoder, generators, evaluate, tuple(parts), shared, flat, judge,
                     flat_evaluate)


class Layout:
    """Where every stage writes under one root: `<stage>-<key>/`."""

    def __init__(self, root: str | Path, cfg: TFConfig, metrics: tuple[str, ...] | None = None):
        """`metrics`: the evaluation's metric set, which its folder's key depends on. A layout built
        without it (None) serves every other stage and refuses to name an evaluation folder: build it
        with tasks.plan.layout(root, cfg), which hands in the registry's signature."""
        self.root = Path(root)
        self.metrics = metrics
        self.keys = stage_keys(cfg, metrics or ())
        self.sharing = cfg.generator.sharing
        self.mode = cfg.generator.mode

    def images(self) -> Path:
        return self.root / f"images-{self.keys.images}"

    def latents(self) -> Path:
        return self.root / f"latents-{self.keys.latents}"

    def teacher(self) -> Path:
        return self.root / f"teacher-{self.keys.teacher}"

    def decoder(self) -> Path:
        return self.root / f"decoder-{self.keys.decoder}"

    def generator(self, level: int) -> Path:
        return self.root / f"generator-L{level}-{self.keys.generators[level]}"

    def shared_generator(self) -> Path:
        return self.root / f"generator-shared-{self.keys.shared_generator}"

    def flat_generator(self) -> Path:
        return self.root / f"generator-flat-{self.keys.flat_generator}"

    def level_generator(self, level: int) -> Path:
        """Where the generator that samples `level` lives: its own folder, or the shared one."""
        return self.shared_generator() if self.sharing == "shared" else self.generator(level)

    def _needs_metrics(self) -> None:
        if self.metrics is None:
            raise ValueError("this Layout was built without the evaluation's metric set, which the evaluation "
                             "folder's key depends on: build it with tasks.plan.layout(root, cfg)")

    def evaluation(self) -> Path:
        """The staged evaluation (every level)."""
        self._needs_metrics()
        return self.root / f"evaluate-{self.keys.evaluate}"

    def flat_evaluation(self) -> Path:
        self._needs_metrics()
        return self.root / f"evaluate-flat-{self.keys.flat_evaluate}"

    def mode_evaluation(self) -> tuple[Path, str]:
        """(folder, key) of the evaluation this config runs: staged, or the flat baseline's beside it."""
        if self.mode == "flat":
            return self.flat_evaluation(), self.keys.flat_evaluate
        return self.evaluation(), self.keys.evaluate

    def judge(self) -> Path:
        return self.root / f"judge-{self.keys.judge}"

    def tables(self) -> Path:
        return self.root / "tables"
