# Sourced by the GPU scripts: the compiled extension from one call to the next. Each call gets a bare machine, and
# the build takes a minute or more of the ten, so a call brings its build back ($OUT/ext/KEY/quant_cuda_*.so)
# and the next carries it in .ext/ (git-ignored; here: mkdir -p .ext && cp -r FILES_AT/ext/. .ext/; pack.sh
# leaves ext/ beside its archive). cuda_ext.load() takes a build only from the folder named by cuda_ext.build_key
# (this code with csrc/, PyTorch's and CUDA's versions, the GPUs); another code's build is never used, and it builds
# otherwise.
ext_restore() {
  if [ -d .ext ]; then mkdir -p "$QUANT_SUITE_CACHE/torch-extensions" && cp -r .ext/. "$QUANT_SUITE_CACHE/torch-extensions/"; fi
}
ext_save() {
  local so key
  for so in "$QUANT_SUITE_CACHE"/torch-extensions/*/quant_cuda_*.so; do  # (the GEMVs'; CUTLASS's, if built)
    key=$(basename "$(dirname "$so")")
    [ -f "$so" ] && [ ! -f ".ext/$key/$(basename "$so")" ] || continue  # none built, or carried in
    mkdir -p "$OUT/ext/$key" && cp "$so" "$OUT/ext/$key/"
  done
}

# The same for the peers' compiles (peers.sh): inductor's cache (its FX graphs, Triton kernels and max-autotune's
# choices) from one call to the next, so torchao's max-autotune compile, longer than a call could wait (stage 4),
# resumes where the last call stopped. Inductor keys its entries on the code and shapes (not weight values), so a
# peer built again with other random weights still finds them; a kernel's speed does not depend on where it was
# compiled. Carried in .inductor/cache.tgz (git-ignored), returned in $OUT/inductor/cache.tgz when it is at most
# INDUCTOR_MAX_MB (default 15: the device tool returns files of up to 16 MiB) so that it still fits a call's carry
# beside the wheels and .ext.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/root/inductor-cache}
inductor_restore() {
  mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
  if [ -f .inductor/cache.tgz ]; then tar xzf .inductor/cache.tgz -C "$TORCHINDUCTOR_CACHE_DIR"; fi
}
inductor_save() {
  local mb
  mkdir -p "$OUT/inductor" && tar czf "$OUT/inductor/cache.tgz" -C "$TORCHINDUCTOR_CACHE_DIR" . 2>/dev/null
  mb=$(( $(stat -c %s "$OUT/inductor/cache.tgz") / 1048576 ))
  if [ "$mb" -gt "${INDUCTOR_MAX_MB:-15}" ]; then
    echo "inductor cache: $mb MB, over INDUCTOR_MAX_MB; not returned"; rm -rf "$OUT/inductor"
  else
    echo "inductor cache: $mb MB returned in inductor/cache.tgz"
  fi
}
