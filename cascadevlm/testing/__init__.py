"""Tiny offline models and real sample photos, used by the tests, the demo and the benchmarks."""
