"""CostTable: the long-format (layer x option) cost/benefit table every estimator produces."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mpsearch.core.errors import InvalidOptionError, InvalidTableError
from mpsearch.core.options import Option, parse_option

SCHEMA_VERSION = 1
REQUIRED_COLUMNS = ("layer", "option", "bits", "n_params", "size_bytes", "bops", "damage")
COST_COLUMNS = ("bits", "n_params", "size_bytes", "bops")
ACTIVATION_BITS = 16  # activations stay in half precision: BOPs = MACs * weight bits * 16


@dataclass(frozen=True)
class LayerInfo:
    """A unit of the plan: one quantizable weight tensor.

    ``name``: the FQN of the module that owns the weight (the plan's key); ``shape``: the weight's logical
    shape with output channels first (a transformers ``Conv1D`` stores [in, out]: ``transposed``);
    ``kind``: the module kind; ``macs``: per sample (None if unknown); ``aliases``: other modules that share
    this very tensor (a tied ``lm_head``/``embed_tokens``): quantizing the unit quantizes them too, and the
    tensor is counted once in every budget.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    macs: int | None = None
    aliases: tuple[str, ...] = ()
    transposed: bool = False

    @property
    def n_params(self) -> int:
        return math.prod(self.shape)


def cost_rows(layers: list[LayerInfo], options: list[Option]) -> pd.DataFrame:
    """The estimator-independent columns of a table: one row per (layer, option) with its costs, layer by
    layer in the given order. Built column-wise (a million layers take about a second)."""
    n_opts = len(options)
    out_ch = np.array([layer.shape[0] for layer in layers], dtype=np.int64)
    numel = np.array([layer.n_params for layer in layers], dtype=np.int64)
    macs = np.array([layer.macs or np.nan for layer in layers], dtype=float)  # 0 or None: unknown
    row = numel // np.maximum(out_ch, 1)
    storage = np.stack([opt.storage_bits_for(out_ch, row) for opt in options], axis=1).astype(float)
    bits = np.array([opt.bits for opt in options], dtype=float)
    fits = np.stack([np.broadcast_to(opt.fits_row(row), row.shape) for opt in options], axis=1)
    if not fits.all():  # a runtime that cannot store a layer's rows in an option: no row for that pair
        stuck = np.flatnonzero(~fits.any(axis=1))
        if len(stuck):
            layer = layers[int(stuck[0])]
            raise InvalidOptionError(
                f"layer {layer.name!r} (rows of {int(row[stuck[0]])} weights) fits none of the options "
                f"{[o.name for o in options]}",
                "add an option whose block or group size divides the row (e.g. a 32-block type: q8_0, q5_0, "
                "q4_0), or exclude the layer",
            )
    frame = pd.DataFrame(
        {
            "layer": np.repeat(np.array([layer.name for layer in layers], dtype=object), n_opts),
            "option": np.tile(np.array([opt.name for opt in options], dtype=object), len(layers)),
            "bits": (storage / numel[:, None]).ravel(),
            "n_params": np.repeat(numel, n_opts),
            "size_bytes": np.ceil(storage / 8).ravel(),
            "bops": (macs[:, None] * bits[None, :] * ACTIVATION_BITS).ravel(),
        }
    )
    return frame if fits.all() else frame[fits.ravel()].reset_index(drop=True)


VOLATILE_META = ("estimate_s",)  # a fact of the run that computed it, not of the table's content


class CostTable:
    """Validated wrapper around a long DataFrame with one row per (layer, option).

    Columns: ``layer`` (FQN), ``option``, ``bits`` (effective bits per weight incl. scales), ``n_params``,
    ``size_bytes``, ``bops`` (NaN where MACs are unknown), ``damage`` (estimated loss increase, lower is
    better), optionally ``damage_std`` and the estimator's raw columns. ``meta`` holds provenance:
    estimator name and parameters, seed, model and data fingerprints, versions, schema version, and
    ``ties`` (groups of layers that must share one option).

    The frame's rows are read-only once the table is built: validation factorizes the layer and option
    columns once (``layer_codes``, ``option_codes``) and solvers build on those codes.
    """

    def __init__(self, frame: pd.DataFrame, meta: dict | None = None) -> None:
        self.frame = frame.reset_index(drop=True)
        self.meta = {"schema_version": SCHEMA_VERSION, "ties": [], **(meta or {})}
        self._validate()

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        df = self.frame
        missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
        if missing:
            raise InvalidTableError(f"cost table lacks columns {missing}", f"provide {list(REQUIRED_COLUMNS)}")
        if df.empty:
            raise InvalidTableError("cost table has no rows", "estimate at least one layer and option")
        layer_codes, layer_names = pd.factorize(df["layer"], sort=False)  # first-appearance order
        option_codes, option_names = pd.factorize(df["option"], sort=False)
        if (layer_codes < 0).any() or (option_codes < 0).any():
            raise InvalidTableError("cost table has rows without a layer or option", "name every row's both")
        key = layer_codes.astype(np.int64) * len(option_names) + option_codes
        dup = pd.Series(key).duplicated().to_numpy()
        if dup.any():
            row = df.iloc[int(np.argmax(dup))]
            raise InvalidTableError(
                f"duplicate row for layer {row['layer']!r} option {row['option']!r}",
                "keep one row per (layer, option)",
            )
        for opt in option_names:
            parse_option(opt)
        self.layer_codes, self.option_codes = layer_codes, option_codes
        self._layers, self._options = list(layer_names), list(option_names)
        if df["damage"].isna().any():
            layer = df.loc[df["damage"].isna().idxmax(), "layer"]
            raise InvalidTableError(f"damage is NaN for layer {layer!r}", "fix the estimator output")
        for col in COST_COLUMNS:
            values = df[col].to_numpy(dtype=float)
            bad = values < 0
            if col != "bops" and np.isnan(values).any():
                raise InvalidTableError(f"column {col!r} has NaN", "every cost except bops must be known")
            if np.any(bad):
                layer = df.loc[int(np.argmax(bad)), "layer"]
                raise InvalidTableError(f"negative {col} for layer {layer!r}", "costs must be >= 0")
        known = set(self._layers)
        for group in self.meta["ties"]:
            unknown = [name for name in group if name not in known]
            if unknown:
                raise InvalidTableError(f"tie group names unknown layers {unknown}", "tie only table layers")

    # ---------------------------------------------------------------- accessors
    @property
    def layers(self) -> list[str]:
        """Layer FQNs in first-appearance order."""
        return list(self._layers)

    @property
    def options(self) -> list[str]:
        """Option names in first-appearance order."""
        return list(self._options)

    def options_for(self, layer: str) -> list[str]:
        return self.frame.loc[self.frame["layer"] == layer, "option"].tolist()

    def total_params(self) -> int:
        first = np.unique(self.layer_codes, return_index=True)[1]
        return int(self.frame["n_params"].to_numpy()[first].sum())

    def uniform_options(self) -> list[str]:
        """The options every layer can take (a runtime may not store some layers in some options)."""
        counts = np.bincount(self.option_codes, minlength=len(self._options))
        return [o for o, c in zip(self._options, counts) if c == len(self._layers)]

    def uniform_cost(self, option: str, column: str = "bits") -> float:
        """Cost of giving every layer ``option``: parameter-weighted mean for ``bits``, else the sum."""
        rows = self.frame[self.frame["option"] == option]
        if len(rows) != len(self.layers):
            raise InvalidTableError(f"option {option!r} is not available for every layer", "pick another option")
        if column == "bits":
            return float((rows["bits"] * rows["n_params"]).sum() / rows["n_params"].sum())
        return float(rows[column].sum())

    def fingerprint(self) -> str:
        """Content hash of the table (rows and estimator metadata; not how long it took)."""
        h = hashlib.sha256(pd.util.hash_pandas_object(self.frame, index=False).values.tobytes())
        meta = {k: v for k, v in self.meta.items() if k not in VOLATILE_META}
        h.update(json.dumps(meta, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    # ---------------------------------------------------------------- I/O
    def to_parquet(self, path: str | Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(self.frame, preserve_index=False)
        meta = {**(arrow.schema.metadata or {}), b"mpsearch": json.dumps(self.meta, sort_keys=True).encode()}
        pq.write_table(arrow.replace_schema_metadata(meta), str(path))

    @classmethod
    def from_parquet(cls, path: str | Path) -> CostTable:
        import pyarrow.parquet as pq

        try:
            arrow = pq.read_table(str(path))
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise InvalidTableError(f"cannot read cost table {path}: {exc}", "re-run the estimator") from exc
        raw = (arrow.schema.metadata or {}).get(b"mpsearch")
        if raw is None:
            raise InvalidTableError(f"{path} is not an mpsearch cost table", "write it with CostTable.to_parquet")
        return cls(arrow.to_pandas(), json.loads(raw))

    def to_csv(self, path: str | Path) -> None:
        self.frame.to_csv(path, index=False)

    def __repr__(self) -> str:
        est = self.meta.get("estimator", "?")
        return f"CostTable(estimator={est!r}, layers={len(self.layers)}, options={self.options})"
