"""Which runtime executes a checkpoint: the PyTorch runtime (everywhere) or a TensorRT-LLM engine (NGC container + GPU).

:func:`resolve_backend` turns ``--backend auto|torch|trtllm`` into a :class:`BackendChoice`: ``auto`` picks
TensorRT-LLM when ``tensorrt_llm`` imports, ``trtllm-build`` is on PATH and a CUDA GPU is visible, else torch, and
says which and why in one line on stderr; an explicit ``trtllm`` that cannot work is a one-line UserError naming
what is missing. :func:`open_runtime` returns the runtime for a checkpoint folder: a
:class:`~quant.runtime.torch_runtime.TorchRuntime`, or the engine built (cached) from the checkpoint by
``trtllm-build`` behind a :class:`~quant.runtime.trtllm_runtime.TrtllmRuntime`.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from quant.errors import UserError
from quant.trtllm import build_engine, checkpoint_fingerprint, trtllm_version

BACKENDS = ("auto", "torch", "trtllm")


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "torch" | "trtllm"
    version: str | None  # torch.__version__ or tensorrt_llm's version
    reason: str  # why this backend (one line)

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "reason": self.reason}

    def announce(self) -> None:
        """The one line saying which backend ``auto`` chose and why (callers print it once the inputs are
        checked, so that a bad flag's error stays the only line)."""
        if not self.reason.startswith("requested"):
            print(f"backend: auto → {self.name} ({self.reason})", file=sys.stderr)


def probe_trtllm() -> tuple[str | None, str | None]:
    """(version, None) when TensorRT-LLM can build and run engines here, else (None, what is missing)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return None, "the tensorrt_llm package is not installed (run inside an NGC TensorRT-LLM container)"
    try:
        import tensorrt_llm  # noqa: F401  (imports TensorRT and CUDA libraries; slow, and may fail without a driver)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot use it", reported verbatim
        first = (str(exc).splitlines() or [""])[0][:160]
        return None, f"tensorrt_llm is installed but does not import ({type(exc).__name__}: {first})"

    version = trtllm_version() or getattr(sys.modules.get("tensorrt_llm"), "__version__", None)
    if shutil.which("trtllm-build") is None:
        return None, f"tensorrt_llm {version} imports but its trtllm-build command is not on PATH"
    import torch

    if not torch.cuda.is_available():
        return None, f"tensorrt_llm {version} imports but no CUDA GPU is visible"
    return version, None


def resolve_backend(name: str, device: str = "cpu") -> BackendChoice:
    """``auto`` → trtllm when usable, else torch (:meth:`BackendChoice.announce` says why); ``trtllm`` → UserError
    if unusable."""
    import torch

    if name not in BACKENDS:
        raise UserError(f"--backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "torch":
        return BackendChoice("torch", torch.__version__, "requested (--backend torch)")
    version, missing = probe_trtllm()
    if name == "trtllm":
        if missing:
            raise UserError(f"--backend trtllm: {missing}")
        return BackendChoice("trtllm", version, "requested (--backend trtllm)")
    if missing:
        choice = BackendChoice("torch", torch.__version__, f"{missing}; using the PyTorch runtime")
    else:
        choice = BackendChoice("trtllm", version, f"tensorrt_llm {version} imports and a CUDA GPU is visible")
    return choice


def backend_device(choice: BackendChoice, device: str) -> str:
    """TensorRT-LLM runs on a GPU whatever ``--device`` says (``cpu`` only means something to the PyTorch runtime)."""
    if choice.name == "trtllm" and not str(device).startswith("cuda"):
        return "cuda:0"
    return device


def open_runtime(choice: BackendChoice, checkpoint_dir: Path, *, model=None, recipe=None, workload=None,
                 device: str = "cpu", compute_dtype: str = "float32", log=None):
    """The runtime for a checkpoint folder (TRT-LLM format, or a ModelOpt HF export for the torch backend).

    For trtllm, ``recipe`` None means a user's checkpoint (formats read from its config.json, cache key from its
    bytes); with a recipe, the engine is keyed like the checkpoint (model hash + recipe hash + calibration key).
    ``workload`` (:class:`~quant.trtllm.Workload`) sizes the engine.
    """
    from quant.hf_checkpoint import checkpoint_format

    checkpoint_dir = Path(checkpoint_dir)
    if choice.name == "torch":
        from quant.runtime.torch_runtime import TorchRuntime

        return TorchRuntime.from_dir(checkpoint_dir, device=device, compute_dtype=compute_dtype)  # either format
    if choice.name != "trtllm":
        raise UserError(f"unknown backend {choice.name!r}")
    if checkpoint_format(checkpoint_dir) == "hf":
        raise UserError(f"{checkpoint_dir} is a Hugging Face export: TensorRT-LLM runs it through tensorrt_llm.LLM "
                        "(see docs/tensorrt-llm.md); the suite's TensorRT-LLM runner executes engines built from "
                        "TRT-LLM checkpoints")
    if workload is None:
        raise UserError("the TensorRT-LLM backend needs a workload to size the engine")
    from quant.runtime.trtllm_runtime import TrtllmRuntime

    source_key = checkpoint_dir.name if recipe is not None else checkpoint_fingerprint(checkpoint_dir)
    device = backend_device(choice, device)
    engine = build_engine(checkpoint_dir, recipe, workload, source_key=source_key, device=device, log=log)
    if log:
        log(f"engine: {engine}")
    return TrtllmRuntime(engine, checkpoint_dir=checkpoint_dir, device=device)
