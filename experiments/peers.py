"""Peer engines for ``experiments.bench``: HF transformers with a static KV cache and ``torch.compile``, alone or
with torchao's or GemLite's quantized linears, each on the path its documentation gives for decode.

Every peer is ``LlamaForCausalLM`` of the bench's shape with random weights (seeded), its decode step compiled with
``torch.compile(mode=..., fullgraph=True)`` over a :class:`transformers.StaticCache`, in the mode its library
benchmarks with (:data:`PEERS`): ``reduce-overhead`` (CUDA graphs; HF's ``CompileConfig`` default) for HF alone and
GemLite, whose linears are their own Triton kernels; ``max-autotune`` (CUDA graphs and inductor's Triton matmul
templates) for torchao, whose int8 / fp8 weight-only linears are ``mm(x, w.to(dtype)) * scale`` and are fast only
when inductor fuses the conversion into the matmul (torchao's ``benchmarks/benchmark_aq.py`` compiles so; under
``reduce-overhead`` the weight is converted every step, measured 0.38× the project's FP16 on an H200). Prefill
runs eagerly, as HF ``generate`` does. The static cache is sized for the longest input of the run, so one compiled
step serves every input length of a batch size. ``lm_head`` stays in the model's float dtype, as in the project's
recipes.

Timing is the project runtime's: CUDA events between consecutive decode steps (argmax included), no host sync
inside the loop, TTFT as prefill + first token on the host clock.

The quantizers are data (:data:`PEERS`): the library, its configuration, the dtype it takes. torchao's int4
weight-only path without extra packages (``int4_packing_format="tile_packed_to_4d"``: the ``_weight_int4pack_mm``
kernel) takes bfloat16 only, so that peer runs in bfloat16. GemLite's group-wise int4 layers get the same
asymmetric min/max group quantization the quantizer below computes (GemLite's HQQ route needs the hqq package).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

import torch

from quant.errors import UserError
from quant.runtime.random_checkpoint import SHAPES
from quant.runtime.torch_runtime import Generation


def hf_config(shape: str, **extra):
    """A ``LlamaConfig`` of one of :data:`~quant.runtime.random_checkpoint.SHAPES`."""
    from transformers import LlamaConfig

    d = SHAPES[shape]
    return LlamaConfig(hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
                       num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
                       intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"],
                       max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=False, **extra)


def _not_lm_head(module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")


def _torchao(recipe: str, dtype: torch.dtype, config: str, **kwargs) -> "Peer":
    """A torchao peer: ``config`` applied to every linear but lm_head, compiled with max-autotune (module doc)."""
    def apply(model):
        import torchao.quantization as tq

        tq.quantize_(model, getattr(tq, config)(**kwargs), filter_fn=_not_lm_head)
    apply.__doc__ = f"torchao {config}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    return Peer(recipe, "torchao", dtype, apply, "max-autotune")


def _group_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization per group of ``group`` inputs: (q uint8 in 0..15, scale, zero), each [N, K/g],
    with w ≈ (q - zero) * scale (GemLite's convention)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = -lo / scale
    q = torch.clamp(torch.round(g / scale[..., None] + zero[..., None]), 0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, zero


def _gemlite_tuning() -> None:
    """GemLite ships tuned kernel configs per card (``gemlite/configs/*.json``) and loads the one whose name is in the
    card's; on an H200 none is ("nvidia_h200" holds no "h100"), so every shape would be autotuned on first use,
    minutes at 7B. The H200 is the H100's SM90 chip with more, faster memory: its config is the closest tuning."""
    import os

    import gemlite
    from gemlite import core

    if core.selected_tag is None and "h200" in torch.cuda.get_device_name().lower():
        gemlite.load_config(os.path.join(os.path.dirname(core.__file__), "configs", "h100.json"))


def _gemlite(bits: int, group: int = 128) -> Callable:
    def apply(model):
        from gemlite.helper import A16W8_INT8, A16Wn

        _gemlite_tuning()
        dev = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        for name, mod in list(model.named_modules()):
            for child_name, child in list(mod.named_children()):
                if not _not_lm_head(child, f"{name}.{child_name}"):
                    continue
                if bits == 8:
                    layer = A16W8_INT8(device=str(dev), dtype=dtype).from_linear(child)
                else:
                    q, scale, zero = _group_int4(child.weight.data, group)
                    layer = A16Wn(device=str(dev), dtype=dtype).from_weights(q, scale.to(dtype), zero.to(dtype),
                                                                              W_nbits=4, group_size=group)
                setattr(mod, child_name, layer)
                del child
    apply.__doc__ = f"gemlite A16W{bits}" + (f" (group {group}, min/max)" if bits == 4 else " (per channel)")
    return apply


@dataclass(frozen=True)
class Peer:
    recipe: str  # the project's recipe of the same weight format (the row it is compared with)
    library: str | None  # the package whose version goes in the record (None: transformers alone)
    dtype: torch.dtype
    quantize: Callable | None = None
    compile_mode: str = "reduce-overhead"


PEERS = {
    "hf-compile": Peer("fp16", None, torch.float16),
    "torchao-int8wo": _torchao("int8_wo", torch.float16, "Int8WeightOnlyConfig"),
    "torchao-int4wo": _torchao("int4_awq", torch.bfloat16, "Int4WeightOnlyConfig", group_size=128,
                               int4_packing_format="tile_packed_to_4d"),
    "torchao-fp8wo": _torchao("fp8", torch.float16, "Float8WeightOnlyConfig"),
    "torchao-fp8": _torchao("fp8", torch.float16, "Float8DynamicActivationFloat8WeightConfig"),
    "gemlite-a16w4": Peer("int4_awq", "gemlite", torch.float16, _gemlite(4)),
    "gemlite-a16w8": Peer("int8_wo", "gemlite", torch.float16, _gemlite(8)),
}


def peer_versions(name: str) -> dict:
    out = {"transformers": metadata.version("transformers")}
    if (lib := PEERS[name].library) is not None:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            raise UserError(f"peer {name} needs the {lib} package, which is not installed") from None
    return out


def _compile_counts() -> tuple[int, int]:
    """(graphs dynamo compiled, graphs inductor left out of CUDA graphs) in this process so far: their own
    counters. More graphs than batch sizes means the step recompiled (a guard failed) as it ran."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


def _log_cudagraph_skips() -> None:
    """Inductor's reason for each skipped CUDA graph to stderr (the peer's log); torch builds without that
    artifact (older than it) still count the skips."""
    try:
        torch._logging.set_logs(cudagraphs=True)
    except (TypeError, ValueError):
        pass


class HFPeer:
    """One peer, built on ``device``: ``generate(prompts, n)`` like the project runtime's (equal-length prompts,
    greedy, no EOS), with the attributes ``experiments.bench`` reads (weight_bytes, n_layers, n_kv, head_dim)."""

    kv_algo = None

    def __init__(self, shape: str, name: str, device: torch.device, *, seed: int = 0, max_len: int,
                 compile: bool = True):
        from transformers import LlamaForCausalLM

        if name not in PEERS:
            raise UserError(f"unknown peer {name!r} (choose from {', '.join(PEERS)})")
        self.name, self.peer, self.device, self.max_len = name, PEERS[name], torch.device(device), max_len
        self.versions = peer_versions(name)
        cfg = hf_config(shape)
        self.n_layers, self.n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.head_dim, self.vocab = cfg.hidden_size // cfg.num_attention_heads, cfg.vocab_size
        cuda = self.device.type == "cuda"
        base = torch.cuda.memory_allocated(self.device) if cuda else 0
        torch.manual_seed(seed)
        with torch.device(self.device):
            self.model = LlamaForCausalLM._from_config(cfg, dtype=self.peer.dtype, attn_implementation="sdpa").eval()
        if self.peer.quantize is not None:
            self.peer.quantize(self.model)
        if cuda:
            torch.cuda.empty_cache()
        emb = self.model.get_input_embeddings().weight
        # bytes a decode step reads: what the model holds on the device, less the embedding table (rows gathered)
        held = torch.cuda.memory_allocated(self.device) - base if cuda else sum(
            p.numel() * p.element_size() for p in self.model.parameters())
        self.weight_bytes = held - emb.numel() * emb.element_size()
        if compile and cuda:
            _log_cudagraph_skips()
        self._counts0 = _compile_counts()
        self._step = (torch.compile(self.model.forward, mode=self.peer.compile_mode, fullgraph=True) if compile
                      else self.model.forward)
        self._caches: dict[int, object] = {}  # batch size → its static cache (one compiled step each)

    def free_decode_state(self) -> None:
        """Kept: one static cache per batch size is what the compiled step (its CUDA graph) was captured on."""

    def describe(self) -> dict:
        """What ran; after a generate, ``compiled_graphs`` (dynamo's, for this peer) and ``cuda_graph_skips``:
        graphs inductor compiled but did not capture (its reason is in the log, torch's ``cudagraphs`` artifact).
        Both compile modes the peers use replay the step as one CUDA graph; a skipped one launches every kernel
        from the host each step, which is not the path the library documents, so experiments.bench keeps that
        peer out of its targets."""
        graphs, skips = (now - before for now, before in zip(_compile_counts(), self._counts0))
        return {"engine": self.name, "dtype": str(self.peer.dtype).removeprefix("torch."),
                "quantization": self.peer.quantize.__doc__ if self.peer.quantize else None,
                "compile": f"torch.compile(mode={self.peer.compile_mode!r}, fullgraph=True), decode step",
                "compiled_graphs": graphs, "cuda_graph_skips": skips, **self.versions}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, ignore_eos: bool = True) -> Generation:
        from transformers import StaticCache

        lens = {len(p) for p in prompts}
        if len(lens) != 1 or not ignore_eos:
            raise UserError("a peer generates from equal-length prompts without stopping at EOS (the bench's prompts)")
        P = lens.pop()
        if P + max_new_tokens > self.max_len:
            raise UserError(f"peer {self.name}: {P} + {max_new_tokens} tokens exceed its static cache ({self.max_len})")
        B = len(prompts)
        cache = self._caches.get(B)
        if cache is None:
            cache = self._caches[B] = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        cache.reset()
        ids = torch.tensor(prompts, device=self.device)
        cuda = self.device.type == "cuda"
        self._sync()
        t0 = time.perf_counter()
        tok = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        self._sync()
        ttft = time.perf_counter() - t0
        out = [tok]
        events = []
        if cuda:
            events.append(torch.cuda.Event(enable_timing=True))
            events[0].record()
        host = [time.perf_counter()]
        for _ in range(1, max_new_tokens):
            # a new tensor each step: the CUDA graph's output buffer is overwritten by the next replay
            tok = self._step(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            out.append(tok)
            if cuda:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            else:
                host.append(time.perf_counter())
        self._sync()
        step_s = ([a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])] if cuda
                  else [b - a for a, b in zip(host, host[1:])])
        return Generation(tokens=torch.cat(out, 1).tolist(), prompt_lens=[P] * B, ttft_s=ttft, step_s=step_s)
