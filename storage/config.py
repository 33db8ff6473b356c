"""The one typed pipeline config: YAML in, validated pydantic out, split per stage.

Prefect renders a pydantic model as a form, so flows take `TFConfig` directly. Configs are frozen: a
default built once (a flow's parameter default) can be shared and never changes under anyone.

Every setting declares, beside its definition, which stage keys hash it (`keyed(...)`, below);
storage/keys.py builds every stage key from these declarations and from nothing else.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# --- Which stage keys hash each setting -------------------------------------------------------------
# A stage is recomputed exactly when its key moves, so a setting that changes what a stage makes must
# enter its key, and one that only changes how it runs (threads, batch sizes of inference, snapshot
# periods, compilation) must not. The parts of the keys (storage.keys.stage_keys hashes each part's
# settings, and a key moves every key downstream of it):
KeyPart = Literal[
    "images",      # the image store (and the source listing the latents hang off)
    "latents",     # the latent store
    "teacher",     # the teacher store
    "split",       # level 0 of the clustered partitions: every generator level reads it
    "tree",        # the part tree cut into levels 1..: generators of levels 1..
    "cuts",        # one cut per level: the generators reading that level
    "partitions",  # which teacher the generators' partitions come from
    "decoder", "generator", "judge", "evaluate",   # "generator": per level, shared and flat alike
]
# How a setting enters a part:
KeyRule = Literal[
    "always",       # its value
    "set",          # its value once set away from its default; nothing at the default (an option added
                    # after keys existed: the keys made before it stay)
    "reads_files",  # its value when encode reads the source's files (encoder.read_from), else nothing:
                    # it is unused then
    "read_path",    # "files" when encode reads the source's files, else nothing ("auto" resolves to it)
    "clustered",    # its value with hierarchy.source clustered; its default with the ground-truth teacher,
                    # which ignores it, so changing it there moves nothing (storage.keys.ignored_settings)
    "picks",        # not hashed: it picks which upstream output the part's stage reads, whose key moves
]


@dataclass(frozen=True)
class Keyed:
    """A setting's declaration: (key part, rule) pairs; none for a setting that enters no key."""
    parts: tuple[tuple[str, str], ...]

    def rule(self, part: str) -> str | None:
        return dict(self.parts).get(part)


def keyed(*parts: str, **ruled: str) -> Keyed:
    """`keyed("generator")`: hashed by the generator keys; `keyed(generator="set")`: by a named rule."""
    pairs = tuple((part, "always") for part in parts) + tuple(ruled.items())
    for part, rule in pairs:
        if part not in get_args(KeyPart) or rule not in get_args(KeyRule):
            raise ValueError(f"keyed: unknown key part {part!r} or rule {rule!r}")
    return Keyed(pairs)


UNKEYED = keyed()   # how a stage runs, not what it makes: in no key
IMAGES, LATENTS = keyed("images"), keyed("latents")
SPLIT = keyed("split", teacher="clustered")   # the clustering settings the ground-truth teacher ignores
TREE = keyed("tree", teacher="clustered")
GENERATOR, DECODER, JUDGE, EVALUATE = keyed("generator"), keyed("decoder"), keyed("judge"), keyed("evaluate")


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Every setting (not a section) carries exactly one `keyed(...)`: a new one cannot be left out
        of the keys, or put in them, by omission."""
        super().__pydantic_init_subclass__(**kwargs)
        for name, info in cls.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, _Part):
                continue
            if sum(isinstance(mark, Keyed) for mark in info.metadata) != 1:
                raise TypeError(f"{cls.__name__}.{name}: declare the stage keys that hash it with one "
                                f"Annotated[..., keyed(...)] marker (UNKEYED for none)")


def declaration(section: type[BaseModel], name: str) -> Keyed:
    """The `keyed(...)` of `section.name`."""
    return next(mark for mark in section.model_fields[name].metadata if isinstance(mark, Keyed))


class SourceConfig(_Part):
    kind: Annotated[Literal["scenes", "imagefolder", "imagenet_val", "imagenet_tar"], IMAGES] = "scenes"
    path: Annotated[str | None, IMAGES] = Field(
        None, description="imagefolder: class-folder root; imagenet_val: flat val folder; "
                          "imagenet_tar: ILSVRC2012_img_train.tar")
    num_images: Annotated[int, IMAGES] = Field(
        512, ge=0, description="scenes: how many images; other kinds: cap (0 = all)")
    image_size: Annotated[int, IMAGES] = Field(112, ge=28, description="pixels per side after resize + centre crop")
    seed: Annotated[int, IMAGES] = 0
    # ImageNet kinds (storage/imagenet.py).
    resize_short: Annotated[int | None, IMAGES] = Field(
        None, ge=28, description="short side before the centre crop; None: round(image_size*256/224) for "
                                 "imagenet_*, image_size for imagefolder")
    interpolation: Annotated[Literal["bicubic", "bilinear"], IMAGES] = "bicubic"
    labels_file: Annotated[str | None, IMAGES] = Field(
        None, description="imagenet_val: '<file> <synset>' lines, or the devkit ILSVRC2012_validation_ground_truth.txt")
    synsets_file: Annotated[str | None, IMAGES] = Field(
        None, description="imagenet_val: synset order of devkit class ids (meta.mat or one synset a line)")
    index_path: Annotated[str | None, IMAGES] = Field(
        None, description="imagenet_tar: Parquet index (default <tar>.index.parquet)")

    @model_validator(mode="after")
    def _imagenet_fields(self) -> "SourceConfig":
        if self.kind == "imagenet_val" and not self.labels_file:
            raise ValueError("source.labels_file is required when source.kind is 'imagenet_val'")
        if self.resize_short is not None and self.resize_short < self.image_size:
            raise ValueError(f"source.resize_short {self.resize_short} is below source.image_size {self.image_size}")
        return self


class IngestConfig(_Part):
    chunk_size: Annotated[int, UNKEYED] = Field(64, ge=1, description="samples per chunk (= Zarr chunk and shard)")
    workers: Annotated[int, UNKEYED] = Field(2, ge=1, description="Dask local-cluster processes")
    dask_address: Annotated[str | None, UNKEYED] = Field(
        None, description="existing Dask scheduler, e.g. tcp://host:8786")
    worker_loss_timeout: Annotated[float, UNKEYED] = Field(
        120.0, gt=0, description="seconds with no Dask worker left before a stage stops with NoWorkers "
                                 "(finished chunks keep their markers)")
    sample_pixels: Annotated[int, keyed(images="reads_files")] = Field(
        64, ge=0, description="ImageNet sources read by encode from the files (encoder.read_from): the image "
                              "store keeps the pixels of only the first N samples, for the dashboards and the "
                              "decoder's training set; the scenes keep every image")


class EncoderConfig(_Part):
    model: Annotated[str, LATENTS] = "vit_small_patch14_reg4_dinov2"
    weights: Annotated[str | None, LATENTS] = Field(
        None, description="local timm/HF safetensors or original *_pretrain.pth")
    allow_random_init: Annotated[bool, LATENTS] = False
    batch_size: Annotated[int, UNKEYED] = Field(64, ge=1)
    dtype: Annotated[Literal["float16", "float32", "bfloat16"], LATENTS] = Field(
        "float16", description="latent storage dtype (bfloat16: stored as uint16 bit patterns, read back as float32)")
    read_from: Annotated[Literal["auto", "files", "image_store"], keyed(images="read_path", latents="read_path")] = \
        Field("auto", description="what encode reads: files = the source's image files, decoded on the GPU (nvjpeg) "
                                  "or CPU, cropped, resized and encoded in one pass (no uint8 copy on disk); "
                                  "image_store = the pixels ingest stored; auto = files for imagefolder / "
                                  "imagenet_val / imagenet_tar, image_store for the scenes (they carry "
                                  "ground-truth masks)")
    gpus: Annotated[int, UNKEYED] = Field(
        0, ge=0, description="read_from files without ingest.dask_address: local GPUs encoding disjoint chunks, "
                             "one pass each (0 = every visible GPU)")
    readers: Annotated[int, UNKEYED] = Field(
        8, ge=1, description="read_from files: threads reading (and on CPU decoding) files")
    read_timeout_s: Annotated[float, UNKEYED] = Field(
        300.0, gt=0, description="read_from files: a batch's files not read this long after they are needed "
                                 "(a hung network file system) become reject rows")
    writers: Annotated[int, UNKEYED] = Field(
        2, ge=1, description="read_from files: threads writing finished chunks (each holds one chunk's host buffer)")
    cuda_graph: Annotated[bool, UNKEYED] = Field(
        False, description="read_from files on CUDA, in this process: the encoder replayed as one CUDA graph per "
                           "batch shape (one launch a batch; tasks.encode.cuda_graph); Dask workers run it eagerly")
    hierarchy_graph: Annotated[bool, UNKEYED] = Field(
        False, description="with the hierarchy in the encode pass on CUDA: it replayed as one CUDA graph per batch "
                           "shape (tasks.encode.cuda_graph.HierarchyGraphs). Off: on an H100 it cut the hierarchy's "
                           "host time 4.3 -> 1.1 s but not the stage's, which waits for JPEG decoding (docs/gpu.md)")
    cpu_decode_share: Annotated[float | None, UNKEYED] = Field(
        0.0, ge=0.0, le=1.0, description="read_from files on CUDA: the share of each batch's JPEGs the reader "
                                         "threads decode on the CPU while nvjpeg decodes the rest; null = "
                                         "balanced from the measured rates of both (tasks.encode.decode). 0: the "
                                         "one H100 run with the balance was slower than nvjpeg alone "
                                         "(docs/gpu.md)")
    cpu_decode_processes: Annotated[int, UNKEYED] = Field(
        0, ge=0, description="with a CPU decode share: decode it in this many spawned processes instead of the "
                             "reader threads (no GIL shared with the thread launching the encoder); 0: threads")
    nvjpeg_batch: Annotated[int | None, UNKEYED] = Field(
        None, ge=1, description="read_from files on CUDA: files per nvjpeg call (null: a batch's in one call). "
                                "Alone on an H100 calls of 64 decoded 10,700 img/s, of 512 7,800; inside the "
                                "pass, beside the encoder, not yet measured (docs/gpu.md)")
    gpu_decoder: Annotated[Literal["torchvision", "nvimgcodec", "auto"], UNKEYED] = Field(
        "torchvision", description="read_from files on CUDA: the GPU's JPEG decoder (tasks.encode.gpu_jpeg). "
                                   "torchvision: nvjpeg through torchvision (its hardware backend for the files "
                                   "that takes); nvimgcodec: the hardware JPEG engines through nvImageCodec (pip "
                                   "nvidia-nvimgcodec-cu13), what they refuse decoded on the CPU; auto: nvimgcodec "
                                   "where it works, else torchvision (the encode stage's decoded_by names the one "
                                   "that ran)")
    decode_ahead: Annotated[int, UNKEYED] = Field(
        2, ge=0, description="read_from files on CUDA: batches a preparing thread decodes and resizes ahead of the "
                             "encoder on a side stream; 0: the pass's own thread decodes each batch on its stream "
                             "just before encoding it. Beside the encoder the GPU decoders starve (H200: nvjpeg "
                             "111 img/s, nvImageCodec 88), one after the other they ran 4,532 img/s (docs/gpu.md)")
    decode_priority: Annotated[Literal["normal", "high"], UNKEYED] = Field(
        "normal", description="with decode_ahead > 0 on CUDA: the preparing thread's side stream at CUDA's normal "
                              "or highest priority (its kernels are scheduled before the encoder's queued ones; "
                              "torchvision decodes on a stream of its own). H100 at c235123: no gain (docs/gpu.md)")
    gil_switch_ms: Annotated[float | None, UNKEYED] = Field(
        None, gt=0, description="CPython's GIL time slice in ms while the encode stage runs (sys.setswitchinterval);"
                                " null: CPython's own, 5 ms. The thread driving the GPU takes the GIL back after"
                                " each of hundreds of short calls a batch (tasks.encode.files.gil_switch_interval)")
    stats_images: Annotated[int, keyed(latents="set")] = Field(
        0, ge=0, description="read_from files: 0 = the channel mean/std of every image, known after the pass; "
                             "N = of N images spread evenly over the source, encoded first, so the hierarchy "
                             "(backend batched) runs in the same pass as the encoder")
    verify_images: Annotated[int, UNKEYED] = Field(
        64, ge=0, description="after the pass, this many stored latents spread over the store are encoded again "
                              "one batch at a time (no decoding ahead, no CUDA graph) and must match within a "
                              "relative error of 0.25, or the stage fails before marking anything complete "
                              "(tasks.encode.verify); 0: no check")


class HierarchyConfig(_Part):
    """The teacher hierarchy (DESIGN §3). The only place its rules live: tasks.plan.hierarchy_spec turns
    it into models.hierarchy.reference.HierarchySpec, and a test checks that every config accepted here builds."""
    algorithm: Annotated[Literal["kmeans-agglomerative"], SPLIT] = "kmeans-agglomerative"
    k: Annotated[int, SPLIT] = Field(2, ge=2, description="k-means clusters of level 0 (2: object vs background)")
    alpha: Annotated[float, SPLIT] = Field(
        0.0, ge=0.0, description="weight of the token position in level 0's k-means")
    lam: Annotated[float, TREE] = Field(0.2, ge=0.0, description="weight of the spatial distance in the part linkage")
    cuts: Annotated[list[float], keyed("cuts", teacher="clustered")] = Field(
        default_factory=lambda: [0.65, 0.35],
        description="one cut per finer level, non-increasing: a linkage height, or a quantile of the merge "
                    "heights in [0, 1] (cut_mode)")
    cut_mode: Annotated[Literal["height", "quantile"], TREE] = "height"
    linkage: Annotated[Literal["average", "complete", "single", "weighted"], TREE] = "average"
    seed: Annotated[int, SPLIT] = 0
    # the batched code's partitions are their own (a key part of their own once set)
    backend: Annotated[Literal["reference", "batched"], keyed(teacher="clustered", split="set")] = Field(
        "reference", description="reference: scikit-learn/scipy per image on CPU workers; batched: torch over a "
                                 "chunk at once, on the GPU when there is one (average linkage, height cuts)")
    source: Annotated[Literal["clustered", "ground_truth"], keyed("teacher", partitions="picks")] = Field(
        "clustered", description="clustered: the standardised latents, clustered per image; ground_truth: the "
                                 "oracle teacher, the scenes' ground-truth masks at the token grid (scenes only)")

    @model_validator(mode="after")
    def _cuts_and_backend(self) -> "HierarchyConfig":
        if not self.cuts or any(b > a for a, b in zip(self.cuts, self.cuts[1:])):
            raise ValueError(f"hierarchy.cuts must be non-empty and non-increasing, got {self.cuts}")
        if any(not c >= 0.0 or c == float("inf") for c in self.cuts):   # `not >=` also catches NaN
            raise ValueError(f"hierarchy.cuts must be finite and at least 0, got {self.cuts}")
        if self.cut_mode == "quantile" and any(c > 1.0 for c in self.cuts):
            raise ValueError(f"hierarchy.cuts in cut_mode 'quantile' are quantiles in [0, 1], got {self.cuts}")
        if self.backend == "batched" and (self.linkage != "average" or self.cut_mode != "height"):
            raise ValueError(f"hierarchy.backend 'batched' implements average linkage with height cuts; got "
                             f"linkage {self.linkage!r}, cut_mode {self.cut_mode!r} (use backend 'reference')")
        return self

    @property
    def partition_levels(self) -> int:
        """The teacher's partitions: level 0 (object / background) and one per cut."""
        return len(self.cuts) + 1

    @property
    def generator_levels(self) -> int:
        """The trajectory's states: every partition level, then the full latent."""
        return self.partition_levels + 1


class GeneratorConfig(_Part):
    preset: Annotated[Literal["tiny", "S", "B", "L", "H"], GENERATOR] = "tiny"
    width: Annotated[int | None, GENERATOR] = None
    depth: Annotated[int | None, GENERATOR] = None
    head_depth: Annotated[int | None, GENERATOR] = None
    heads: Annotated[int | None, GENERATOR] = None
    steps: Annotated[int, GENERATOR] = Field(300, ge=1)
    batch_size: Annotated[int, GENERATOR] = Field(64, ge=1)
    # how a step runs, not what it computes: the accumulated gradient is the whole batch's, up to rounding
    device_batch: Annotated[int | None, UNKEYED] = Field(
        None, ge=1, description="the most samples one forward/backward takes on one device: a step's share of "
                                "batch_size runs as near-equal micro-batches whose gradients add up before one "
                                "optimiser step (None: the whole share at once)")
    lr: Annotated[float, GENERATOR] = 3e-4
    weight_decay: Annotated[float, GENERATOR] = 0.0
    warmup_steps: Annotated[int, GENERATOR] = 20
    grad_clip: Annotated[float, GENERATOR] = Field(
        1.0, ge=0.0, description="clip the gradients' total norm to this (0: no clipping, as the reference)")
    ema_kind: Annotated[Literal["edm", "constant"], GENERATOR] = Field(
        "edm", description="the EMA the sampler uses: edm = half-life in kimg ramped up to 5% of the images seen "
                           "(reference), constant = a fixed decay per step")
    ema_halflife_kimg: Annotated[float, GENERATOR] = Field(
        500.0, gt=0, description="edm: the sampled EMA's half-life (also tracked)")
    ema_halflives_kimg: Annotated[list[float], GENERATOR] = Field(
        default_factory=lambda: [500.0, 1000.0, 2000.0], description="EDM EMA copies kept (reference: 500, 1000, 2000)")
    ema_rampup: Annotated[float, GENERATOR] = Field(
        0.05, gt=0, description="edm: half-life at most this share of the images seen")
    ema_decay: Annotated[float, GENERATOR] = Field(
        0.999, description="constant: the sampled EMA's decay (also tracked)")
    ema_decays: Annotated[list[float], GENERATOR] = Field(
        default_factory=list, description="constant-decay EMA copies kept")
    optimizer: Annotated[Literal["adamw", "muon"], GENERATOR] = Field(
        "adamw", description="muon: the reference's optax.contrib.muon(lr, adam_b2=0.95): Newton-Schulz "
                             "orthogonalised Nesterov momentum for every linear weight, NAdam for the rest "
                             "(models/generator/optim.py); adamw: AdamW, betas (0.9, 0.95)")
    # flat or staged picks which folders a run trains and evaluates; each one's key is the same either way
    mode: Annotated[Literal["staged", "flat"], UNKEYED] = Field(
        "staged", description="flat: one one-step model straight to the latent")
    compile: Annotated[bool, UNKEYED] = Field(False, description="torch.compile the network and the JVP")
    compile_tuning: Annotated[bool, UNKEYED] = Field(
        False, description="with compile: tune each compiled kernel's launch parameters (coordinate descent; "
                           "minutes more at the first step, about 2.5% faster steps on an H200)")
    jvp_attention: Annotated[Literal["auto", "kernel", "math"], UNKEYED] = Field(
        "auto", description="attention in the JVP: kernel = fused primal + forward-only tangent kernel "
                            "(Triton on CUDA), math = written out; auto = kernel on CUDA, math elsewhere")
    checkpoint_every: Annotated[int, UNKEYED] = Field(
        100, ge=0, description="training-state snapshot period in steps (0: none)")
    sharing: Annotated[Literal["per_level", "shared"], keyed(evaluate="picks")] = Field(
        "per_level", description="per_level: one generator per level; shared: one generator for every level "
                                 "with level conditioning, each batch drawn from one level (reference code)")
    time_dist: Annotated[Literal["plateau", "shifted"], GENERATOR] = Field(
        "plateau", description="t and r: plateau logit-normal (reference) or the plain shifted logit-normal")
    logit_mean: Annotated[float, GENERATOR] = 0.0
    logit_std: Annotated[float, GENERATOR] = 1.0
    time_shift: Annotated[float, GENERATOR] = 10.0
    uniform_share: Annotated[float, GENERATOR] = 0.1
    equal_share: Annotated[float, GENERATOR] = 0.0
    t_floor: Annotated[float, GENERATOR] = 0.05
    adaptive_eps: Annotated[float, GENERATOR] = 0.01
    v_weight: Annotated[float, GENERATOR] = 1.0
    v_tangent: Annotated[Literal["h0", "same"], GENERATOR] = Field(
        "h0", description="the JVP's tangent v_c: h0 = the v head in its own forward at h = 0 (reference), "
                          "same = the v of u's forward (one forward less per step)")
    region_weight: Annotated[float, GENERATOR] = 1.0
    label_dropout: Annotated[float, GENERATOR] = Field(
        0.0, ge=0.0, lt=1.0, description="label dropout share (for guidance; reference 0)")
    cond_noise: Annotated[float, keyed(generator="set")] = Field(
        0.0, ge=0.0, description="condition augmentation, not in the reference (0): levels > 0 train on their "
                                 "condition canvas plus N(0, s^2), s ~ U(0, cond_noise) per sample, against the "
                                 "exposure bias of docs/trajectory.md")
    seed: Annotated[int, GENERATOR] = 0


class DecoderConfig(_Part):
    checkpoint: Annotated[str | None, DECODER] = Field(
        None, description="load this safetensors decoder instead of training")
    width: Annotated[int, DECODER] = 192
    depth: Annotated[int, DECODER] = 4
    heads: Annotated[int, DECODER] = 4
    steps: Annotated[int, DECODER] = Field(400, ge=1)
    batch_size: Annotated[int, DECODER] = 32
    lr: Annotated[float, DECODER] = 1e-3
    checkpoint_every: Annotated[int, UNKEYED] = Field(
        100, ge=0, description="training-state snapshot period in steps (0: none)")
    holdout: Annotated[float, DECODER] = Field(
        0.1, ge=0.0, lt=1.0, description="share of samples held out for PSNR/SSIM")
    seed: Annotated[int, DECODER] = 0


class EvaluateConfig(_Part):
    num_samples: Annotated[int, EVALUATE] = Field(64, ge=2)
    keep_trajectories: Annotated[int, EVALUATE] = Field(
        64, ge=0, description="trajectories stored whole (every canvas and decoded level)")
    edits_per_level: Annotated[int, EVALUATE] = Field(8, ge=1)
    inception_weights: Annotated[str | None, EVALUATE] = Field(
        None, description="local pt_inception-2015-12-05 weights for FID/KID/IS")
    # models.evaluation.metrics.REGION_THRESHOLD says why 0.3 (storage does not import models; a test keeps them equal)
    region_threshold: Annotated[float, EVALUATE] = Field(
        0.3, gt=0.0, lt=2.0, description="cosine distance that splits a generated canvas into regions")
    snap_canvases: Annotated[bool, EVALUATE] = Field(
        False, description="sample with each generated canvas replaced by its region means before it conditions "
                           "the next level (not in the reference sampler)")
    bootstrap: Annotated[int, EVALUATE] = 1000
    grid_rows: Annotated[int, EVALUATE] = 8
    seed: Annotated[int, EVALUATE] = 1234
    batch_size: Annotated[int, EVALUATE] = Field(
        256, ge=1, description="samples per streamed batch (sampling, decoding, features)")
    structure_samples: Annotated[int, EVALUATE] = Field(
        10_000, ge=0, description="first N samples scored for nesting / plan adherence")
    reencode_samples: Annotated[int, EVALUATE] = Field(
        512, ge=0, description="first N samples re-encoded for ARI / mIoU")
    # keyed since the first evaluation key (taking it out would move every evaluation key)
    structure_workers: Annotated[int, EVALUATE] = Field(
        0, ge=0, description="worker processes for structure values (0: in-process)")
    tokens_per_sample: Annotated[int, EVALUATE] = Field(
        4, ge=0, description="tokens per sample in the token-level FD variant")

    def snap_threshold(self) -> float | None:
        """The sampler's snap cut (models.generator.trajectory.sample_trajectory), None for the reference sampler."""
        return self.region_threshold if self.snap_canvases else None


class JudgeConfig(_Part):
    """The scenes judge (DESIGN §4, models/evaluation/judge.py): trained on the real scenes, scores generated ones."""
    holdout: Annotated[float, JUDGE] = Field(
        0.15, gt=0.0, lt=1.0, description="share of real scenes (the last ones) held out for its accuracy / mIoU")
    steps: Annotated[int, JUDGE] = Field(512, ge=1)
    batch_size: Annotated[int, JUDGE] = Field(16, ge=1)
    lr: Annotated[float, JUDGE] = 3e-3
    width: Annotated[int, JUDGE] = Field(16, ge=4, description="channels of the first conv stage (then 2x, 4x, 8x)")
    input_size: Annotated[int, JUDGE] = Field(
        112, ge=16, description="images are resized to this side (multiple of 8 * stem_stride)")
    stem_stride: Annotated[Literal[1, 2], JUDGE] = 2
    dice_weight: Annotated[float, JUDGE] = Field(
        1.0, ge=0.0, description="soft-Dice weight per region beside the pixel cross-entropy")
    seed: Annotated[int, JUDGE] = 0

    @model_validator(mode="after")
    def _input_fits(self) -> "JudgeConfig":
        if self.input_size % (8 * self.stem_stride):
            raise ValueError(f"judge.input_size {self.input_size} is not a multiple of 8 * judge.stem_stride "
                             f"({8 * self.stem_stride})")
        return self


class ConcurrencyConfig(_Part):
    on_locked: Annotated[Literal["wait", "fail"], UNKEYED] = Field(
        "wait", description="a second run on a stage another live run is writing: wait for it, or fail at once")
    wait_timeout_s: Annotated[float, UNKEYED] = Field(
        3600.0, gt=0, description="how long `wait` waits before failing")


class TFConfig(_Part):
    """Everything a run needs. Each stage hashes only its own part plus upstream keys."""

    name: Annotated[str, UNKEYED] = "scenes"
    device: Annotated[Literal["auto", "cpu", "cuda"], UNKEYED] = "auto"
    source: SourceConfig = Field(default_factory=SourceConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    hierarchy: HierarchyConfig = Field(default_factory=HierarchyConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)   # scenes only: the evaluation's own judge
    concurrency: ConcurrencyConfig = Field(default_factory=ConcurrencyConfig)   # not part of any stage key

    @model_validator(mode="after")
    def _consistent(self) -> "TFConfig":
        if self.source.kind != "scenes" and not self.source.path:
            raise ValueError(f"source.path is required when source.kind is {self.source.kind!r}")
        if self.source.kind == "scenes" and self.source.num_images < 2:
            raise ValueError("source.num_images must be at least 2 for scenes")
        patch = encoder_patch(self.encoder.model)
        if self.source.image_size % patch:
            raise ValueError(f"source.image_size {self.source.image_size} is not a multiple of the patch size {patch} "
                             f"of encoder.model {self.encoder.model}: the token grid would not be whole "
                             f"(nearest: {max(patch, self.source.image_size // patch * patch)})")
        if self.hierarchy.source == "ground_truth":
            self._ground_truth_fits()
        return self

    def _ground_truth_fits(self) -> None:
        from storage.scenes import GT_LEVELS   # here: only this case needs the scenes module

        if self.source.kind != "scenes":
            raise ValueError(f"hierarchy.source 'ground_truth' needs source.kind 'scenes' (the only source with "
                             f"ground-truth masks), got source.kind {self.source.kind!r}")
        levels = self.hierarchy.partition_levels
        if levels != GT_LEVELS:
            raise ValueError(f"hierarchy.source 'ground_truth': the scenes carry {GT_LEVELS} ground-truth levels "
                             f"(object, parts, subparts) but hierarchy.cuts {self.hierarchy.cuts} gives "
                             f"len(cuts) + 1 = {levels} partition levels; use {GT_LEVELS - 1} cuts")


def encode_reads_files(cfg: TFConfig) -> bool:
    """Whether encode reads the source's files directly (encoder.read_from, resolved for this source)."""
    if cfg.encoder.read_from == "auto":
        return cfg.source.kind != "scenes"
    if cfg.encoder.read_from == "files" and cfg.source.kind == "scenes":
        raise ValueError("encoder.read_from 'files' needs an image-file source (imagefolder, imagenet_val, "
                         "imagenet_tar); the scenes are rendered, not read: use 'image_store' or 'auto'")
    return cfg.encoder.read_from == "files"


def encoder_patch(model: str) -> int:
    """Patch size from a timm name (`..._patch14_...`); DINOv2 names without it use 14."""
    match = re.search(r"patch(\d+)", model)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else 14


def preflight(cfg: TFConfig, command: str, levels: list[int] | None = None) -> None:
    """Combinations that only fail later, refused before any work starts (files, not just values:
    a config is also validated on machines that do not hold the files, so this is not in the model)."""
    if command in ("pipeline", "encode", "evaluate"):
        _check_encoder_weights(cfg.encoder)
    reads_files = encode_reads_files(cfg)   # also refuses read_from files for the scenes
    if cfg.encoder.stats_images and not reads_files:
        raise ValueError("encoder.stats_images applies to the direct path (encoder.read_from files): the image "
                         "store path computes the channel statistics of every image; set it to 0")
    if command in ("pipeline", "ingest") or (command == "encode" and reads_files):
        _check_source_files(cfg.source)
    if command in ("pipeline", "train") and cfg.decoder.checkpoint:
        weights = cfg.decoder.checkpoint.removesuffix(".safetensors") + ".safetensors"
        if not os.path.isfile(weights):
            raise ValueError(f"decoder.checkpoint {weights} does not exist")
    if command == "judge" and cfg.source.kind != "scenes":
        raise ValueError(f"the scenes judge is trained on the built-in scenes (labels and ground-truth masks); "
                         f"source.kind is {cfg.source.kind!r}")
    num_levels = cfg.hierarchy.generator_levels
    bad = [l for l in (levels or []) if not 0 <= l < num_levels]
    if bad:
        raise ValueError(f"--level {bad} does not match the hierarchy: hierarchy.cuts {cfg.hierarchy.cuts} "
                         f"gives levels 0..{num_levels - 1}")


def _check_encoder_weights(enc: EncoderConfig) -> None:
    """A configured weights file must exist and read as weights, whatever allow_random_init says: that
    only stands in for weights left unset, never for a typo. Whether the tensors fit encoder.model is
    checked where they are loaded (tasks.encode.encoder_load names the mismatched tensors)."""
    if not enc.weights:
        if not enc.allow_random_init:
            raise ValueError("encoder.weights is not set and encoder.allow_random_init is false: give a local "
                             "weights file (encoder.weights=/path/dinov2.safetensors) or allow a random init")
        return
    if enc.weights == "hf-cache":
        return
    location = os.path.expanduser(enc.weights)   # as models.encoder.resolve_weights reads it
    if not os.path.exists(location):
        raise ValueError(f"encoder.weights {enc.weights} does not exist " + (
            "(encoder.allow_random_init: true only stands in for an unset encoder.weights)"
            if enc.allow_random_init else "and encoder.allow_random_init is false"))
    # A folder (HF cache root, repo or snapshot) is resolved by models.encoder, which names what it
    # looked for when nothing is there.
    if os.path.isfile(location):
        from storage.files import weights_shapes

        try:
            weights_shapes(location)
        except (ValueError, OSError) as error:
            reason = (error.strerror or str(error)) if isinstance(error, OSError) else str(error)
            raise ValueError(f"encoder.weights {enc.weights}: cannot be read as a weights file: {reason}") from None


_SOURCE_PATHS = {"imagefolder": "folder", "imagenet_val": "folder", "imagenet_tar": "file"}


def _check_source_files(src: SourceConfig) -> None:
    """The files an ingest reads: source.path (and imagenet_val's label files) exist and are the right kind."""
    if src.kind not in _SOURCE_PATHS:
        return
    labels = src.kind == "imagenet_val"   # the only kind that reads them
    for key, value, kind in (("source.path", src.path, _SOURCE_PATHS[src.kind]),
                             ("source.labels_file", src.labels_file if labels else None, "file"),
                             ("source.synsets_file", src.synsets_file if labels else None, "file")):
        if not value:
            continue
        if not os.path.exists(value):
            raise ValueError(f"{key} {value} does not exist (source.kind {src.kind!r})")
        if kind == "folder" and not os.path.isdir(value):
            raise ValueError(f"{key} {value} is not a folder (source.kind {src.kind!r} reads a folder)")
        if kind == "file" and not os.path.isfile(value):
            raise ValueError(f"{key} {value} is not a file (source.kind {src.kind!r} reads a file there)")


def _coerce(value: str) -> Any:
    """`--set a.b=value`: parse the value as YAML so numbers, lists and null work."""
    return yaml.safe_load(value) if value != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"--set {item!r}: empty key segment in {key!r}")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part} is not a section")
        try:
            node[parts[-1]] = _coerce(value)
        except yaml.YAMLError as error:
            raise ValueError(f"--set {key}: the value {value!r} is not valid YAML ({error})") from None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TFConfig:
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must hold a mapping")
    return TFConfig.model_validate(apply_overrides(data, overrides or []))
