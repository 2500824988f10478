"""Runtimes that execute a TRT-LLM checkpoint: the PyTorch runtime here, TensorRT-LLM engines elsewhere."""
