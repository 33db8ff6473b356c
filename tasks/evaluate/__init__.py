"""Evaluate: sample, score and store trajectories; the metric tables."""
