"""LLaMa's linear layers by name: TensorRT-LLM's names and the Hugging Face modules each one is made of.

The one name table. Recipes match their exclusions against these names, the ModelOpt config and the HF export
map them to HF modules, checkpoint formats and runtimes lay tensors out under them, calibration records the
activation statistics under them.
"""

# TRT-LLM linear inside decoder layer i (``layers.{i}.<name>``) → the HF ``LlamaDecoderLayer`` modules it is
# made of, in concatenation order: qkv fuses q, k and v; TRT-LLM's fc is HF's gate_proj (the SiLU branch) and
# its gate is up_proj.
HF_MODULES: dict[str, tuple[str, ...]] = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}
LINEARS = tuple(HF_MODULES)
