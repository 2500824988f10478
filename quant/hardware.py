"""What a GPU must have to run a format natively: the one capability rule."""
from __future__ import annotations

FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
FP8_GEMM_ALGOS = ("FP8", "W4A8_AWQ")  # quant_algos whose GEMMs take FP8 activations


def fp8_refusal(device) -> str | None:
    """None when the CUDA ``device`` has FP8, else why not, as the end of a one-line error."""
    import torch

    cap = tuple(torch.cuda.get_device_capability(device))
    if cap >= FP8_MIN_CAPABILITY:
        return None
    return (f"FP8 needs a GPU of compute capability ≥ 8.9 (Ada/Hopper); {torch.cuda.get_device_name(device)} is "
            f"{cap[0]}.{cap[1]}")
