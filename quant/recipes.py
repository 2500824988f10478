"""Recipes as data: a small serialisable object with a stable hash.

The hash is over the canonical JSON of the recipe's fields, so the same recipe written in a different key
order, or read back from YAML, maps to the same cached checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from quant.errors import UserError

KINDS = ("fp16",)


@dataclass(frozen=True)
class Recipe:
    kind: str = "fp16"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown recipe {self.kind!r} (known: {', '.join(KINDS)})")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return self.kind
