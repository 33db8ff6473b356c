"""Metrics computed outside the streaming engine, whose values the evaluation hands in (Scored.supplied).

- control: the edit suite (models.generator.edit_suite) on the kept trajectories: locality, adherence and
  preservation per level and edit kind; the flat baseline has no levels to edit;
- alignment: ARI / mIoU of the teacher partition against the ground-truth masks (sources with masks);
- decoder: the decoder's PSNR / SSIM on its held-out images (from its checkpoint).

Their rows go through the same writer as the engine's, so their skips and extractor labels live here.
"""
from __future__ import annotations

from models.evaluation.registry import EvalSetting, Metric, RowKey, level_rows, register

CONTROL_METRICS = ("locality_latent", "locality_pixel", "adherence", "adherence_baseline",
                   "preservation_coarse_identical", "preservation_psnr_outside", "preservation_ssim_outside")
NO_EDITS = "flat baseline: no levels to edit"


class Controllability(Metric):
    name, order, group = "control", 60, "control"
    headline = (("locality_pixel (mean)", "locality_pixel"), ("psnr_outside (mean)", "preservation_psnr_outside"))
    plots = (("controllability", "locality_latent"), ("controllability", "locality_pixel"),
             ("controllability", "preservation_psnr_outside"))
    summary = ("locality_latent", "preservation_coarse_identical")
    units = (("locality_latent", "change outside ÷ inside the region; lower is better"),
             ("locality_pixel", "change outside ÷ inside the region; lower is better"),
             ("adherence", "cosine similarity, edited final vs source, in the region (-1 to 1)"),
             ("adherence_baseline", "cosine similarity, unedited final vs source, in the region (-1 to 1)"),
             ("preservation_coarse_identical", "share of edits (0-1); 1 is required"),
             ("preservation_psnr_outside", "dB (capped at 100); higher is better"),
             ("preservation_ssim_outside", "SSIM (-1 to 1); higher is better"))

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        # staged: one row per (metric, level, edit kind) the suite ran; the flat baseline has none to run
        return level_rows("control", CONTROL_METRICS, range(setting.levels)) if setting.flat else []

    def skip_reason(self, setting: EvalSetting, key: RowKey) -> str | None:
        return NO_EDITS if setting.flat else None


class HierarchyAlignment(Metric):
    name, order, group = "alignment", 70, "alignment"
    headline = (("teacher ari (mean)", "ari"),)
    summary = ("ari",)
    units = (("ari", "adjusted Rand index (-1 to 1; 0 chance); higher is better"),
             ("miou", "mean IoU (0-1); higher is better"))


class DecoderHoldout(Metric):
    name, order, group, extractor = "decoder", 80, "decoder", "none"
    summary = ("holdout_psnr",)
    units = (("holdout_psnr", "dB; higher is better"), ("holdout_ssim", "SSIM (-1 to 1); higher is better"))

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        return [RowKey("decoder", "holdout_psnr"), RowKey("decoder", "holdout_ssim")]


for entry in (Controllability(), HierarchyAlignment(), DecoderHoldout()):
    register(entry)
