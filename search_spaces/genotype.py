"""Genotype: the discrete cell pair a DARTS search derives (Liu et al. 2019, section 2.4).

A cell with n intermediate nodes lists 2n (op, input) pairs: node i (0-based) takes two
inputs from {c_{k-2}, c_{k-1}, node 0 .. node i-1}, indexed 0 .. i+1. JSON is the only
serialised form (never pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .operations import PRIMITIVES

Edge = tuple[str, int]


class GenotypeError(ValueError):
    """A genotype that names an unknown op or an impossible input node."""


def _check_cell(name: str, edges: tuple[Edge, ...], concat: tuple[int, ...], ops: tuple[str, ...]) -> None:
    if len(edges) == 0 or len(edges) % 2:
        raise GenotypeError(f"genotype.{name}: needs 2 edges per node, got {len(edges)} edges")
    nodes = len(edges) // 2
    for k, edge in enumerate(edges):
        if not (isinstance(edge, (tuple, list)) and len(edge) == 2):
            raise GenotypeError(f"genotype.{name}[{k}]: expected [op, input], got {edge!r}")
        op, idx = edge
        if op not in ops or op == "none":
            allowed = ", ".join(o for o in ops if o != "none")
            raise GenotypeError(f"genotype.{name}[{k}]: unknown op {op!r}; allowed: {allowed}")
        node = k // 2
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < node + 2:
            raise GenotypeError(
                f"genotype.{name}[{k}]: input {idx!r} is not an earlier node of node {node} (allowed 0..{node + 1})"
            )
    for c in concat:
        if not isinstance(c, int) or isinstance(c, bool) or not 2 <= c < nodes + 2:
            raise GenotypeError(f"genotype.{name}_concat: {c!r} is not an intermediate node (2..{nodes + 1})")
    if not concat or len(set(concat)) != len(concat):
        raise GenotypeError(f"genotype.{name}_concat: {list(concat)} must name distinct nodes, at least one")


@dataclass(frozen=True)
class Genotype:
    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        for field in ("normal", "reduce"):
            object.__setattr__(self, field, tuple(tuple(e) if isinstance(e, list) else e for e in getattr(self, field)))
        for field in ("normal_concat", "reduce_concat"):
            object.__setattr__(self, field, tuple(getattr(self, field)))

    @property
    def nodes(self) -> int:
        return len(self.normal) // 2

    def validate(self, ops: tuple[str, ...] = PRIMITIVES) -> Genotype:
        _check_cell("normal", self.normal, self.normal_concat, ops)
        _check_cell("reduce", self.reduce, self.reduce_concat, ops)
        if len(self.normal) != len(self.reduce):
            raise GenotypeError("genotype: normal and reduce cells must have the same number of nodes")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def to_json(self) -> str:
        """Pretty JSON with one key per line (edges stay on that line)."""
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in self.to_dict().items()]
        return "{\n" + ",\n".join(lines) + "\n}"

    @classmethod
    def from_dict(cls, d: Any, ops: tuple[str, ...] = PRIMITIVES) -> Genotype:
        if not isinstance(d, dict):
            raise GenotypeError(f"genotype: expected a JSON object, got {type(d).__name__}")
        keys = {"normal", "normal_concat", "reduce", "reduce_concat"}
        missing, extra = keys - d.keys(), d.keys() - keys
        if missing or extra:
            raise GenotypeError(
                f"genotype: keys must be exactly {sorted(keys)} (missing {sorted(missing)}, unknown {sorted(extra)})"
            )
        for k in ("normal", "reduce"):
            if not isinstance(d[k], list):
                raise GenotypeError(f"genotype.{k}: expected a list of [op, input] pairs")
            if not isinstance(d[f"{k}_concat"], list):
                raise GenotypeError(f"genotype.{k}_concat: expected a list of node numbers")
        g = cls(
            normal=tuple(tuple(e) if isinstance(e, list) else e for e in d["normal"]),
            normal_concat=tuple(d["normal_concat"]),
            reduce=tuple(tuple(e) if isinstance(e, list) else e for e in d["reduce"]),
            reduce_concat=tuple(d["reduce_concat"]),
        )
        return g.validate(ops)

    @classmethod
    def from_json(cls, text: str, ops: tuple[str, ...] = PRIMITIVES) -> Genotype:
        """The Genotype in `text`, a JSON object with exactly the keys normal, normal_concat,
        reduce, reduce_concat (as to_json writes it), validated against `ops`.
        Raises GenotypeError (a ValueError) naming the field for invalid JSON, missing or unknown
        keys, unknown ops ('none' included) and inputs that are not earlier nodes."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"genotype: not valid JSON ({e})") from None
        return cls.from_dict(d, ops)

    def __str__(self) -> str:
        def cell(edges: tuple[Edge, ...]) -> str:
            return " | ".join(f"n{k // 2}<-{op}({i})" for k, (op, i) in enumerate(edges))

        return f"normal: {cell(self.normal)}\nreduce: {cell(self.reduce)}"
