"""Train: the decoder and the generators (per level, shared or flat), resumable, DDP."""
