"""BitPlan: FQN -> option, with provenance. JSON round trip is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mpsearch.core.errors import InvalidOptionError, InvalidPlanError
from mpsearch.core.options import parse_option

PLAN_SCHEMA_VERSION = 1


class BitPlan:
    """A per-layer assignment of quantization options, keyed by fully-qualified module name."""

    def __init__(self, assignments: dict[str, str], provenance: dict | None = None) -> None:
        if not isinstance(assignments, dict) or not assignments:
            raise InvalidPlanError("plan has no layers", "a plan maps at least one layer FQN to an option")
        for layer, option in assignments.items():
            if not isinstance(layer, str) or not layer:
                raise InvalidPlanError(f"plan key {layer!r} is not a layer name", "keys are module FQNs")
            try:
                parse_option(option)
            except InvalidOptionError as exc:
                raise InvalidPlanError(f"plan entry {layer!r}: {exc.what}", exc.fix) from None
        self.assignments = dict(assignments)
        self.provenance = dict(provenance or {})

    def __getitem__(self, layer: str) -> str:
        return self.assignments[layer]

    def __iter__(self):
        return iter(self.assignments)

    def __len__(self) -> int:
        return len(self.assignments)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BitPlan) and self.assignments == other.assignments and self.provenance == other.provenance
        )

    def items(self):
        return self.assignments.items()

    def check_layers(self, layers: list[str], what: str = "the model", require_all: bool = True) -> None:
        """Raise naming the first plan layer not in ``layers``, or (``require_all``) the first layer missing."""
        known = set(layers)
        for name in self.assignments:
            if name not in known:
                raise InvalidPlanError(
                    f"plan layer {name!r} is not a quantizable layer of {what}",
                    "use a plan made for this model (mpsearch search --model ...)",
                )
        for name in layers if require_all else ():
            if name not in self.assignments:
                raise InvalidPlanError(f"plan has no option for layer {name!r} of {what}", "give every layer one")

    # ------------------------------------------------------------------ frames and JSON
    def to_frame(self, table=None) -> pd.DataFrame:
        """One row per layer; joined with a CostTable's rows for the realized costs when given."""
        df = pd.DataFrame({"layer": list(self.assignments), "option": list(self.assignments.values())})
        if table is None:
            return df
        self.check_layers(table.layers, "the cost table")
        return df.merge(table.frame, on=["layer", "option"], how="left", validate="one_to_one")

    def to_dict(self) -> dict:
        return {"schema_version": PLAN_SCHEMA_VERSION, "plan": self.assignments, "provenance": self.provenance}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> BitPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidPlanError(
                f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                "regenerate it with mpsearch search --out",
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("plan"), dict):
            raise InvalidPlanError(f"{source} has no 'plan' object", "regenerate it with mpsearch search --out")
        version = data.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            raise InvalidPlanError(
                f"{source} has schema_version {version!r}, expected {PLAN_SCHEMA_VERSION}", "regenerate the plan"
            )
        return cls(data["plan"], data.get("provenance") or {})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        path = Path(path)
        if not path.is_file():
            raise InvalidPlanError(f"plan file {path} does not exist", "check the path")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidPlanError(
                f"plan file {path} is not UTF-8 text (not a plan JSON)",
                "pass the JSON written by mpsearch search --out",
            ) from None
        return cls.from_json(text, source=f"plan file {path}")

    def __repr__(self) -> str:
        counts = pd.Series(list(self.assignments.values())).value_counts().to_dict()
        return f"BitPlan(layers={len(self)}, options={counts})"
