"""Hierarchy: the latent store -> the teacher store (per-image region ids per level)."""
