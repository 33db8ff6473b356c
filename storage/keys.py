"""Stage keys (DESIGN §5): hash of a stage's own config, its upstream keys and a code version.

A generator is keyed by the partitions it reads (levels l and l-1), so changing one
hierarchy cut retrains only the levels whose inputs moved.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from storage.config import TFConfig

# Bump a stage's version when its output would change for the same config.
CODE_VERSIONS = {
    "images": "1",
    "latents": "1",
    "teacher": "1",
    "decoder": "1",
    "generator": "1",
    "evaluate": "3",   # 2: streamed, FD-DINOv2 on the class token; 3: final_hierarchy re-encode rows, mode
}


RUN_ONLY = {"compile", "compile_tuning", "checkpoint_every", "jvp_attention"}   # how a model is trained, not which weights come out


def stable_hash(obj: object, length: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def partition_keys(cfg: TFConfig) -> list[str]:
    """One key per level 0..L-1 saying what that level's partition depends on."""
    h = cfg.hierarchy
    split = {"algorithm": h.algorithm, "k": h.k, "alpha": h.alpha, "seed": h.seed}
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

    def as_dict(self) -> dict[str, str]:
        out = {"images": self.images, "latents": self.latents, "teacher": self.teacher,
               "decoder": self.decoder, "evaluate": self.evaluate}
        out.update({f"generator_L{l}": k for l, k in enumerate(self.generators)})
        return out


def stage_keys(cfg: TFConfig) -> StageKeys:
    v = CODE_VERSIONS
    images = stable_hash({"source": cfg.source.model_dump(), "v": v["images"]})
    encoder = cfg.encoder.model_dump(exclude={"batch_size"})
    latents = stable_hash({"encoder": encoder, "up": images, "v": v["latents"]})
    teacher = stable_hash({"hierarchy": cfg.hierarchy.model_dump(), "up": latents, "v": v["teacher"]})
    # settings that change how, not what, is trained stay out of the keys
    decoder = stable_hash({"decoder": cfg.decoder.model_dump(exclude=RUN_ONLY), "up": latents, "v": v["decoder"]})
    parts = partition_keys(cfg)
    gen_cfg = cfg.generator.model_dump(exclude=RUN_ONLY | {"mode"})
    generators = tuple(
        stable_hash({"generator": gen_cfg, "latents": latents, "level": level,
                     "target": parts[level], "condition": parts[level - 1] if level else "none",
                     "v": v["generator"]})
        for level in range(len(parts))
    )
    evaluate = stable_hash({"evaluate": cfg.evaluate.model_dump(), "generators": generators,
                            "decoder": decoder, "teacher": teacher, "v": v["evaluate"]})
    return StageKeys(images, latents, teacher, decoder, generators, evaluate, tuple(parts))


class Layout:
    """Where every stage writes under one root: `<stage>-<key>/`."""

    def __init__(self, root: str | Path, cfg: TFConfig):
        self.root = Path(root)
        self.keys = stage_keys(cfg)

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

    def evaluation(self) -> Path:
        return self.root / f"evaluate-{self.keys.evaluate}"

    def tables(self) -> Path:
        return self.root / "tables"
