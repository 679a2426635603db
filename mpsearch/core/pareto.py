"""ParetoFront: the non-dominated (cost, damage) points of a table, with the plan behind each point."""

from __future__ import annotations

import pandas as pd

from mpsearch.core.errors import MpsearchError
from mpsearch.core.plan import BitPlan


class ParetoFront:
    """``frame``: one row per point, columns ``plan_id``, the cost axes (e.g. ``avg_bits``, ``size_bytes``)
    and ``damage`` (predicted), sorted by the first axis; ``plans[plan_id]`` is the point's BitPlan."""

    def __init__(self, frame: pd.DataFrame, plans: list[BitPlan], axes: list[str], meta: dict | None = None) -> None:
        self.frame = frame.reset_index(drop=True)
        self.plans = plans
        self.axes = axes
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.frame)

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def plan_at(self, **limits: float) -> BitPlan:
        """The least-damage plan whose costs are within ``limits`` (e.g. ``plan_at(size_bytes=2e6)``)."""
        unknown = [k for k in limits if k not in self.axes]
        if unknown or not limits:
            raise MpsearchError(
                f"plan_at needs limits on {self.axes}, got {sorted(limits)}", f"pass one of {self.axes}"
            )
        ok = pd.Series(True, index=self.frame.index)
        for axis, value in limits.items():
            ok &= self.frame[axis] <= value
        if not ok.any():
            smallest = {a: float(self.frame[a].min()) for a in limits}
            raise MpsearchError(f"no point of the front is within {limits}", f"the smallest costs are {smallest}")
        row = self.frame[ok].sort_values("damage").iloc[0]
        return self.plans[int(row["plan_id"])]

    def plot(self, ax=None, axis: str | None = None, label: str | None = None, uniform: dict | None = None, **kw):
        """Predicted damage vs one cost axis; ``uniform`` ({option: (cost, damage)}) marks uniform plans.
        Returns the Axes; never calls ``show``."""
        import matplotlib.pyplot as plt

        axis = axis or self.axes[0]
        if uniform is None and "uniform" in self.meta:
            uniform = {name: tuple(v) for name, v in self.meta["uniform"].items()}
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        ax.step(
            self.frame[axis], self.frame["damage"], where="post", label=label or self.meta.get("label", "front"), **kw
        )
        ax.scatter(self.frame[axis], self.frame["damage"], s=6)
        for name, (cost, damage) in (uniform or {}).items():
            ax.scatter([cost], [damage], marker="x", color="black", zorder=3)
            ax.annotate(name, (cost, damage), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(axis)
        ax.set_ylabel("predicted damage")
        ax.set_yscale("log" if (self.frame["damage"] > 0).all() else "linear")
        ax.legend()
        return ax

    def __repr__(self) -> str:
        return f"ParetoFront(points={len(self)}, axes={self.axes})"
