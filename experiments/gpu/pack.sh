#!/usr/bin/env bash
# The GPU scripts' exit trap when PACK=1: $OUT becomes one archive, out.tgz, because the device tool brings back at
# most 8 files of a call and a call with several stages (or peers, each with its own record and log) writes more.
# tar's exit 1 ("file changed as we read it": a bench stopped by `timeout` still saving its record, which it
# writes whole by rename) keeps the archive; only a failed archive (2) leaves $OUT as it is.
# An archive already there (an earlier script of the same call packed first) is unpacked into the new one, so that
# chained scripts give one flat archive, not archives inside archives (a name both wrote keeps the later file).
# The builds carried back (ext/, inductor/: ext_carry.sh) stay files of their own beside it: each is under the tool's
# 16 MiB a file, but together with the rest in one archive they were not (a call's whole record was lost so).
cd "$OUT" || exit 0
if [ -f out.tgz ]; then tar xzf out.tgz --skip-old-files && rm out.tgz || exit 0; fi
tar czf /tmp/gpu-out.tgz --exclude=./ext --exclude=./inductor .; rc=$?
[ $rc -le 1 ] && find . -mindepth 1 -maxdepth 1 ! -name ext ! -name inductor -exec rm -rf {} + \
  && mv /tmp/gpu-out.tgz out.tgz
