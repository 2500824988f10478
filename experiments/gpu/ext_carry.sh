# Sourced by the GPU scripts: the compiled extension from one call to the next. Each call gets a bare machine, and
# the build takes a minute or more of the ten, so a call brings its build back ($OUT/ext/KEY/quant_cuda_gemv.so)
# and the next carries it in .ext/ (git-ignored; here: mkdir -p .ext && cp -r FILES_AT/ext/. .ext/, or from
# out.tgz's ext/). cuda_ext.load() takes a build only from the folder named by cuda_ext.build_key (this code with
# csrc/, PyTorch's and CUDA's versions, the GPUs); another code's build is never used, and it builds otherwise.
ext_restore() {
  if [ -d .ext ]; then mkdir -p "$QUANT_SUITE_CACHE/torch-extensions" && cp -r .ext/. "$QUANT_SUITE_CACHE/torch-extensions/"; fi
}
ext_save() {
  local so key
  for so in "$QUANT_SUITE_CACHE"/torch-extensions/*/quant_cuda_gemv.so; do
    key=$(basename "$(dirname "$so")")
    [ -f "$so" ] && [ ! -f ".ext/$key/quant_cuda_gemv.so" ] || continue  # none built, or carried in
    mkdir -p "$OUT/ext/$key" && cp "$so" "$OUT/ext/$key/"
  done
}
