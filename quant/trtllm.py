"""TensorRT-LLM engine build: the ``trtllm-build`` command for each recipe, run as a subprocess, cached.

:func:`build_command` is the one place the command is made. Its flags are the ones TensorRT-LLM 1.x's
``trtllm-build`` accepts (``tensorrt_llm/commands/build.py``; plugin flags from ``PluginConfig`` in
``tensorrt_llm/plugin/plugin.py``; the commits followed are in docs/tensorrt-llm.md):

- ``--gpt_attention_plugin auto`` (the default, written out): attention runs the plugin in the checkpoint's dtype.
- ``--gemm_plugin auto`` for FP16 and the integer formats; left out for FP8 (its default, None, is "disabled"), whose
  GEMMs TensorRT builds itself from the checkpoint's FP8 scales (the cuBLASLt plugin covers non-quantized GEMMs).
- Quantization plugins are *not* flags: ``tensorrt_llm/builder.py`` (``build()``) switches on
  ``weight_only_quant_matmul_plugin`` (W8A16) or ``weight_only_groupwise_quant_matmul_plugin`` (W4A16_AWQ) from the
  checkpoint's quant mode, and the SmoothQuant plugins only for the ``*_PLUGIN`` algos of ``W8A8_SQ_PLUGIN_LIST``
  (``tensorrt_llm/quantization/mode.py``), so ModelOpt's ``W8A8_SQ_PER_CHANNEL`` builds TensorRT's own INT8 GEMMs.
  :func:`plugin_plan` states this mapping as data.
- ``--kv_cache_type paged`` (``--paged_kv_cache`` is deprecated in 1.x); ``--use_paged_context_fmha enable``, except
  where ``build()`` would switch it off itself (INT8 KV cache; FP8 KV cache without FP8 weights) — then ``disable``,
  so the command says what the engine gets.
- ``--max_batch_size/--max_input_len/--max_seq_len/--max_num_tokens`` from the :class:`Workload`.

:func:`build_engine` runs the command with its log in the engine folder, a timeout that kills the whole process
group, and a one-line :class:`~quant.errors.UserError` on failure; the engine folder is built in a temporary
sibling and renamed into place only after ``config.json`` and ``rank0.engine`` exist (``Engine.save`` in
``builder.py`` writes exactly those two). Engines are cached under ``<cache>/engines/`` by the checkpoint's
identity (model hash + recipe hash + calibration key) and a hash of the build options, one builder per key.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from quant.atomic import atomic_dir, atomic_write_json
from quant.errors import UserError
from quant.paths import cache_root
from quant.recipes import Recipe

BUILD_TIMEOUT_S = 3600.0  # a 70B engine takes tens of minutes; $QUANT_TRTLLM_BUILD_TIMEOUT overrides
ENGINE_FILES = ("config.json", "rank0.engine")
BUILD_LOG = "build.log"
BUILD_INFO = "quant_suite_build.json"


@dataclass(frozen=True)
class Workload:
    batch_size: int = 8
    input_len: int = 512
    output_len: int = 100

    @property
    def max_seq_len(self) -> int:
        return self.input_len + self.output_len

    @property
    def max_num_tokens(self) -> int:
        # Every prompt of a full batch in one context step (no chunking needed for the measured workload).
        return self.batch_size * self.input_len

    def covering(self, other: "Workload") -> "Workload":
        """The smallest workload whose engine serves both (e.g. the summaries and the latency run)."""
        return Workload(max(self.batch_size, other.batch_size), max(self.input_len, other.input_len),
                        max(self.output_len, other.output_len))


# -- the command ------------------------------------------------------------------------------------------
def _algos(recipe: Recipe | None, checkpoint_dir: Path) -> tuple[str | None, str | None]:
    """(quant_algo, kv_cache_quant_algo): the recipe's, or read from the checkpoint when no recipe is given."""
    if recipe is not None:
        return recipe.quant_algo, recipe.kv_algo
    try:
        quant = json.loads((Path(checkpoint_dir) / "config.json").read_text()).get("quantization") or {}
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {checkpoint_dir}: cannot read config.json ({exc})") from None
    return quant.get("quant_algo"), quant.get("kv_cache_quant_algo")


def _has_fp8_weights(quant_algo: str | None, checkpoint_dir: Path | None) -> bool:
    """FP8 weights: the FP8 recipe, or a MIXED_PRECISION checkpoint with an FP8 layer in quant_cfg.json."""
    if quant_algo != "MIXED_PRECISION" or checkpoint_dir is None:
        return quant_algo == "FP8"
    try:
        layers = json.loads((Path(checkpoint_dir) / "quant_cfg.json").read_text()).get("quantized_layers") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return any(isinstance(v, dict) and v.get("quant_algo") == "FP8" for v in layers.values())


def build_command(checkpoint_dir: Path, engine_dir: Path, recipe: Recipe | None, workload: Workload) -> list[str]:
    """The ``trtllm-build`` command line for a checkpoint (recipe None: its formats are read from config.json)."""
    quant_algo, kv_algo = _algos(recipe, checkpoint_dir)
    fp8 = _has_fp8_weights(quant_algo, None if recipe is not None else checkpoint_dir)
    # builder.py build(): paged context FMHA "doesn't work with int8 kv cache", and with an FP8 KV cache it needs
    # FP8 context FMHA, which only the FP8 quantization workflow enables.
    paged_context_fmha = not (kv_algo == "INT8" or (kv_algo == "FP8" and not fp8))
    cmd = [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(engine_dir),
        "--gpt_attention_plugin", "auto",
        "--max_batch_size", str(workload.batch_size),
        "--max_input_len", str(workload.input_len),
        "--max_seq_len", str(workload.max_seq_len),
        "--max_num_tokens", str(workload.max_num_tokens),
        "--kv_cache_type", "paged",
        "--use_paged_context_fmha", "enable" if paged_context_fmha else "disable",
        "--workers", "1",
        "--log_level", "info",
    ]
    if not fp8:  # FP8: left at its default (None = disabled), as TensorRT-LLM's FP8 examples build
        cmd += ["--gemm_plugin", "auto"]
    return cmd


def plugin_plan(quant_algo: str | None, kv_algo: str | None = None, checkpoint_dir: Path | None = None) -> dict:
    """What the engine runs for each part, given the checkpoint's formats (builder.py's rules, see module doc)."""
    gemm = {
        None: "gemm_plugin (cuBLASLt, checkpoint dtype)",
        "W8A16": "weight_only_quant_matmul_plugin (INT8 weights, per-channel scales)",
        "W4A16_AWQ": "weight_only_groupwise_quant_matmul_plugin (INT4 AWQ/GPTQ, per-group scales)",
        "W4A8_AWQ": "weight_only_groupwise_quant_matmul_plugin (INT4 per-group weights, FP8 activations)",
        "W8A8_SQ_PER_CHANNEL": "TensorRT INT8 GEMM (SmoothQuant per-channel, no SQ plugin: not a *_PLUGIN algo)",
        "FP8": "TensorRT FP8 GEMM (per-tensor scales; gemm_plugin disabled)",
        "MIXED_PRECISION": "per layer, as quant_cfg.json says (weight-only plugins / TensorRT INT8 or FP8 GEMMs)",
    }
    if quant_algo not in gemm:
        raise UserError(f"quant_algo {quant_algo!r} has no TensorRT-LLM build mapping here "
                        f"(known: {', '.join(str(k) for k in gemm)})")
    attention = "gpt_attention_plugin (auto dtype), paged KV cache"
    if kv_algo == "INT8":
        attention += ", INT8 KV cache, paged context FMHA off"
    elif kv_algo == "FP8":
        attention += ", FP8 KV cache" + (", FP8 context FMHA" if quant_algo == "FP8" else ", paged context FMHA off")
    else:
        attention += ", paged context FMHA"
    return {"gemm": gemm[quant_algo], "attention": attention,
            "gemm_plugin": "disable" if _has_fp8_weights(quant_algo, checkpoint_dir) else "auto"}


def check_gpu_support(quant_algo: str | None, kv_algo: str | None, capability: tuple[int, int] | None) -> None:
    """builder.py build() refuses INT8/INT4 weights, SmoothQuant and INT8 KV cache on SM 10.x: say so before a build."""
    if capability is None or not (10, 0) <= tuple(capability) < (12, 0):
        return
    if quant_algo in ("W8A16", "W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL") or kv_algo == "INT8":
        raise UserError(f"TensorRT-LLM engines do not support {quant_algo or kv_algo} on compute capability "
                        f"{capability[0]}.{capability[1]} (tensorrt_llm/builder.py: INT8/INT4/SmoothQuant are "
                        f"not supported on SM>=100); use fp16 or fp8 there")


# -- running it ---------------------------------------------------------------------------------------------
def trtllm_build_available() -> str | None:
    return shutil.which("trtllm-build")


def build_timeout_s() -> float:
    value = os.environ.get("QUANT_TRTLLM_BUILD_TIMEOUT")
    if not value:
        return BUILD_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise UserError(f"$QUANT_TRTLLM_BUILD_TIMEOUT must be seconds, got {value!r}") from None
    if seconds <= 0:
        raise UserError(f"$QUANT_TRTLLM_BUILD_TIMEOUT must be > 0, got {value!r}")
    return seconds


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERRORISH = re.compile(r"error|exception|assert|traceback|failed|killed|out of memory", re.IGNORECASE)


def log_tail_summary(log_path: Path, *, max_chars: int = 300) -> str:
    """One line from the end of a build log: its last error-looking lines, else its last lines."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    lines = [_ANSI.sub("", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return "(empty log)"
    tail = lines[-40:]
    errors = [ln for ln in tail if _ERRORISH.search(ln) and not ln.startswith("Traceback")]
    picked = errors[-2:] if errors else tail[-3:]
    if errors and tail[-1] not in picked:
        picked.append(tail[-1])
    line = " | ".join(picked)
    return line if len(line) <= max_chars else "…" + line[-(max_chars - 1):]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the build's whole process group (trtllm-build spawns workers), SIGKILL what survives 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_build(cmd: list[str], log_path: Path, *, timeout_s: float) -> None:
    """Run ``cmd`` with stdout+stderr into ``log_path``; raise a one-line UserError on non-zero exit or timeout."""
    exe = shutil.which(cmd[0])
    if exe is None:
        raise UserError(f"{cmd[0]} is not on PATH (TensorRT-LLM is not installed here; see docs/tensorrt-llm.md)")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen([exe, *cmd[1:]], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise UserError(f"trtllm-build timed out after {timeout_s:g} s and was killed; last output: "
                            f"{log_tail_summary(log_path)}") from None
        except BaseException:  # Ctrl-C: never leave a GPU-holding builder behind
            _kill_group(proc)
            raise
    if rc != 0:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        raise UserError(f"trtllm-build {how} after {time.monotonic() - t0:.0f} s: {log_tail_summary(log_path)}")


def validate_engine_dir(folder: Path) -> None:
    """An engine folder as ``Engine.save`` writes it: config.json (pretrained_config + build_config), rank0.engine."""
    folder = Path(folder)
    missing = [f for f in ENGINE_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f"trtllm-build exited 0 but wrote no engine ({', '.join(missing)} missing in its output)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"trtllm-build wrote an unreadable config.json ({exc})") from None
    if not isinstance(config, dict) or not {"pretrained_config", "build_config"} <= set(config):
        raise UserError("trtllm-build wrote a config.json without pretrained_config/build_config")
    if (folder / "rank0.engine").stat().st_size == 0:
        raise UserError("trtllm-build wrote an empty rank0.engine")


def engine_is_complete(folder: Path) -> bool:
    try:
        validate_engine_dir(folder)
        return True
    except UserError:
        return False


# -- the cache ----------------------------------------------------------------------------------------------
def trtllm_version() -> str | None:
    for dist in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def gpu_identity(device: str = "cuda") -> dict:
    """GPU name and compute capability (engines are specific to both); empty without a visible GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        dev = torch.device(device if str(device).startswith("cuda") else "cuda")
        return {"gpu": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev))}
    except Exception:  # noqa: BLE001 - a broken driver must not hide behind a cache key
        return {}


def build_options(cmd: list[str], *, version: str | None, gpu: dict) -> dict:
    """Everything that changes the engine except the input checkpoint: flags (paths dropped), versions, GPU."""
    flags = [a for i, a in enumerate(cmd[1:], start=1)
             if a not in ("--checkpoint_dir", "--output_dir") and cmd[i - 1] not in ("--checkpoint_dir", "--output_dir")]
    return {"flags": flags, "tensorrt_llm": version, **gpu}


def engine_dir_for(source_key: str, options: dict) -> Path:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "engines" / f"{source_key}-{digest}"


def checkpoint_fingerprint(checkpoint_dir: Path) -> str:
    """Identity of a checkpoint folder that is not one of the cache's (a user's --checkpoint): its files' bytes."""
    digest = hashlib.sha256()
    for f in sorted(Path(checkpoint_dir).iterdir()):
        if f.is_file():
            digest.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
    return "ckpt-" + digest.hexdigest()[:16]


def build_engine(checkpoint_dir: Path, recipe: Recipe | None, workload: Workload, *, source_key: str,
                 device: str = "cuda", timeout_s: float | None = None, log=None) -> Path:
    """The engine for a checkpoint: from the cache, or built by ``trtllm-build`` (one builder per key).

    ``source_key`` names the checkpoint's content (model hash + recipe hash + calibration key for the suite's own
    checkpoints, :func:`checkpoint_fingerprint` otherwise); the build options are hashed next to it.
    """
    from quant import cache_budget
    from quant.cache_budget import build_lock

    checkpoint_dir = Path(checkpoint_dir).resolve()
    quant_algo, kv_algo = _algos(recipe, checkpoint_dir)
    gpu = gpu_identity(device)
    check_gpu_support(quant_algo, kv_algo, tuple(gpu["capability"]) if gpu else None)
    probe = build_command(checkpoint_dir, Path("ENGINE"), recipe, workload)
    final = engine_dir_for(source_key, build_options(probe, version=trtllm_version(), gpu=gpu))
    if engine_is_complete(final):
        return final
    with build_lock(final):
        if engine_is_complete(final):  # built by another process while we waited
            return final
        if trtllm_build_available() is None:
            raise UserError("trtllm-build is not on PATH (TensorRT-LLM is not installed here; see docs/tensorrt-llm.md)")
        # An engine holds the checkpoint's weights at their precision plus its kernels' tactics: 1.25x bounds it.
        cache_budget.reserve(int(1.25 * sum(f.stat().st_size for f in checkpoint_dir.iterdir() if f.is_file())),
                             for_what=final, log=log)
        timeout_s = build_timeout_s() if timeout_s is None else timeout_s
        failed_log = final.parent / f"{final.name}.failed.log"
        t0 = time.perf_counter()
        with atomic_dir(final, fault="engine.rename") as tmp:
            cmd = build_command(checkpoint_dir, tmp, recipe, workload)
            if log:
                log(f"building TensorRT-LLM engine ({time.strftime('%H:%M:%S')}, timeout {timeout_s:g} s): "
                    + " ".join(cmd))
            try:
                run_build(cmd, tmp / BUILD_LOG, timeout_s=timeout_s)
                validate_engine_dir(tmp)
            except UserError as exc:
                # The temporary folder goes away with the failure; keep its log where the user can read it.
                if (tmp / BUILD_LOG).is_file():
                    shutil.copy2(tmp / BUILD_LOG, failed_log)
                raise UserError(f"{exc} (full log: {failed_log})") from None
            atomic_write_json(tmp / BUILD_INFO, {
                "command": cmd, "checkpoint": str(checkpoint_dir), "source_key": source_key,
                "recipe": recipe.to_dict() if recipe is not None else None,
                "workload": {"batch_size": workload.batch_size, "input_len": workload.input_len,
                             "output_len": workload.output_len},
                "tensorrt_llm": trtllm_version(), **gpu, "build_s": time.perf_counter() - t0,
                "python": sys.version.split()[0],
            })
        failed_log.unlink(missing_ok=True)
        cache_budget.settle(final, log=log)
        if log:
            log(f"built engine in {time.perf_counter() - t0:.1f} s: {final}")
    return final
