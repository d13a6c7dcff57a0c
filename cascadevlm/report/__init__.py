"""Metrics, tables, plots and TensorBoard summaries, computed from prediction records alone."""
