"""Which of the extension's refusals (TORCH_CHECK) reach Python as RuntimeError, and which crash: each case in its own
process (a crash ends only that case); then the toolchain that builds extensions here, through a one-line extension
built as it links by default and with cuda_ext.SHARED_CXX_RUNTIME. Run on a GPU machine with PYTHONPATH at the
repository: ``python3 experiments/gpu/throw_probe.py`` (record: experiments/results/gpu/kernels/throw-probe-*.txt)."""
import os
import subprocess
import sys
import tempfile

ARGS = {  # (x, w, s) for each binding, on the GPU unless named
    "gemv": "torch.zeros({m}, 64, dtype=torch.float16{dev}), torch.zeros(64, 8, dtype=torch.int32{dev}), "
            "torch.ones(64, 2, dtype=torch.float16{dev})",
    "mma": "torch.zeros(33, 64, dtype=torch.float16, device='cuda'), "
           "torch.zeros(1, 4, 32, 4, dtype=torch.int32, device='cuda'), "
           "torch.ones(1, 2, 8, 8, dtype=torch.float16, device='cuda')",
}
CASES = {
    "splits_host_only": "cuda_ext.w4a16_mma_splits(33, 64, 64)",
    "w4a16_gemv_cpu_tensor": "cuda_ext.w4a16_gemv(" + ARGS["gemv"].format(m=1, dev="") + ", group=32)",
    "w4a16_gemv_grid_rows": "cuda_ext.w4a16_gemv(" + ARGS["gemv"].format(m=2, dev=", device='cuda'")
                            + ", group=32, grid=-1)",
    "w4a16_mma_33_rows": f"cuda_ext.w4a16_mma({ARGS['mma']}, group=32, tile_counter=cuda_ext.tile_counter(64, 'cuda'))",
    "torch_own_check": "torch.zeros(2, device='cuda').view(3)",
}
PRE = "import torch; from quant.runtime import cuda_ext; assert not isinstance(cuda_ext.load(), str), cuda_ext.load()"
THROWER = 'int64_t boom(int64_t x) { TORCH_CHECK(x < 3, "too big: ", x); return x; }'


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True)


def shell(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout


def main() -> None:
    for name, stmt in CASES.items():
        p = run(f"{PRE}\ntry:\n    {stmt}\n    print('no error')\nexcept RuntimeError as e:\n"
                "    print('RuntimeError:', str(e).splitlines()[0][:150])")
        print(f"{name}: rc {p.returncode}: {p.stdout.strip() or (p.stderr.strip().splitlines() or [''])[-1]}")
        if p.returncode not in (0, 1):
            print("   ", "\n    ".join(p.stderr.strip().splitlines()[:6]))
    print("CXX", os.environ.get("CXX"), "CC", os.environ.get("CC"), "LDFLAGS", os.environ.get("LDFLAGS"))
    for flags in ([], ["-l:libstdc++.so.6"]):  # as built by default, and with the shared C++ runtime named
        d = tempfile.mkdtemp()
        p = run("from torch.utils import cpp_extension\n"
                f"m = cpp_extension.load_inline('thrower', cpp_sources={THROWER!r}, functions=['boom'], "
                f"build_directory={d!r}, extra_ldflags={flags!r})\n"
                "try:\n    m.boom(5)\nexcept RuntimeError as e:\n"
                "    print('thrower: RuntimeError', str(e).splitlines()[0])\n")
        print(flags, "thrower rc", p.returncode, p.stdout.strip(), p.stderr.strip()[-300:])
        print(shell(f"grep -E '^(cxx|ldflags) ' {d}/build.ninja; readelf -d {d}/thrower.so | grep NEEDED"))
    print(shell("which c++ g++; c++ --version | head -1; readlink -f $(which c++); "
                "c++ -dumpspecs | grep -o 'static-libstdc[^ }]*' | sort -u; c++ -print-file-name=libstdc++.so; "
                "ls -l $(c++ -print-file-name=libstdc++.so)"))


if __name__ == "__main__":
    main()
