"""The proof bench's diagnosis (bench/trajectory_proof.py --diagnose, docs/trajectory.md): each level
l > 0 sampled conditioned on the teacher's level-(l-1) canvas of real scenes (teacher-forced) beside its
own generated one, so the per-level token FD separates what each level can do from what it inherits."""
from __future__ import annotations

import numpy as np
import torch

from models.decoder import tensor_to_images
from models.evaluation.eval_stats import JUDGE
from models.evaluation.judge import judge_outputs
from models.evaluation.metrics import feature_stats, frechet_distance
from models.generator.trajectory import level_noises, one_step_level
from tasks.train.level_data import canvases


def teacher_forced(models: list, scoring, samples: int, batch: int, seed: int, device: torch.device) -> dict:
    """Each level l > 0 conditioned on the teacher's level-(l-1) canvas of real scenes (not its own
    generated one): token FD per level against the teacher's level-l canvases, and the judge's
    FD-scenes / class accuracy of the final decoded after a teacher-forced level L-2."""
    latents, levels = scoring.latents, len(models)
    n = min(samples, len(latents))
    index = np.random.default_rng(seed + 7).choice(len(latents), n, replace=False)
    tokens = latents.normalised(index)
    teach = canvases(tokens, scoring.teacher[index])
    labels = latents.label[index].to(device)
    noises = level_noises(levels, tokens.shape[1], tokens.shape[2], list(range(10**6, 10**6 + n)))
    out, final = {}, []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for level in range(1, levels):
            made = []
            for start in range(0, n, batch):
                stop = min(n, start + batch)
                made.append(one_step_level(models[level], noises[level][start:stop].to(device),
                                           teach[level - 1][start:stop].to(device), labels[start:stop], level)
                            .float().cpu())
            made = torch.cat(made)
            gen_tokens = made.reshape(-1, made.shape[-1]).numpy()
            real_tokens = teach[level].reshape(-1, made.shape[-1]).numpy()
            pick = np.random.default_rng(level).permutation(len(gen_tokens))[:20000]
            mu_g, cov_g = feature_stats(gen_tokens[pick])
            mu_r, cov_r = feature_stats(real_tokens[pick])
            out[f"fd_level_L{level}_tokens_teacher_forced"] = round(float(frechet_distance(mu_g, cov_g, mu_r, cov_r)), 4)
            if level == levels - 1:
                final = made
    with torch.no_grad():
        images = np.concatenate([tensor_to_images(scoring.decoder(final[s:s + 256].to(device)).float().cpu())
                                 for s in range(0, n, 256)])
    verdict = judge_outputs(scoring.judge["model"], images, device=device)
    mu, cov = feature_stats(verdict["features"])
    reference = scoring.reference
    out["fd_scenes_teacher_forced_final"] = round(float(frechet_distance(mu, cov, reference[f"{JUDGE}.mean"],
                                                                         reference[f"{JUDGE}.cov"])), 4)
    out["class_accuracy_teacher_forced_final"] = round(float((verdict["logits"].argmax(1) ==
                                                              latents.label[index].numpy()).mean()), 4)
    return out
