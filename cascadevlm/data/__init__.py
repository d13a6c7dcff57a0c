"""Datasets: benchmark registry, loading, k-shot splits, the Lightning data module."""
