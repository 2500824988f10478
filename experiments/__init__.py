"""Evaluation datasets, ROUGE, latency measurement, results and plots."""
