"""Quantization recipes, TRT-LLM checkpoints, runtimes and the search CLI."""
