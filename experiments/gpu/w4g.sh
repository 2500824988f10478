#!/usr/bin/env bash
# Issue 14, the compiled INT4 and INT8 GEMVs and the tensor-core kernels: build, test, time. One call on the lent nvidia-h200 machine, from the repository
# root, with .whl (pydantic and its four dependencies for python 3.12; nvidia-cutlass==4.2.0.0, whose C++ headers
# csrc/cutlass builds against) carried; everything lands in $OUT.
#   stages: build (timed, SASS instruction mix of the batch-1 kernel), tests/test_cuda.py, kernel_bench per shape
#   (the GEMV's tiles swept at 1-4 rows, then every variant interleaved), attn (experiments.attn_bench per shape:
#   decode attention's tiles; attn_e2e: its fastest tile end to end), sweep (experiments.bench --sweep: the
#   linears alone at prefill's rows, SmoothQuant's prefill tiles), ncu (Nsight Compute on one layer's INT4
#   GEMVs), gemv_ncu / attn_ncu (Nsight Compute's stalls per instruction of INT4's o / down GEMV, of decode
#   attention), the end-to-end bench per shape.
# STAGES (env) picks a subset: "build tests_w4g kb tests e2e" by default; SHAPES the shapes. The device tool
# brings back 8 files of a call: two shapes and every stage write more, so split the stages over calls.
# WHEELS (default .whl; .whl15 has the same and more), KB_FLAGS (default --sweep-w4g; --sweep-w8g times the
# 8-bit GEMV's tiles), E2E_RECIPES, E2E_BATCHES, E2E_INPUTS (default 512), E2E_FLAGS (more experiments.bench flags,
# e.g. --profile: each recipe's decode step per kernel), E2E_LIMIT (s per shape, default 240), E2E_NAME (the
# record's name, default e2e-w4g: two e2e runs of one call keep both), TESTS_K (tests_w4g's pytest -k),
# KEEP_GOING=1 (time even after a failed GEMV test, to see whether a fix is worth it; the table is then not a result),
# BUDGET (seconds for the whole script: each step's timeout is cut to what is left, so that a call returns its files
# before the device's limit; a stage that would start with under 20 s left is skipped, and says so).
set -uo pipefail
[ "${PACK:-0}" = 1 ] && trap "bash $PWD/experiments/gpu/pack.sh" EXIT  # one archive of $OUT (pack.sh)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export QUANT_SUITE_CACHE=${QUANT_SUITE_CACHE:-/root/qcache}
source experiments/gpu/ext_carry.sh && ext_restore  # a build carried in .ext/ (ext_carry.sh)
STAGES=${STAGES:-build tests_w4g kb tests e2e}
export DEADLINE=${DEADLINE:-$(( $(date +%s) + ${BUDGET:-86400} ))}  # (exported: attn_e2e runs this script again)
lim() { local l=$(( DEADLINE - $(date +%s) - 10 )); echo $(( l < 1 ? 1 : l < $1 ? l : $1 )); }  # $1, cut to what is left
KB_VARIANTS=${KB_VARIANTS:-fp16 cuBLAS,fp16 runtime,int4 tinygemm,int4 kpack,int4 w4g,int4 w4g unfused,int4 default,int8_wo runtime,int8_wo triton,smoothquant runtime,smoothquant triton,fp8 runtime,fp8 triton}
KB_BATCHES=${KB_BATCHES:-1,4,8,16}
SHAPES=${SHAPES:-llama2-7b llama3-8b}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader > "$OUT/gpu.txt"
date -u +%FT%TZ >> "$OUT/gpu.txt"
# The Nsight Compute stages' ncu (in $NCU), or "no ncu on this machine" into the file $1 and a non-zero return
find_ncu() {
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute*/ncu 2>/dev/null | head -1)
  [ -n "$NCU" ] || { echo "no ncu on this machine" | tee "$1"; return 1; }
}
for stage in $STAGES; do
  [ "$(lim 20)" -ge 20 ] || { echo "budget spent: stage $stage and those after it not run"; break; }
  case $stage in
  build)
    python3 - <<'PY' 2>&1 | tee "$OUT/build.log"
import time, torch
t = time.time()
from quant.runtime import cuda_ext
m = cuda_ext.load()
print("extension:", m if isinstance(m, str) else m.__file__, f"in {time.time() - t:.1f} s; torch", torch.__version__)
t = time.time()
m = cuda_ext.load_cutlass()  # (KernelConfig.wq_prefill_cutlass's; CUTLASS's headers: nvidia-cutlass in WHEELS)
print("CUTLASS extension:", m if isinstance(m, str) else m.__file__, f"in {time.time() - t:.1f} s")
PY
    ext_save
    so=$(ls "$QUANT_SUITE_CACHE"/torch-extensions/*/quant_cuda_gemv*.so 2>/dev/null | head -1)
    if [ -n "$so" ]; then
      cuobjdump -sass "$so" > /tmp/sass.txt
      python3 - <<'PY' > "$OUT/sass-mix.txt"
import re, collections
text = open("/tmp/sass.txt").read()
for fn in re.split(r"\n\s*Function : ", text)[1:]:
    name = fn.split("\n", 1)[0]
    if not any(s in name for s in ("ILi1ELi2ELi4E", "ILi1ELi1ELi4E", "w4a16_mma_kernelILi8E")):
        continue
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", fn))
    print(name, sum(ops.values()), "instructions")
    print("  ", ", ".join(f"{k} {v}" for k, v in ops.most_common(30)))
PY
    fi ;;
  tests_w4g)  # the GEMV's own tests, first: a wrong kernel stops the call before any timing
    timeout $(lim 200) python3 -m pytest -v -rf --tb=short -p no:cacheprovider tests/test_cuda.py \
      -k "${TESTS_K:-w4g or w8g or w4m or w8m}" > "$OUT/test_w4g.txt" 2>&1
    tail -3 "$OUT/test_w4g.txt"; grep -q " passed" "$OUT/test_w4g.txt" && ! grep -q "failed" "$OUT/test_w4g.txt" || [ "${KEEP_GOING:-0}" = 1 ] || exit 1 ;;
  tests)
    timeout $(lim 300) python3 -m pytest -v -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
    tail -3 "$OUT/test_cuda.txt" ;;
  kb)
    for shape in $SHAPES; do
      timeout $(lim 240) python3 -m experiments.kernel_bench --shape $shape --batch-sizes $KB_BATCHES ${KB_FLAGS:---sweep-w4g} \
        --variants "$KB_VARIANTS" \
        --out "$OUT/kb-w4g-$shape.json" > "$OUT/kb-w4g-$shape.log" 2>&1
      tail -32 "$OUT/kb-w4g-$shape.log"
    done ;;
  sweep)  # each format's linears alone at prefill's rows (experiments.bench --sweep: SWEEP_M rows, SWEEP_FORMATS,
          # SWEEP_VARIANTS the rows' label starts, e.g. auto,cutlass; default all)
    for shape in $SHAPES; do
      timeout $(lim ${SWEEP_LIMIT:-200}) python3 -m experiments.bench --sweep --shape $shape --sweep-m ${SWEEP_M:-1024} \
        --sweep-formats ${SWEEP_FORMATS:-fp16,W8A8_SQ_PER_CHANNEL,FP8} --sweep-variants "${SWEEP_VARIANTS:-}" \
        --out "$OUT/sweep-$shape.json" > "$OUT/sweep-$shape.log" 2>&1
      grep "^sweep" "$OUT/sweep-$shape.log" | tail -60
    done ;;
  attn)  # decode attention alone over its split kernel's tiles (ATTN_FLAGS, default --sweep)
    for shape in $SHAPES; do
      timeout $(lim 280) python3 -m experiments.attn_bench --shape $shape ${ATTN_FLAGS:---sweep} \
        --out "$OUT/attn-$shape.json" > "$OUT/attn-$shape.log" 2>&1
      tail -24 "$OUT/attn-$shape.log"
    done ;;
  attn_e2e)  # the attn stage's fastest tile per shape (attn_pick.py) end to end beside the default
    for shape in $SHAPES; do
      v=$(python3 experiments/gpu/attn_pick.py "$OUT/attn-$shape.json")
      [ -n "$v" ] || { echo "$shape: no tile faster than the default"; continue; }
      PACK=0 SHAPES=$shape STAGES=e2e E2E_NAME=attntile-e2e E2E_RECIPES=fp16,fp16@$v,int4_awq,int4_awq@$v,int8_wo,int8_wo@$v \
        bash experiments/gpu/w4g.sh
    done ;;
  ncu)  # Nsight Compute on one layer's INT4 GEMVs alone (kernel_bench, batch 1): speed of light, occupancy, launch,
        # warp stalls, memory, per kernel, where the machine has ncu and lets it read the counters (NCU_KERNELS: the
        # kernels' regex, NCU_COUNT: how many launches, NCU_VARIANTS: kernel_bench's variants, NCU_PAGE=raw: every
        # metric the sections collected, the warp stall reasons among them). ncu runs the SMs at base clock: compare
        # its kernels with each other, not its durations with the benches'
    find_ncu "$OUT/ncu.txt" || continue
    for shape in $SHAPES; do
      timeout $(lim 240) "$NCU" --target-processes all -k "regex:${NCU_KERNELS:-w4a16_gemv}" -c "${NCU_COUNT:-8}" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis --csv --page "${NCU_PAGE:-details}" \
        python3 -m experiments.kernel_bench --shape $shape --layers 1 --batch-sizes 1 --rounds 2 \
        --variants "${NCU_VARIANTS:-fp16 cuBLAS,int4 default}" > "$OUT/ncu-$shape.csv" 2> "$OUT/ncu-$shape.err"
      echo "$shape: $(wc -l < "$OUT/ncu-$shape.csv") lines"; tail -3 "$OUT/ncu-$shape.err"
    done ;;
  gemv_ncu)  # Nsight Compute's warp-stall samples per SASS instruction of INT4's o and down GEMV (kernel_bench, one
             # layer, batch 1: its launches of the persistent (4, 1) GEMV with x · pre staged run qkv, o, gate_up,
             # down in that order, twice before the graph (after FP16 cuBLAS's); the second run's o and down are
             # profiled), summarized by experiments/gpu/ncu_source.py; NCU_VARIANT: kernel_bench's INT4 variant
    find_ncu "$OUT/ncu-gemv.txt" || continue
    for shape in $SHAPES; do
      for pick in "o 5" "down 7"; do
        set -- $pick
        timeout $(lim 200) "$NCU" --target-processes all --kernel-name-base demangled \
          -k "regex:w4a16_gemv_persistent<\(int\)4, \(int\)1, \(int\)1, \(int\)0>" -s "$2" -c 1 \
          --section SourceCounters --section WarpStateStats -f -o "/tmp/ncu-gemv-$1-$shape" \
          python3 -m experiments.kernel_bench --shape $shape --layers 1 --batch-sizes 1 --rounds 1 \
          --variants "fp16 cuBLAS,${NCU_VARIANT:-int4 default}" --out "/tmp/ncu-gemv-$shape.json" \
          > "$OUT/ncu-gemv-$1-$shape.err" 2>&1
        "$NCU" --import "/tmp/ncu-gemv-$1-$shape.ncu-rep" --page source --print-source sass --csv \
          > "/tmp/ncu-gemv-src-$1-$shape.csv"
        "$NCU" --import "/tmp/ncu-gemv-$1-$shape.ncu-rep" --page details --csv > "$OUT/ncu-gemv-$1-$shape.csv"
        gzip -c "/tmp/ncu-gemv-src-$1-$shape.csv" > "$OUT/ncu-gemv-src-$1-$shape.csv.gz"
        python3 experiments/gpu/ncu_source.py "/tmp/ncu-gemv-src-$1-$shape.csv" > "$OUT/ncu-gemv-$1-$shape.txt" 2>&1
        echo "$shape $1:"; head -40 "$OUT/ncu-gemv-$1-$shape.txt"; tail -2 "$OUT/ncu-gemv-$1-$shape.err"
      done
    done ;;
  attn_ncu)  # Nsight Compute on decode attention's split kernel alone (attn_bench's default tile, one launch past
             # the warm-up): warp-stall samples per SASS instruction (the source page) and the kernel's summary
    find_ncu "$OUT/ncu-attn.txt" || continue
    for shape in $SHAPES; do
      timeout $(lim 200) "$NCU" --target-processes all -k "regex:_attn_split_kernel" -s 40 -c 1 --section SourceCounters \
        --section WarpStateStats --section InstructionStats -f -o /tmp/ncu-attn-$shape \
        python3 -m experiments.attn_bench --shape $shape --no-peer --rounds 1 --out /tmp/ncu-attn-$shape.json \
        > "$OUT/ncu-attn-$shape.err" 2>&1
      "$NCU" --import /tmp/ncu-attn-$shape.ncu-rep --page source --print-source sass --csv \
        > "$OUT/ncu-attn-src-$shape.csv"
      "$NCU" --import /tmp/ncu-attn-$shape.ncu-rep --page details --csv > "$OUT/ncu-attn-$shape.csv"
      python3 experiments/gpu/ncu_source.py "$OUT/ncu-attn-src-$shape.csv" > "$OUT/ncu-attn-$shape.txt" 2>&1
      echo "$shape:"; head -40 "$OUT/ncu-attn-$shape.txt"; tail -2 "$OUT/ncu-attn-$shape.err"
    done ;;
  e2e)
    for shape in $SHAPES; do
      timeout $(lim ${E2E_LIMIT:-240}) python3 -m experiments.bench --shape $shape --recipes ${E2E_RECIPES:-fp16,int4_awq,int8_wo,int8_wo@triton8,smoothquant,smoothquant@triton8,fp8,fp8@triton8} \
        --batch-sizes ${E2E_BATCHES:-1,4,8,16} --input-lens ${E2E_INPUTS:-512} --no-hf --rounds 5 ${E2E_FLAGS:-} \
        --out "$OUT/${E2E_NAME:-e2e-w4g}-$shape.json" \
        > "$OUT/${E2E_NAME:-e2e-w4g}-$shape.log" 2>&1
      tail -20 "$OUT/${E2E_NAME:-e2e-w4g}-$shape.log"
    done ;;
  esac
done
