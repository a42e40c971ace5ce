"""Datasets: MindRecord shards and the batches fed to training on any backend."""
