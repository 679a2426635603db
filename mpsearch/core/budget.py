"""Budget: one or more cost constraints (all must hold) plus tie groups."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mpsearch.core.errors import MpsearchError

_UNITS = {"avg_bits": "avg bits", "size_bytes": "bytes", "bops": "BOPs", "latency": "latency units"}


@dataclass(frozen=True)
class Constraint:
    """sum over layers of ``row_cost[chosen option]`` <= ``limit`` (avg_bits is scaled to bit counts)."""

    name: str
    limit: float
    row_cost: np.ndarray  # one value per table row
    scale: float = 1.0  # reported value = sum / scale (total params for avg_bits)

    def report(self, total: float) -> float:
        return total / self.scale


@dataclass(frozen=True)
class Budget:
    """Constraints a plan must meet. Any combination may be given; at least one is required.

    - ``avg_bits``: parameter-weighted mean effective bits per weight (scales included)
    - ``size_bytes``: total bytes of the quantized layers' weights (scales included)
    - ``bops``: total bit operations (MACs x weight bits x 16-bit activations)
    - ``latency``: total of the table column ``latency_column`` (a per-layer latency table you measured)
    - ``ties``: groups of layer FQNs that must share one option (added to the table's own ties)
    """

    avg_bits: float | None = None
    size_bytes: float | None = None
    bops: float | None = None
    latency: float | None = None
    latency_column: str = "latency"
    ties: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        limits = self.limits()
        if not limits:
            raise MpsearchError("budget has no constraint", "set avg_bits, size_bytes, bops or latency")
        for name, value in limits.items():
            if not np.isfinite(value) or value <= 0:
                raise MpsearchError(f"budget {name}={value} is not a positive number", f"give {name} > 0")
        object.__setattr__(self, "ties", tuple(tuple(g) for g in self.ties))

    def limits(self) -> dict[str, float]:
        names = ("avg_bits", "size_bytes", "bops", "latency")
        return {n: float(getattr(self, n)) for n in names if getattr(self, n) is not None}

    def constraints(self, frame: pd.DataFrame, total_params: float | None = None) -> list[Constraint]:
        """Per-row costs of each constraint for a cost-table frame (``total_params``: the table's, when known)."""
        out = []
        for name, limit in self.limits().items():
            if name == "avg_bits":
                total = float(total_params or frame.drop_duplicates("layer")["n_params"].sum())
                cost = (frame["bits"] * frame["n_params"]).to_numpy(float)
                out.append(Constraint(name, limit * total, cost, scale=total))
                continue
            column = self.latency_column if name == "latency" else name
            if column not in frame.columns:
                raise MpsearchError(f"budget {name} needs table column {column!r}", f"add {column!r} to the table")
            cost = frame[column].to_numpy(float)
            if np.isnan(cost).any():
                layer = frame.loc[int(np.argmax(np.isnan(cost))), "layer"]
                raise MpsearchError(
                    f"budget {name} needs {column} for every layer but {layer!r} has none",
                    "pass example inputs to layer discovery so MACs are known" if name == "bops" else None,
                )
            out.append(Constraint(name, limit, cost))
        return out

    @staticmethod
    def unit(name: str) -> str:
        return _UNITS[name]

    def to_dict(self) -> dict:
        return {**self.limits(), "ties": [list(g) for g in self.ties]}
