"""One file per weight format: load the stored tensors once, then a one-line forward (vLLM's ``schemes/``).

``make_linear(algo, tensors, ...)`` picks the handler for a layer's ``quant_algo``. Each handler says which kernel
its forward runs (``kernel``) and whether that is a real low-precision kernel or an exact emulation
(``emulated``), so latency reports can label it. Every handler takes ``x`` [..., in] in the runtime's compute
dtype and returns [..., out] in the same dtype; ``nbytes`` counts what it holds in memory (what one decode step
reads); ``dequantized_weight()`` is the float32 [out, in] weight its forward multiplies by (for reference checks;
a ``prequant_scaling_factor`` is applied to x, not folded in).

Numerics follow TensorRT-LLM for ModelOpt 0.47 checkpoints (scales are dequantization multipliers):

- ``W8A16``: y = x @ (q · s[:, None])ᵀ — ``aten._weight_int8pack_mm`` (scales held in x's dtype).
- ``W8A8_SQ_PER_CHANNEL``: x ← x · prequant (compute dtype); qx = clamp(round_half_even(float32(x) / a), -128, 127);
  y = (qx @ qᵀ) · (a · s) — int8 × int8 → int32 ``torch._int_mm`` (weight transposed once at load).
- ``W4A16_AWQ``: y = (x · prequant) @ (q · s[:, i // group])ᵀ, q signed int4 packed in pairs along out — tinygemm's
  ``aten._weight_int4pack_mm_for_cpu`` (repacked once at load).
- ``FP8``: qx = fp8_e4m3(clamp(float32(x) / a, ±448)); y = (qx · a) @ (q · s)ᵀ — ``torch._scaled_mm``.

CPU kernel constraints found on torch 2.13: ``_weight_int8pack_mm`` needs the scales in x's dtype (float32,
bfloat16 or float16 all run); ``_int_mm`` takes any M, K, N on CPU; ``_weight_int4pack_mm_for_cpu`` needs
out-features divisible by 16 (we zero-pad the rows and slice the output) and a group of 32/64/128/256 (a larger
multiple of 32 is fed as its largest such divisor with the scales repeated — exact; other groups are emulated);
FP8 gets ``_scaled_mm``'s numbers from the float32 upcast ATen itself does on CPU, not from the op (which hands
AMX CPUs' GEMMs to oneDNN's reference FP8 matmul, seconds a call): flagged emulated.

On CUDA every format runs a real kernel (:mod:`quant.runtime.cuda_kernels`), chosen by the number of rows M:
M = 1 (decode at batch 1) one Triton ``act_prep`` kernel (RMSNorm / SiLU·gate, pre-quant scale, SmoothQuant int8
or FP8 quantization) and a Triton GEMV that reads the stored layout once (int8, fp8 or fp16) with the residual
add fused in; W8A16/SmoothQuant at 2–64 rows a Triton ``tl.dot`` kernel dequantizing in registers (SmoothQuant:
int8 × int8 → int32); W4A16 in float16 at 2–16 rows a Triton tensor-core kernel on a k-packed copy made at load
(int4 → half2 in registers, ``cuda_kernels.w4k_mm``), at 1 and 17–64 rows tinygemm (``aten._weight_int4pack_mm``,
repacked once at load; its activation dtype — bf16 on torch 2.11 — is probed once), the Triton kernels on the
stored layout as the alternative (``KernelConfig.int4_kernel``, ``w4k_rows``); above 64 rows (prefill) cuBLAS on a
dequantized copy (W8A16, W4A16), the Triton int8 GEMM with the dequant epilogue fused (SmoothQuant;
``torch._int_mm`` as the alternative, ``KernelConfig.sq_prefill_gemm``), and ``torch._scaled_mm`` (FP8); fp16 goes
to cuBLAS. Any other non-CPU device runs the exact emulation.

Speed on CPUs without AMX: the int8pack/int4pack kernels are fast in bfloat16 (faster than dense bf16 at M=1) but
take a slow path in float32; ``_int_mm`` is fast in both; the FP8 upcast is slow (docs/architecture.md, measured
choices).
"""
