"""Tiny random LLaMa models saved as HF folders (safetensors), for tests where only shapes matter."""
from __future__ import annotations

from pathlib import Path


def make_tiny_llama(path: Path, *, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 256, vocab: int = 49152, tie: bool = False, rope_scaling: dict | None = None,
                    rope_theta: float = 10000.0, seed: int = 0, tokenizer_from: Path | None = None,
                    float32: bool = False) -> Path:
    """Write a random LlamaForCausalLM (fp16 safetensors) to ``path``; copy a tokenizer when asked. ``float32``:
    the same fp16 values stored in float32, a folder the suite converts into its cache instead of reading it
    in place (the crash tests kill that conversion).

    The vocab defaults to the default model's, so its tokenizer can drive prompts through the tiny model.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {**rope_scaling, "rope_theta": rope_theta}
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, vocab_size=vocab, tie_word_embeddings=tie, max_position_embeddings=2048,
        rope_parameters=rope, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float16)
    # Random init gives near-uniform logits; a larger scale makes greedy choices well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    config.architectures = ["LlamaForCausalLM"]
    if float32:
        model = model.to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return Path(path)
