"""A PyTorch runtime that executes a TRT-LLM LLaMa checkpoint folder (never the HF model).

Greedy decoding over a batch of prompts of different lengths: prompts are left-padded, each sequence gets its
own RoPE positions, and a key mask hides the padding. The KV cache is preallocated for prompt + budget, so
decode steps never reallocate. Everything is expressed with device-agnostic tensor ops; the device and the
compute dtype are constructor arguments, so a CUDA path only adds kernels and graph capture around the same
``_forward``.

Each linear runs its checkpoint format's handler (:mod:`quant.runtime.linear`: int8/int4/FP8 CPU kernels, or an
exact emulation flagged as such); a checkpoint with ``kv_cache_quant_algo`` INT8/FP8 gets a cache stored in that
format with the per-layer ``kv_cache_scaling_factor`` (:mod:`quant.runtime.kv_cache`). ``describe()`` reports both.

On CUDA (``device="cuda"``, compute dtype float16/bfloat16 advised) the same model runs as:

- prefill: one fused RMSNorm/quantize prologue per linear, the format's GEMM (cuBLAS, ``_int_mm``, ``_scaled_mm``,
  or Triton for few rows), RoPE and the KV write as here, and SDPA — FlashAttention when the batch has no left
  padding (``is_causal``), the memory-efficient kernel with the key mask otherwise;
- prefill, with graphs on, is captured as a CUDA graph per (batch, prompt lengths) too and replayed on new
  token ids (a small batch's prefill is otherwise bound by the CPU launching ~25 kernels per layer);
- decode: a static KV cache per (batch, prompt + budget) and one step captured as a CUDA graph and replayed:
  per layer RMSNorm (+ int8/fp8 quantization) and the qkv GEMV, a RoPE + cache-write kernel, split-KV attention
  reading the int8/fp8 or fp16 cache directly, the dense GEMV with the residual add fused, RMSNorm and fc‖gate
  as one GEMV, SiLU·gate and the proj GEMV with the residual add fused (at batch 1; larger batches use the
  ``tl.dot``/library kernels of :mod:`quant.runtime.linear`); argmax, EOS bookkeeping and the position/slot
  increments are in the graph too, so the host only replays it. fc and gate are stacked into one linear at
  load when their input side (pre-quant / activation scales) is identical, as ModelOpt exports them.

Per-step times on CUDA come from CUDA events between graph replays (no host sync per step unless EOS is
checked).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from quant.checkpoint import Checkpoint, load_checkpoint, validate_checkpoint
from quant.errors import UserError
from quant.formats import layer_group_sizes
from quant.hardware import FP8_GEMM_ALGOS, fp8_refusal
from quant.names import LINEARS
from quant.runtime import rope
from quant.runtime.kv_cache import KV_STORAGE, KVCache, QuantizedKVCache, kv_cache_mode
from quant.runtime.linear import concat_linear_tensors, make_linear
from quant.runtime.schemes.base import DequantAhead, KernelConfig, _Handler, card_kernels
from quant.runtime.schemes.dense import DenseLinear

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_cache_emulated(device: str | torch.device) -> bool:
    """A quantized KV cache is dequantized into a full-precision copy before attention off CUDA."""
    return torch.device(device).type != "cuda"


def emulated_parts(quant_algo: str | None, kv_algo: str | None, device: str | torch.device) -> list[str]:
    """What of a checkpoint of this format runs emulated on ``device``, known before building it (the search
    plans with it; :meth:`TorchRuntime.describe` reports what the loaded handlers actually run)."""
    parts = []
    if quant_algo in FP8_GEMM_ALGOS and torch.device(device).type != "cuda":
        parts.append("emulated-fp8")
    if kv_algo is not None and kv_cache_emulated(device):
        parts.append("kv_cache")
    return parts


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

    def __init__(self, ckpt: Checkpoint, *, device: str | torch.device = "cpu", compute_dtype: str = "float32",
                 kernels: KernelConfig | None = None):
        """``kernels``: which kernel each CUDA path takes (the CPU path has one per format); None: the defaults,
        with this card's departures from them (schemes.base.CARD_KERNELS)."""
        if compute_dtype not in COMPUTE_DTYPES:
            raise UserError(f"compute dtype {compute_dtype!r} not supported (choose from {', '.join(COMPUTE_DTYPES)})")
        self.device = _parse_device(device)
        self.dtype = COMPUTE_DTYPES[compute_dtype]
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            check_cuda(self.device, ckpt)
        card, card_config = card_kernels(self.device)
        self.kernels, self.kernel_card = (card_config, card) if kernels is None else (kernels, None)
        try:
            self._load(ckpt)
        except torch.cuda.OutOfMemoryError:  # (only a GPU raises it)
            raise UserError(f"out of GPU memory loading checkpoint {ckpt.path} "
                            f"({ckpt.weight_bytes() / 2**30:.1f} GiB as stored) on {self.device} "
                            f"({_gpu_memory(self.device)})") from None

    def _load(self, ckpt: Checkpoint) -> None:
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
            subs = {lin: {k[len(p + lin) + 1:]: v for k, v in t.items() if k.startswith(p + lin + ".")}
                    for lin in LINEARS}
            names = {lin: f"layers.{i}.{lin}" for lin in LINEARS}
            linears = list(LINEARS)
            if self.cuda and ckpt.layer_algos[names["mlp.fc"]] == ckpt.layer_algos[names["mlp.gate"]] \
                    and group_sizes[names["mlp.fc"]] == group_sizes[names["mlp.gate"]]:
                both = concat_linear_tensors(ckpt.layer_algos[names["mlp.fc"]], [subs["mlp.fc"], subs["mlp.gate"]])
                if both is not None:  # one GEMV reads fc and gate (SiLU half first)
                    subs["mlp.fc_gate"], names["mlp.fc_gate"] = both, names["mlp.fc"]
                    linears = [lin for lin in LINEARS if lin not in ("mlp.fc", "mlp.gate")] + ["mlp.fc_gate"]
            for lin in linears:
                layer[lin] = make_linear(ckpt.layer_algos[names[lin]], subs[lin], dtype=self.dtype,
                                         device=self.device, group_size=group_sizes[names[lin]],
                                         kernels=self.kernels)
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
            + sum(h.nbytes for h in _linears(layer)) for layer in self.layers)
        self.ahead = self._dequant_ahead() if self.cuda else None
        if self.cuda:
            self.lm_head_linear = DenseLinear({"weight": self.lm_head}, self.dtype, self.device,
                                              kernels=self.kernels)  # shares the tensor
            self.freq_dev = self.freq.to(self.device)
            self.cuda_graphs = True  # False: decode steps run eagerly (same kernels; for tests and profiles)
            self._state = None  # the decode state (static cache, buffers, graph) of the last (batch, length)

    def _dequant_ahead(self) -> DequantAhead | None:
        """KernelConfig.wq_prefill_ahead's DequantAhead over the linears whose format it lists and whose prefill
        writes a weight copy, in the order a forward calls them; None where there is none."""
        order = (*LINEARS[:-1], "mlp.fc_gate", LINEARS[-1])  # (fc‖gate, where stacked, is where fc and gate were)
        chain = [layer[n] for layer in self.layers for n in order if n in layer
                 and layer[n].algo_key in self.kernels.wq_prefill_ahead and layer[n].prefill_shape() is not None]
        for h in chain:
            h.kernel = "prefill-ahead|" + h.kernel
        return DequantAhead(chain, self.device, self.dtype, self.kernels.wq_ahead_depth) if chain else None

    def free_decode_state(self) -> None:
        """Free the static KV cache, buffers and CUDA graph kept for the last (batch, length); the next generate
        makes them anew."""
        self._state = None

    @classmethod
    def from_dir(cls, folder: str | Path, *, device: str | torch.device = "cpu", **kwargs) -> "TorchRuntime":
        """A TensorRT-LLM checkpoint folder or a ModelOpt Hugging Face export. On a GPU the tensors go from the files
        into device memory one at a time, after the checks and refusals that need no weights (the checkpoint's
        header; the export's quantization block): the host never holds the model. (A host copy, made by aligned()'s
        clones that only the CPU kernels need, put the 8B FP16 latency stage at 2.2x the model's size in RSS.)"""
        from quant.hf_checkpoint import checkpoint_format, hf_quantization, load_hf_export

        folder, dev, load_to = Path(folder), _parse_device(device), "cpu"
        hf = checkpoint_format(folder) == "hf"
        if dev.type == "cuda":
            if hf:
                quant = hf_quantization(folder)
                check_cuda(dev)
                _refuse_fp8(dev, [quant.get("quant_algo")], quant.get("kv_cache_quant_algo"), f"export {folder}")
            else:
                check_cuda(dev, validate_checkpoint(folder))
            load_to = f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"  # safetensors' form
        ckpt = load_hf_export(folder, device=load_to) if hf else load_checkpoint(folder, device=load_to)
        return cls(ckpt, device=dev, **kwargs)

    # -- model ---------------------------------------------------------------------------------------------
    def _rmsnorm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # float32 statistics, then back to the compute dtype before the weight, as HF LlamaRMSNorm and TRT-LLM do.
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                 key_mask: torch.Tensor, last_only: bool) -> torch.Tensor:
        """ids/positions [B, T] at cache slots start..start+T-1; key_mask [B, start+T] (True = real token)."""
        if self.cuda:
            return self._forward_cuda(ids, positions, cache, start, key_mask, last_only)
        B, T = ids.shape
        h = F.embedding(ids, self.embedding)
        cos, sin = rope.cos_sin(positions, self.freq, self.dtype)
        allowed = self._attention_mask(key_mask, start, T)
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

    def _attention_mask(self, key_mask: torch.Tensor, start: int, T: int) -> torch.Tensor:
        """[B, 1, T, start+T] bool: query at slot start+t sees the real keys up to its own slot."""
        slots = torch.arange(start, start + T, device=self.device)
        keys = torch.arange(start + T, device=self.device)
        allowed = key_mask[:, None, None, :] & (keys[None, :] <= slots[:, None])[None, None]
        # A padding query would see no key at all (NaN softmax): let it see itself; its output is never used.
        return allowed | (keys[None, :] == slots[:, None])[None, None]

    def _new_cache(self, batch: int, max_len: int) -> KVCache:
        dims = (self.n_layers, batch, self.n_kv, max_len, self.head_dim, self.dtype, self.device)
        if self.kv_algo is None:
            return KVCache(*dims)
        return QuantizedKVCache(*dims, algo=self.kv_algo, scales=self.kv_scales)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- CUDA path -----------------------------------------------------------------------------------------
    def _forward_cuda(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                      key_mask: torch.Tensor, last_only: bool, causal: bool | None = None) -> torch.Tensor:
        """The model as ``_forward`` computes it, through the fused CUDA linears (any T; prefill). ``causal``:
        whether key_mask is all True (given by the caller when it knows, so that nothing syncs)."""
        B, T = ids.shape
        hidden = self.embedding.shape[1]
        h = F.embedding(ids, self.embedding).reshape(B * T, hidden)
        # RoPE and the cache write: one kernel (KernelConfig.prefill_rope) or torch ops on cos / sin tables
        fused_rope = self.kernels.prefill_rope
        if fused_rope:
            from quant.runtime import cuda_kernels as ck

            pos = positions.reshape(-1)
        else:
            cos, sin = rope.cos_sin(positions, self.freq_dev, self.dtype)  # (no host copy: graph-capturable)
        # No padding and a fresh cache: plain causal attention (FlashAttention); else the CPU path's mask.
        if causal is None:
            causal = bool(key_mask.all())
        causal = causal and start == 0
        allowed = None if causal else self._attention_mask(key_mask, start, T)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        for i, layer in enumerate(self.layers):
            qkv = layer["attention.qkv"].fused(h, norm=layer["input_layernorm"], eps=self.eps)
            if fused_rope:  # q rotated, k rotated and v stored into the cache by one kernel, then read back
                q = ck.rope_cache_write(qkv, pos, start, self.freq_dev, cache.k[i], cache.v[i], self.n_heads,
                                        self.n_kv, self.head_dim, kv_algo=self.kv_algo,
                                        kv_rcp=cache.rcp[i:i + 1] if self.kv_algo is not None else None)
                q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                k_all, v_all = cache.read(i, start + T)
            else:
                q, k, v = qkv.view(B, T, -1).split((q_dim, kv_dim, kv_dim), dim=-1)
                q = rope.apply(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
                k = rope.apply(k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
                v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
                k_all, v_all = cache.update(i, start, k, v)
            attn = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed, is_causal=causal,
                                                  enable_gqa=self.n_kv != self.n_heads)
            layer["attention.dense"].fused(attn.transpose(1, 2).reshape(B * T, q_dim), residual=h)
            self._mlp(layer, h)
        if last_only:
            h = h.view(B, T, hidden)[:, -1]
        logits = self.lm_head_linear.fused(h.contiguous(), norm=self.ln_f, eps=self.eps)
        if self.ahead is not None:
            self.ahead.settle()
        return logits.view(B, 1 if last_only else T, -1)

    def _mlp(self, layer: dict, h: torch.Tensor, xn: torch.Tensor | None = None, next_norm=None,
             next_lin: _Handler | None = None) -> torch.Tensor | None:
        """h += proj(SiLU(fc(x)) · gate(x)), x = RMSNorm(h) (``xn``: x, computed by the previous linear) —
        fc‖gate as one linear where stacked. ``next_norm`` (decode): each linear's epilogue does the next one's
        prologue where its kernel can (:meth:`_Handler.chains`), and the proj's returns RMSNorm(h) · next_norm, the
        input of ``next_lin``; else None."""
        post, proj = layer["post_layernorm"], layer["mlp.proj"]
        if "mlp.fc_gate" in layer:
            fg = layer["mlp.fc_gate"]
            if next_norm is not None and fg.chains(h.shape[0]):
                act = self._linear_in(fg, h, xn, post, then_silu=True, **_quant_for(proj, h.shape[0]))
                return self._add_out(proj, act, h, next_norm, next_lin=next_lin)
            return self._add_out(proj, self._linear_in(fg, h, xn, post), h, next_norm, silu=True, next_lin=next_lin)
        x = xn if xn is not None else self._rmsnorm(h, post)
        return self._add_out(proj, torch.cat((layer["mlp.fc"].fused(x), layer["mlp.gate"].fused(x)), dim=-1), h,
                             next_norm, silu=True, next_lin=next_lin)

    def _linear_in(self, lin: _Handler, h: torch.Tensor, xn: torch.Tensor | None, norm: torch.Tensor, **then):
        """lin(RMSNorm(h) · norm), that input being ``xn`` where the previous linear's epilogue computed it."""
        return lin.fused(xn, **then) if xn is not None else lin.fused(h, norm=norm, eps=self.eps, **then)

    def _add_out(self, lin: _Handler, x: torch.Tensor, h: torch.Tensor, next_norm, silu: bool = False,
                 next_lin: _Handler | None = None) -> torch.Tensor | None:
        """h += lin(x) (silu: of SiLU · gate of x's halves); returns RMSNorm(h) · next_norm, quantized for
        ``next_lin`` where it takes that (:meth:`_Handler.input_quant`), where lin's epilogue computes it
        (``next_norm`` given and lin.chains, unless ``next_lin`` normalizes its own input: _Handler.takes_norm),
        else None."""
        rows = x.shape[0]
        if next_norm is not None and lin.chains(rows) and not (next_lin is not None and next_lin.takes_norm(rows)):
            return lin.fused(x, silu=silu, residual=h, then_norm=next_norm, eps=self.eps,
                             **_quant_for(next_lin, rows))
        lin.fused(x, silu=silu, residual=h)
        return None

    def _decode_body(self, st: "_DecodeState") -> None:
        """One decode step on the static buffers: reads st.ids/pos/slot, writes the token and advances them."""
        from quant.runtime import cuda_kernels as ck

        h = F.embedding(st.ids, self.embedding)  # [B, hidden]
        cache, quant = st.cache, self.kv_algo is not None
        xn = None  # the next linear's RMSNorm-ed input, where the previous linear's epilogue computed it
        for i, layer in enumerate(self.layers):
            qkv = self._linear_in(layer["attention.qkv"], h, xn, layer["input_layernorm"])
            rcp, scale = (cache.rcp[i:i + 1], cache.scale[i:i + 1]) if quant else (None, None)
            # o_proj's input quantized by the attention's combine where it takes that (gemv_then, SmoothQuant / FP8)
            oq = _quant_for(layer["attention.dense"], st.attn.B) if st.attn.fused_reduce else {}
            if st.rope_fused:
                lin = layer["attention.qkv"]
                attn = st.attn(qkv, cache.k[i], cache.v[i], st.key_mask, st.slot, kv_scale=scale,
                               kv_algo=self.kv_algo, rope=(st.pos, self.freq_dev, rcp),
                               pdl=lin.algo_key in self.kernels.attn_pdl and not lin.gemv_pdl, **oq)
            else:
                q = ck.rope_cache_write(qkv, st.pos, st.slot, self.freq_dev, cache.k[i], cache.v[i], self.n_heads,
                                        self.n_kv, self.head_dim, kv_rcp=rcp, kv_algo=self.kv_algo)
                attn = st.attn(q, cache.k[i], cache.v[i], st.key_mask, st.slot, kv_scale=scale, kv_algo=self.kv_algo,
                               **oq)
            xn = self._add_out(layer["attention.dense"], attn, h, layer["post_layernorm"],
                               next_lin=layer.get("mlp.fc_gate"))
            nxt_layer = self.layers[i + 1] if i + 1 < len(self.layers) else None
            xn = self._mlp(layer, h, xn, next_norm=nxt_layer["input_layernorm"] if nxt_layer else self.ln_f,
                           next_lin=nxt_layer["attention.qkv"] if nxt_layer else self.lm_head_linear)
        logits = self._linear_in(self.lm_head_linear, h, xn, self.ln_f)
        if self.ahead is not None:  # (rows past 64 take the weight-only prefill's path)
            self.ahead.settle()
        if st.logits is not None:
            st.logits.copy_(logits)
        nxt = logits.argmax(-1)
        if not st.ignore_eos:
            nxt = torch.where(st.done, st.pad, nxt)
            st.done |= torch.isin(nxt, st.eos)
        st.out.index_copy_(1, st.step, nxt[:, None])
        st.ids.copy_(nxt)
        st.pos += 1
        st.slot += 1
        st.step += 1

    def _decode_step(self, st: "_DecodeState") -> None:
        if not self.cuda_graphs:
            self._decode_body(st)
        elif st.graph is None:
            # First step of this shape: run it for real on a side stream (compiles the Triton kernels, sets up
            # cuBLAS), then capture the next one; capturing does not execute it.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._decode_body(st)
            torch.cuda.current_stream(self.device).wait_stream(side)
            st.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(st.graph):
                self._decode_body(st)
        else:
            st.graph.replay()

    def _prefill(self, st: "_DecodeState", ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                 lens: tuple[int, ...]) -> torch.Tensor:
        """First token of each prompt; the prefill writes st.cache. With graphs on, a prefill of these prompt
        lengths is captured once (its first call runs eagerly) and replayed on the token ids afterwards: the
        prefill's ~25 launches per layer otherwise cost more CPU time than a small batch's GPU time."""
        causal = len(set(lens)) == 1

        def run(x):
            return self._forward_cuda(x, positions, st.cache, 0, key_mask, last_only=True,
                                      causal=causal)[:, -1].argmax(-1)

        if not self.cuda_graphs:
            return run(ids)
        if st.prefill_graph is not None and st.prefill_key == lens:
            st.prefill_ids.copy_(ids)
            st.prefill_graph.replay()
            return st.prefill_out.clone()
        st.prefill_graph = None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            nxt = run(ids)
        torch.cuda.current_stream(self.device).wait_stream(side)
        st.prefill_ids = ids.clone()
        st.prefill_inputs = (positions, key_mask)  # read by the graph: they must outlive this call (same values
        graph = torch.cuda.CUDAGraph()             # for the same prompt lengths)
        with torch.cuda.graph(graph):
            st.prefill_out = run(st.prefill_ids)
        st.prefill_graph, st.prefill_key = graph, lens
        return nxt

    def _check_fits(self, B: int, P: int, new: int, what: str) -> None:
        """Refuse, before allocating, a KV cache + prefill that cannot fit in the GPU's free memory."""
        total = P + new
        if self._state is not None and self._state.key[:2] == (B, total):
            return  # that cache is already allocated (its graph is reused)
        self._state = None  # the previous shape's cache and graph are freed first
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        kv_elem = 1 if self.kv_algo is not None else self.embedding.element_size()
        cache = 2 * self.n_layers * B * self.n_kv * total * self.head_dim * kv_elem
        inter = self.config["intermediate_size"]
        hidden = self.embedding.shape[1]
        act = B * P * (3 * inter + 8 * hidden) * self.embedding.element_size() + B * self.vocab * 4
        if cache + act > free:
            raise UserError(f"out of GPU memory for {what}: the KV cache needs {cache / 2**30:.1f} GiB and prefill "
                            f"~{act / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free on {self.device}")

    def _pad_batch(self, prompts, max_new_tokens: int, pad_id: int):
        """Left-pad the prompts: ids [B, P], key mask over prompt + budget, per-sequence RoPE positions."""
        B, lens = len(prompts), [len(p) for p in prompts]
        P = max(lens)
        total = P + max_new_tokens
        ids = torch.full((B, P), pad_id, dtype=torch.long)
        key_mask = torch.ones(B, total, dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, P - lens[b]:] = torch.tensor(p, dtype=torch.long)
            key_mask[b, : P - lens[b]] = False
        dev = self.device
        ids, key_mask = ids.to(dev), key_mask.to(dev)
        lens_t = torch.tensor(lens, device=dev)
        positions = (torch.arange(P, device=dev)[None] - (P - lens_t)[:, None]).clamp(min=0)
        return B, lens, P, total, ids, key_mask, lens_t, positions

    def _generate_cuda(self, prompts, max_new_tokens, eos_ids, ignore_eos, pad_id) -> Generation:
        B, lens, P, total, ids, key_mask, lens_t, positions = self._pad_batch(prompts, max_new_tokens, pad_id)
        eos = tuple(eos_ids) or (-1,)
        key = (B, total, bool(ignore_eos), eos, pad_id)
        st = self._state if self._state is not None and self._state.key == key else None
        if st is None:
            self._state = None
            st = self._state = _DecodeState(self, key, B, total, max_new_tokens, ignore_eos, eos, pad_id)

        self._sync()
        t0 = time.perf_counter()
        nxt = self._prefill(st, ids, positions, key_mask[:, :P], tuple(lens))
        if ignore_eos:
            st.done.zero_()
        else:
            st.done.copy_(torch.isin(nxt, st.eos))
        self._sync()
        ttft = time.perf_counter() - t0

        st.out[:, 0] = nxt
        st.ids.copy_(nxt)
        st.pos.copy_(lens_t)
        st.slot.fill_(P)
        st.step.fill_(1)
        st.key_mask.copy_(key_mask)
        events = [torch.cuda.Event(enable_timing=True)]
        events[0].record()
        steps = 0
        for _ in range(1, max_new_tokens):
            if not ignore_eos and bool(st.done.all()):
                break
            self._decode_step(st)
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append(ev)
            steps += 1
        self._sync()
        step_s = [events[j].elapsed_time(events[j + 1]) / 1e3 for j in range(steps)]
        tokens = _cut_at_eos(st.out[:, : steps + 1].tolist(), eos_ids, ignore_eos)
        return Generation(tokens=tokens, prompt_lens=lens, ttft_s=ttft, step_s=step_s)

    # -- public API (shared with the TensorRT-LLM runner) --------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, vocab] of one unpadded sequence (perplexity, parity with HF)."""
        x = torch.tensor([ids], device=self.device)
        try:
            cache = self._new_cache(1, len(ids))
            pos = torch.arange(len(ids), device=self.device)[None]
            mask = torch.ones(1, len(ids), dtype=torch.bool, device=self.device)
            return self._forward(x, pos, cache, 0, mask, last_only=False)[0].float()
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"out of GPU memory for the logits of one sequence of {len(ids)} tokens on "
                            f"{self.device} ({_gpu_memory(self.device)})") from None

    @torch.inference_mode()
    def decode_logits(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, vocab] of one unpadded sequence as generation computes them (CUDA): ids[0] through
        the prefill, then each next true token through the batch-1 decode step (its CUDA graph, its kernels:
        teacher forcing), where :meth:`logits` runs the prefill's kernels over all T at once. Row t predicts
        ids[t + 1], as in :meth:`logits`; the last row's step is run too."""
        if not self.cuda:
            raise UserError(f"decode_logits runs the CUDA decode step; this runtime is on {self.device}")
        T = len(ids)
        try:
            st = _DecodeState(self, None, 1, T, T, True, (-1,), 0)
            st.logits = torch.empty(1, self.vocab, dtype=self.dtype, device=self.device)
            out = torch.empty(T, self.vocab, dtype=torch.float32, device=self.device)
            x = torch.tensor([ids[:1]], device=self.device)
            out[0] = self._forward_cuda(x, torch.zeros(1, 1, dtype=torch.long, device=self.device), st.cache, 0,
                                        st.key_mask[:, :1], last_only=True)[0, -1].float()
            st.pos.fill_(1)
            st.slot.fill_(1)
            for t in range(1, T):
                st.ids.fill_(ids[t])
                self._decode_step(st)
                out[t] = st.logits[0].float()
            return out
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"out of GPU memory for the decode logits of one sequence of {T} tokens on "
                            f"{self.device} ({_gpu_memory(self.device)})") from None

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int] | tuple[int, ...] = (),
                 *, ignore_eos: bool = False, pad_id: int = 0) -> Generation:
        """Greedy decoding of a batch; stops a sequence at EOS, the batch when all stopped or at the budget."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate needs at least one non-empty prompt")
        if max_new_tokens <= 0:
            raise UserError("max_new_tokens must be > 0")
        if self.cuda:
            B, P = len(prompts), max(len(p) for p in prompts)
            what = f"batch {B} × ({P} prompt + {max_new_tokens} new tokens)"
            self._check_fits(B, P, max_new_tokens, what)
            try:
                return self._generate_cuda(prompts, max_new_tokens, eos_ids, ignore_eos, pad_id)
            except torch.cuda.OutOfMemoryError:
                self._state = None
                torch.cuda.empty_cache()
                raise UserError(f"out of GPU memory for {what} on {self.device} ({_gpu_memory(self.device)}); "
                                f"use a smaller batch or shorter lengths") from None
        B, lens, P, total, ids, key_mask, lens_t, positions = self._pad_batch(prompts, max_new_tokens, pad_id)
        dev = self.device
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

        tokens = _cut_at_eos(torch.stack(out, dim=1).tolist(), eos_ids, ignore_eos)
        return Generation(tokens=tokens, prompt_lens=lens, ttft_s=ttft, step_s=steps)

    def describe(self) -> dict:
        """Kernels the linears run (and why a kernel they would take is missing), whether any part is an emulation
        (and which), the KV cache mode, and on CUDA the card whose kernel choices it took (schemes.base.CARD_KERNELS)."""
        handlers = [h for layer in self.layers for h in _linears(layer)]
        kernels = sorted({h.kernel for h in handlers})
        missing = sorted({h.gemv_unavailable for h in handlers if h.gemv_unavailable is not None})
        parts = sorted({h.kernel for h in handlers if h.emulated})
        if self.kv_algo is not None and kv_cache_emulated(self.device):
            parts.append("kv_cache")  # attention reads a dequantized copy, not int8/fp8 directly
        return {"backend": self.name, "version": torch.__version__, "device": str(self.device),
                "compute_dtype": str(self.dtype).removeprefix("torch."), "kernels": kernels,
                **({"kernels_unavailable": missing} if missing else {}),
                "emulated": bool(parts), "emulated_parts": parts,
                "kv_cache": kv_cache_mode(self.kv_algo, self.dtype, self.device),
                **({"gpu": torch.cuda.get_device_name(self.device), "cuda_graphs": self.cuda_graphs,
                    **({"prefill_ahead_bytes": self.ahead.nbytes} if self.ahead is not None else {}),
                    **({"card_kernels": self.kernel_card} if self.kernel_card else {}),
                    "attention": "flash/efficient SDPA (prefill), triton split-KV (decode)"} if self.cuda else {})}


class _DecodeState:
    """Static buffers of the CUDA decode step for one (batch, prompt + budget, EOS set): the KV cache, the
    attention workspace, the token/position/slot counters, the output tokens, and the captured graph."""

    def __init__(self, rt: TorchRuntime, key, B: int, total: int, max_new: int, ignore_eos: bool, eos, pad_id: int):
        from quant.runtime.cuda_kernels import DecodeAttention

        dev = rt.device
        self.key, self.ignore_eos = key, ignore_eos
        self.cache = rt._new_cache(B, total)
        fused_reduce, self.rope_fused = rt.kernels.attn_fusions(B)
        self.attn = DecodeAttention(B, rt.n_heads, rt.n_kv, rt.head_dim, total, rt.dtype, dev,
                                    fused_reduce=fused_reduce, tile=rt.kernels.attn_tile)
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.slot = torch.zeros((), dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_mask = torch.ones(B, total, dtype=torch.bool, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out = torch.zeros(B, max_new, dtype=torch.long, device=dev)
        self.eos = torch.tensor(list(eos), dtype=torch.long, device=dev)
        self.pad = torch.tensor(pad_id, dtype=torch.long, device=dev)
        self.graph = None
        self.logits = None  # where a step also leaves its logits (TorchRuntime.decode_logits)
        self.prefill_graph = self.prefill_key = self.prefill_ids = self.prefill_out = self.prefill_inputs = None


def _quant_for(lin: _Handler | None, rows: int) -> dict:
    """``then_quant`` for the linear before ``lin``: its input quantized in that linear's epilogue where it takes
    it (SmoothQuant, FP8 at batch 1 under KernelConfig.gemv_then), else nothing."""
    q = lin.input_quant(rows) if lin is not None else None
    return {} if q is None else {"then_quant": q}


def _cut_at_eos(rows: list[list[int]], eos_ids, ignore_eos: bool) -> list[list[int]]:
    """Each generated row up to (not including) its first EOS; whole rows when EOS is ignored."""
    if ignore_eos:
        return rows
    eos = set(eos_ids)
    return [row[: next((j for j, tok in enumerate(row) if tok in eos), len(row))] for row in rows]


def _linears(layer: dict) -> list[_Handler]:
    return [v for v in layer.values() if isinstance(v, _Handler)]


def _gpu_memory(device: torch.device) -> str:
    try:
        free, total = torch.cuda.mem_get_info(device)
        return f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
    except RuntimeError:
        return "free memory unknown"


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"device {device!r} is not a valid torch device ({exc})") from None


def check_cuda(device: torch.device, ckpt: Checkpoint | None = None) -> None:
    """UserError unless ``device`` is a usable CUDA GPU, and one with FP8 (compute capability ≥ 8.9) if the
    checkpoint has FP8 linears or an FP8 KV cache. Called before anything is put on the device."""
    if not torch.cuda.is_available():
        raise UserError(f"device {device} asked for, but no CUDA GPU is available "
                        f"(torch {torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''})")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise UserError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if ckpt is not None:
        _refuse_fp8(device, ckpt.layer_algos.values(), ckpt.kv_cache_algo, f"checkpoint {ckpt.path}")


def _refuse_fp8(device: torch.device, algos, kv_algo: str | None, what: str) -> None:
    """UserError if linears of ``algos`` or a ``kv_algo`` KV cache use FP8 and ``device`` (usable: check_cuda) has
    none; ``what`` names the checkpoint."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (set(FP8_GEMM_ALGOS) & set(algos) or kv_algo == "FP8") and (why := fp8_refusal(index)):
        raise UserError(f"{what} uses FP8: {why}")
