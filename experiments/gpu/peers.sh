#!/usr/bin/env bash
# Issue 14, item 5: the project's recipes and the peers (HF static cache + torch.compile, torchao, GemLite) in one
# interleaved bench per shape, on the lent nvidia-h200 machine, from the repository root, with .whl15 and
# .whl-peers carried (~56 MB). Writes bench-<shape>.json and bench-<shape>.log per shape to $OUT.
#
# .whl15: see experiments/gpu/scale8b.sh (transformers 5.24 and what it needs: the image's is older).
# .whl-peers, made here:
#   python3 -m pip download --no-deps -d .whl-peers torchao==0.18.0   # abi3 wheel; torch >= 2.11
#   python3 -m pip wheel --no-deps -w .whl-peers gemlite==0.6.0.post2   # sdist only; pure Python + Triton
# WHEELS (default .whl15): a folder of .whl15's wheels but pulp and aclsum (unused here) leaves room in a call's
# 64 MiB for .ext. SHAPES, RECIPES, PEERS, BATCHES, PEER_BATCHES, INPUTS, ROUNDS, PEER_TIMEOUT (env) narrow a call
# to its 10 minutes; BUDGET (seconds, per shape: experiments.bench --budget) ends a shape's run with its table
# rather than under the call's `timeout`.
# Each peer runs in its own process (bench-<shape>.<peer>.json / .log beside the shape's record): with the device
# tool's 8 files a call, pack $OUT into one archive at the end of the command.
set -uo pipefail
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ${WHEELS:-.whl15}/*.whl \
    .whl-peers/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export QUANT_SUITE_CACHE=${QUANT_SUITE_CACHE:-/root/qcache}
# a build carried in .ext/ and inductor's cache in .inductor/ in, this call's out (ext_carry.sh); PACK=1: then one
# archive of $OUT (pack.sh)
source experiments/gpu/ext_carry.sh && ext_restore && inductor_restore \
    && trap 'ext_save; inductor_save; [ "${PACK:-0}" = 1 ] && bash experiments/gpu/pack.sh' EXIT
SHAPES=${SHAPES:-llama2-7b llama3-8b}
RECIPES=${RECIPES:-fp16,int8_wo,int4_awq,fp8}
PEERS=${PEERS:-hf-compile,torchao-int8wo,torchao-int4wo,torchao-fp8wo,gemlite-a16w4,gemlite-a16w8}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader > "$OUT/gpu.txt"
date -u +%FT%TZ >> "$OUT/gpu.txt"
for shape in $SHAPES; do
  python3 -m experiments.bench --shape "$shape" --recipes "$RECIPES" --peers "$PEERS" \
      --batch-sizes "${BATCHES:-1,4,8,16,32}" --peer-batch-sizes "${PEER_BATCHES:-1}" --input-lens "${INPUTS:-512}" \
      --rounds "${ROUNDS:-5}" --peer-timeout "${PEER_TIMEOUT:-900}" ${BUDGET:+--budget "$BUDGET"} --no-hf \
      --out "$OUT/bench-$shape.json" \
      > "$OUT/bench-$shape.md" 2> "$OUT/bench-$shape.log"
  echo "$shape rc=$?"; tail -30 "$OUT/bench-$shape.md"
done
