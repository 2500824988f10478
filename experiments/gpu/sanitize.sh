#!/usr/bin/env bash
# Issue 14: the runtime's CUDA kernels (Triton and the compiled GEMVs) under compute-sanitizer's memcheck, through
# tests/test_cuda.py's small shapes, on the lent nvidia-h200 machine from the repository root, .whl carried. Why:
# on 2026-12-04 a peer lost the CUDA context ("unspecified launch failure") right after the project's four quantized
# engines had run in the same process, while alone it ran (experiments/results/gpu/kernels, stage 3); an
# out-of-bounds write of ours into memory the peer later used would look like that.
#   1. the kernel tests with PyTorch's caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1): every tensor its
#      own allocation, so an access past a tensor's end is outside any allocation and memcheck reports it;
#   2. the runtime tests (CUDA graphs need the caching allocator): only accesses outside its pool segments show.
# Writes sanitize-kernels.txt and sanitize-runtime.txt to $OUT. K1 / K2 (env) replace the -k filters; LIMIT the
# seconds each may take (memcheck slows kernels 10-100x).
set -uo pipefail
[ "${PACK:-0}" = 1 ] && trap "bash $PWD/experiments/gpu/pack.sh" EXIT  # one archive of $OUT (pack.sh)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export QUANT_SUITE_CACHE=${QUANT_SUITE_CACHE:-/root/qcache}
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
[ -n "$SAN" ] || { echo "no compute-sanitizer on this machine"; exit 1; }
RUNTIME="runtime_on_cuda_matches or decode_step_logits or eos_stops"
run() {  # $1 output file, $2 -k filter, then env assignments
  local out=$1 k=$2; shift 2
  env "$@" timeout "${LIMIT:-240}" "$SAN" --tool memcheck --print-limit 20 --error-exitcode 9 \
    python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "$k" > "$OUT/$out" 2>&1
  echo "$out rc=$?"; grep -E "ERROR SUMMARY|Invalid|passed|failed" "$OUT/$out" | tail -5
}
run sanitize-kernels.txt "${K1:-not ($RUNTIME) and not gpu_memory}" PYTORCH_NO_CUDA_MEMORY_CACHING=1
run sanitize-runtime.txt "${K2:-$RUNTIME}"
