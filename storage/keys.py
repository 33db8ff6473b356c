"""Stage keys (DESIGN §5): hash of a stage's own config, its upstream keys and a code version.

A generator is keyed by the partitions it reads (levels l and l-1), so changing one
hierarchy cut retrains only the levels whose inputs moved.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from storage.config import TFConfig, encode_reads_files

# The stages a run can be forced to recompute (with everything downstream): a choice list, so Prefect
# validates `force` before the run starts and shows it as a dropdown, and the CLI offers the same.
Stage = Literal["ingest", "encode", "hierarchy", "train", "judge", "evaluate"]

# Bump a stage's version when its output would change for the same config.
CODE_VERSIONS = {
    "images": "1",
    "latents": "2",    # 2: final norm without its affine (ref, RAE)
    "teacher": "2",    # 2: clusters the standardised latents; hierarchy.source (ground-truth oracle)
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


RUN_ONLY = {"compile", "compile_tuning", "checkpoint_every", "jvp_attention"}   # how a model is trained, not which weights come out


def stable_hash(obj: object, length: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def partition_keys(cfg: TFConfig) -> list[str]:
    """One key per level 0..L-1 saying what that level's partition depends on (with the teacher's
    code version: a change of how partitions are made moves the generators that read them)."""
    h = cfg.hierarchy
    if h.source == "ground_truth":   # the scenes' masks at the token grid: no clustering setting enters
        return [stable_hash({"source": h.source, "level": level, "v": CODE_VERSIONS["teacher"]})
                for level in range(h.partition_levels)] + ["raw"]
    split = {"algorithm": h.algorithm, "k": h.k, "alpha": h.alpha, "seed": h.seed, "v": CODE_VERSIONS["teacher"]}
    if h.backend != "reference":   # the batched code agrees up to ties, so it is its own partition
        split["backend"] = h.backend
    tree = {"lam": h.lam, "linkage": h.linkage, "cut_mode": h.cut_mode}
    keys = [stable_hash({"split": split})]
    for cut in h.cuts:
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
    # device; it enters the keys only when on, so image-store configs (the scenes) keep theirs.
    # Direct latents hang off the listing (the source), not off the sampled pixels, so changing
    # ingest.sample_pixels re-ingests a few images and re-encodes none.
    direct = encode_reads_files(cfg)
    listing = stable_hash({"source": cfg.source.model_dump(), "v": v["images"]})
    images = stable_hash({"source": cfg.source.model_dump(), "v": v["images"], "pixels": {
        "read_from": "files", "sample_pixels": cfg.ingest.sample_pixels}}) if direct else listing
    encoder = cfg.encoder.model_dump(exclude={"batch_size", "read_from", "gpus", "readers", "read_timeout_s"})
    if direct:
        encoder["read_from"] = "files"
    latents = stable_hash({"encoder": encoder, "up": listing, "v": v["latents"]})
    teacher = stable_hash({"hierarchy": cfg.hierarchy.model_dump(), "up": latents, "v": v["teacher"]})
    # settings that change how, not what, is trained stay out of the keys
    decoder_part = {"decoder": cfg.decoder.model_dump(exclude=RUN_ONLY), "up": latents, "v": v["decoder"]}
    if direct:   # it trains on the image store's pixel sample (tasks.ingest.with_stored_pixels)
        decoder_part["pixels"] = images
    decoder = stable_hash(decoder_part)
    parts = partition_keys(cfg)
    # The level count sizes the level embedding, so it is in every generator's key; how the levels are
    # held (sharing) picks the folder, not the weights of a per-level model.
    gen_cfg = cfg.generator.model_dump(exclude=RUN_ONLY | {"mode", "sharing"})
    if not gen_cfg["cond_noise"]:   # an option added off: generators trained before it keep their keys
        del gen_cfg["cond_noise"]
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
    judge = stable_hash({"judge": cfg.judge.model_dump(), "up": images, "v": v["judge"]}) \
        if cfg.source.kind == "scenes" else ""
    sampled = [shared] if cfg.generator.sharing == "shared" else list(generators)
    evaluate = stable_hash({"evaluate": cfg.evaluate.model_dump(), "generators": sampled,
                            "decoder": decoder, "teacher": teacher, "judge": judge, "v": v["evaluate"],
                            "metrics": sorted(metrics)})
    # The flat baseline's evaluation: the same settings over the flat generator, beside the staged one.
    flat_evaluate = stable_hash({"evaluate": cfg.evaluate.model_dump(), "generators": [flat], "mode": "flat",
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
