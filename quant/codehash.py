"""Hash of the code that produced a cached artifact, so a cache never serves a result of older code.

``code_hash("quant.apply")`` covers the source of that module and of every project module it imports, transitively,
found statically (``ast``: imports inside functions count too), and the non-Python files a module declares it runs
(``__code_files__``), plus the versions of the third-party packages named. A cache key that includes it changes
whenever any of that code changes; a hand-kept file list (what the evaluation key had) silently misses the module
someone adds next.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("quant", "calibration", "experiments")  # the project's own top-level packages


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return found


@functools.lru_cache(maxsize=None)
def closure(name: str) -> tuple[Path, ...]:
    """Files of ``name`` and of every project module it imports, transitively; sorted."""
    seen: dict[str, Path] = {}
    data: set[Path] = set()
    todo = [name]
    while todo:
        mod = todo.pop()
        path = _module_file(mod)
        if path is None or mod in seen:
            continue
        seen[mod] = path
        data.update(_code_files(path))
        # A submodule import runs its parent packages' __init__ too.
        todo.extend(".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1))
        todo.extend(_imports(path, mod))
    return tuple(sorted(set(seen.values()) | data))


def _code_files(path: Path) -> set[Path]:
    """Files other than Python a module runs, named by a module-level ``__code_files__ = ("csrc/*", ...)`` of glob
    patterns beside it (the CUDA sources the runtime compiles): they belong to its code as much as its source."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__code_files__"
                                                for t in node.targets):
            patterns = ast.literal_eval(node.value)
            return {f for pattern in patterns for f in path.parent.glob(pattern) if f.is_file()}
    return set()


@functools.lru_cache(maxsize=None)
def code_hash(*modules: str, packages: tuple[str, ...] = ()) -> str:
    """12 hex digits over the sources of ``modules``' import closures and the versions of ``packages``."""
    digest = hashlib.sha256()
    files = sorted({f for m in modules for f in closure(m)})
    if not files:
        raise ValueError(f"no project module among {modules}")
    for f in files:
        digest.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    for pkg in packages:
        try:
            version = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{pkg}=={version}\0".encode())
    return digest.hexdigest()[:12]
