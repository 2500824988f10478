"""A PyTorch runtime that executes a TRT-LLM LLaMa checkpoint folder (never the HF model).

Greedy decoding over a batch of prompts of different lengths: prompts are left-padded, each sequence gets its
own RoPE positions, and a key mask hides the padding. The KV cache is preallocated for prompt + budget, so
decode steps never reallocate. Everything is expressed with device-agnostic tensor ops; the device and the
compute dtype are constructor arguments, so a CUDA path only adds kernels and graph capture around the same
``_forward``.

Each linear runs its checkpoint format's handler (:mod:`quant.runtime.linear`: int8/int4/FP8 CPU kernels, or an
exact emulation flagged as such); a checkpoint with ``kv_cache_quant_algo`` INT8/FP8 gets a cache stored in that
format with the per-layer ``kv_cache_scaling_factor`` (:mod:`quant.runtime.kv_cache`). ``describe()`` reports both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from quant.checkpoint import Checkpoint, load_checkpoint
from quant.errors import UserError
from quant.formats import LINEARS, layer_group_sizes
from quant.runtime import rope
from quant.runtime.kv_cache import KV_STORAGE, KVCache, QuantizedKVCache, kv_cache_mode
from quant.runtime.linear import make_linear

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Generation:
    """Tokens generated per prompt (EOS excluded) and the wall-clock timings of this call."""

    tokens: list[list[int]]
    prompt_lens: list[int]
    ttft_s: float  # prefill + first token, whole batch
    step_s: list[float] = field(default_factory=list)  # each later decode step, whole batch

    @property
    def decode_steps(self) -> int:
        return len(self.step_s)


class TorchRuntime:
    name = "torch"

    def __init__(self, ckpt: Checkpoint, *, device: str | torch.device = "cpu", compute_dtype: str = "float32"):
        if compute_dtype not in COMPUTE_DTYPES:
            raise UserError(f"compute dtype {compute_dtype!r} not supported (choose from {', '.join(COMPUTE_DTYPES)})")
        self.device = torch.device(device)
        self.dtype = COMPUTE_DTYPES[compute_dtype]
        self.checkpoint_path = ckpt.path
        cfg = ckpt.config
        self.config = cfg
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg["num_key_value_heads"]
        self.head_dim = ckpt.head_size
        self.vocab = cfg["vocab_size"]
        self.eps = float(cfg.get("norm_epsilon", 1e-6))
        self.freq = rope.inv_freq(self.head_dim, float(cfg.get("rotary_base", 10000.0)), cfg.get("rotary_scaling"))
        # Per linear: config's group_size, or a MIXED_PRECISION layer's own from quant_cfg.json.
        group_sizes = layer_group_sizes(cfg, ckpt.path)

        t = ckpt.tensors
        to = dict(device=self.device, dtype=self.dtype)
        self.embedding = t["transformer.vocab_embedding.weight"].to(**to)
        # lm_head rows beyond vocab_size are TP padding; tied checkpoints may omit lm_head entirely.
        lm_head = t.get("lm_head.weight", t["transformer.vocab_embedding.weight"])
        self.lm_head = lm_head[: self.vocab].to(**to).contiguous()
        self.ln_f = t["transformer.ln_f.weight"].to(**to)
        self.layers = []
        for i in range(self.n_layers):
            p = f"transformer.layers.{i}."
            layer = {
                "input_layernorm": t[p + "input_layernorm.weight"].to(**to),
                "post_layernorm": t[p + "post_layernorm.weight"].to(**to),
            }
            for lin in LINEARS:
                sub = {k[len(p + lin) + 1:]: v for k, v in t.items() if k.startswith(p + lin + ".")}
                name = f"layers.{i}.{lin}"
                layer[lin] = make_linear(ckpt.layer_algos[name], sub, dtype=self.dtype, device=self.device,
                                         group_size=group_sizes[name])
            self.layers.append(layer)
        # KV cache format (TRT-LLM: one float32 dequant scale per layer); the scales are not weight bytes.
        self.kv_algo = ckpt.kv_cache_algo
        if self.kv_algo is not None and self.kv_algo not in KV_STORAGE:
            raise UserError(f"the PyTorch runtime has no KV cache for kv_cache_quant_algo {self.kv_algo!r}")
        self.kv_scales = None if self.kv_algo is None else [
            t[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"].float().reshape(()).to(self.device)
            for i in range(self.n_layers)]
        # Bytes one decode step must read, as held in memory here (compute dtype / packed format): everything
        # but the embedding table, of which only the batch's rows are gathered. Basis of implied bandwidth.
        nbytes = lambda x: x.numel() * x.element_size()  # noqa: E731
        self.weight_bytes = nbytes(self.lm_head) + nbytes(self.ln_f) + sum(
            nbytes(layer["input_layernorm"]) + nbytes(layer["post_layernorm"])
            + sum(layer[lin].nbytes for lin in LINEARS) for layer in self.layers)

    @classmethod
    def from_dir(cls, folder: str | Path, **kwargs) -> "TorchRuntime":
        return cls(load_checkpoint(Path(folder)), **kwargs)

    # -- model ---------------------------------------------------------------------------------------------
    def _rmsnorm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # float32 statistics, then back to the compute dtype before the weight, as HF LlamaRMSNorm and TRT-LLM do.
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                 key_mask: torch.Tensor, last_only: bool) -> torch.Tensor:
        """ids/positions [B, T] at cache slots start..start+T-1; key_mask [B, start+T] (True = real token)."""
        B, T = ids.shape
        h = F.embedding(ids, self.embedding)
        cos, sin = rope.cos_sin(positions, self.freq, self.dtype)
        slots = torch.arange(start, start + T, device=self.device)
        keys = torch.arange(start + T, device=self.device)
        allowed = key_mask[:, None, None, :] & (keys[None, :] <= slots[:, None])[None, None]
        # A padding query would see no key at all (NaN softmax): let it see itself; its output is never used.
        allowed = allowed | (keys[None, :] == slots[:, None])[None, None]
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        for i, layer in enumerate(self.layers):
            x = self._rmsnorm(h, layer["input_layernorm"])
            qkv = layer["attention.qkv"](x)
            q, k, v = qkv.split((q_dim, kv_dim, kv_dim), dim=-1)
            q = rope.apply(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = rope.apply(k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            k_all, v_all = cache.update(i, start, k, v)
            attn = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed,
                                                  enable_gqa=self.n_kv != self.n_heads)
            h = h + layer["attention.dense"](attn.transpose(1, 2).reshape(B, T, q_dim))
            x = self._rmsnorm(h, layer["post_layernorm"])
            # TRT-LLM names: fc = gate_proj (the SiLU branch), gate = up_proj.
            h = h + layer["mlp.proj"](F.silu(layer["mlp.fc"](x)) * layer["mlp.gate"](x))
        if last_only:
            h = h[:, -1:]
        return F.linear(self._rmsnorm(h, self.ln_f), self.lm_head)

    def _new_cache(self, batch: int, max_len: int) -> KVCache:
        dims = (self.n_layers, batch, self.n_kv, max_len, self.head_dim, self.dtype, self.device)
        if self.kv_algo is None:
            return KVCache(*dims)
        return QuantizedKVCache(*dims, algo=self.kv_algo, scales=self.kv_scales)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- public API (shared with the TensorRT-LLM runner) --------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, vocab] of one unpadded sequence (perplexity, parity with HF)."""
        x = torch.tensor([ids], device=self.device)
        cache = self._new_cache(1, len(ids))
        pos = torch.arange(len(ids), device=self.device)[None]
        mask = torch.ones(1, len(ids), dtype=torch.bool, device=self.device)
        return self._forward(x, pos, cache, 0, mask, last_only=False)[0].float()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int] | tuple[int, ...] = (),
                 *, ignore_eos: bool = False, pad_id: int = 0) -> Generation:
        """Greedy decoding of a batch; stops a sequence at EOS, the batch when all stopped or at the budget."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate needs at least one non-empty prompt")
        if max_new_tokens <= 0:
            raise UserError("max_new_tokens must be > 0")
        B, lens = len(prompts), [len(p) for p in prompts]
        P = max(lens)
        total = P + max_new_tokens
        dev = self.device
        ids = torch.full((B, P), pad_id, dtype=torch.long)
        key_mask = torch.ones(B, total, dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, P - lens[b]:] = torch.tensor(p, dtype=torch.long)
            key_mask[b, : P - lens[b]] = False
        ids, key_mask = ids.to(dev), key_mask.to(dev)
        lens_t = torch.tensor(lens, device=dev)
        positions = (torch.arange(P, device=dev)[None] - (P - lens_t)[:, None]).clamp(min=0)
        eos = torch.tensor(list(eos_ids) or [-1], device=dev)

        cache = self._new_cache(B, total)
        self._sync()
        t0 = time.perf_counter()
        nxt = self._forward(ids, positions, cache, 0, key_mask[:, :P], last_only=True)[:, -1].argmax(-1)
        out = [nxt]
        done = torch.isin(nxt, eos) if not ignore_eos else torch.zeros(B, dtype=torch.bool, device=dev)
        self._sync()
        ttft = time.perf_counter() - t0
        steps: list[float] = []
        for step in range(1, max_new_tokens):
            if not ignore_eos and bool(done.all()):
                break
            t1 = time.perf_counter()
            slot = P + step - 1
            logits = self._forward(nxt[:, None], (lens_t + step - 1)[:, None], cache, slot,
                                   key_mask[:, : slot + 1], last_only=True)
            nxt = logits[:, -1].argmax(-1)
            if not ignore_eos:
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                done = done | torch.isin(nxt, eos)
            out.append(nxt)
            self._sync()
            steps.append(time.perf_counter() - t1)

        gen = torch.stack(out, dim=1).tolist()
        eos_set = set(eos_ids)
        tokens = []
        for row in gen:
            if not ignore_eos:
                cut = next((j for j, tok in enumerate(row) if tok in eos_set), len(row))
                row = row[:cut]
            tokens.append(row)
        return Generation(tokens=tokens, prompt_lens=lens, ttft_s=ttft, step_s=steps)

    def describe(self) -> dict:
        """Kernels the linears run, whether any part is an emulation (and which), and the KV cache mode."""
        handlers = [layer[lin] for layer in self.layers for lin in LINEARS]
        kernels = sorted({h.kernel for h in handlers})
        emulated_parts = sorted({h.kernel for h in handlers if h.emulated})
        if self.kv_algo is not None:
            emulated_parts.append("kv_cache")  # attention reads a dequantized copy, not int8/fp8 directly
        return {"backend": self.name, "version": torch.__version__, "device": str(self.device),
                "compute_dtype": str(self.dtype).removeprefix("torch."), "kernels": kernels,
                "emulated": bool(emulated_parts), "emulated_parts": emulated_parts,
                "kv_cache": kv_cache_mode(self.kv_algo, self.dtype)}
