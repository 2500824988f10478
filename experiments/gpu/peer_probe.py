"""One peer of experiments.peers alone in this process, for finding why it fails on a GPU: builds it, generates
twice (the second time from the warm compiled step) and prints the tokens' first row and the full traceback of
any failure. Run one process per peer (a CUDA fault poisons the process), with CUDA_LAUNCH_BLOCKING=1 to name
the failing kernel:  python -m experiments.gpu.peer_probe llama2-7b hf-compile [--eager]
"""
from __future__ import annotations

import sys
import time
import traceback

import torch

from experiments.latency import synthetic_prompts
from experiments.peers import HFPeer
from quant.runtime.random_checkpoint import SHAPES


def main(argv: list[str]) -> int:
    shape, name = argv[0], argv[1]
    eager = "--eager" in argv
    t = time.time()
    try:
        peer = HFPeer(shape, name, torch.device("cuda"), max_len=512 + 64, compile=not eager)
        print(f"{name}: built in {time.time() - t:.1f} s, {peer.describe()}", flush=True)
        prompts = synthetic_prompts(1, 512, SHAPES[shape]["vocab_size"], seed=0)
        for i in range(2):
            g = peer.generate(prompts, 64)
            ms = sorted(g.step_s)[len(g.step_s) // 2] * 1e3
            print(f"{name} run {i}: {time.time() - t:.1f} s, step median {ms:.3f} ms, "
                  f"tokens {g.tokens[0][:8]}", flush=True)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
