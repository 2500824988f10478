#!/usr/bin/env bash
# Issue 15, the 8B record: every stage of the given recipes at the Llama-3-8B shape on the lent nvidia-h200 machine,
# from the repository root, with .whl15 carried. Writes scale-8b.json (saved after every stage) and scale.log to
# $OUT. RECIPES (env) picks them; a 10-minute call holds about three (write_model ~50 s, AWQ build ~130 s).
#
# .whl15, made here (python 3.12 wheels; the image lacks these or has versions transformers 5.24 refuses):
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
#      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl15"
#   python3 -m pip download $P transformers==5.24.0 nvidia-modelopt==0.47.0 datasets==5.2.0 nltk==3.10.4 \
#     omegaconf==2.4.0 pulp==3.3.2 dill==0.4.1 multiprocess==0.70.19 optuna==5.0.0 alembic==1.20.1 \
#     sqlalchemy==2.1.9 mako==1.4.3 colorlog==6.12.0 gguf==0.19.0 accelerate==1.15.0 huggingface-hub==2.4.0 \
#     tokenizers==0.23.3 httpx2==2.16.2 httpcore2==2.16.2 truststore idna anyio pydantic==2.14.4 \
#     pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
#   python3 -m pip wheel --no-deps -w .whl15 rouge-score==0.1.2 aclsum==0.1.2   # sdist / data wheel
# (~47 MB: under the 64 MiB a call carries.)
set -uo pipefail
[ "${PACK:-0}" = 1 ] && trap "bash $PWD/experiments/gpu/pack.sh" EXIT  # one archive of $OUT (pack.sh)
rm -rf /tmp/site  # a warm machine keeps the last call's install: start clean
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl15/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
RECIPES=${RECIPES:-int4_awq,fp16,fp8}
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; free -g; df -h /; date -u; } > "$OUT/machine.txt"
QUANT_SUITE_CACHE=/root/qcache timeout ${LIMIT:-540} python3 -m experiments.scale --shape llama3-8b \
    --recipes "$RECIPES" --workdir /root/scale --cache-max-gb 25 --device cuda --out "$OUT/scale-8b.json" \
    > "$OUT/scale.log" 2>&1
echo "rc=$?"; tail -20 "$OUT/scale.log"
