"""Ingest: an image source -> the image store (listing, pixels, rejects, skipped entries)."""
