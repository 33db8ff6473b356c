"""Encode: image files or the image store -> the latent store (and, fused, the teacher store)."""
