"""Checkpoint formats: streaming readers and writers, one tensor at a time."""
