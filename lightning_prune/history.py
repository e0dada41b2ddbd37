"""The sparsity/metric history: one row per pruning event and per validation run.

Rows are plain dicts of numbers and strings so that they go into a checkpoint as they are and come
back on resume; ``pruning/curve.csv`` is the same rows, one metric per column.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from lightning_prune.files import write_atomically

#: Columns every row has, before the metric columns.
BASE_COLUMNS = ("step", "epoch", "source", "sparsity", "target_sparsity")
#: ``source`` of a row: a pruning event, or a validation run paired with the sparsity at that moment.
EVENT, VALIDATION = "event", "validation"


class PruningHistory:
    """Sparsity (counted from the weights), target sparsity and monitored metrics against the step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        *,
        step: int,
        epoch: int,
        source: str,
        sparsity: float,
        target_sparsity: float,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Append one row and return it."""
        if source not in (EVENT, VALIDATION):
            raise ValueError(f"source={source!r} must be {EVENT!r} or {VALIDATION!r}")
        row = {
            "step": int(step),
            "epoch": int(epoch),
            "source": source,
            "sparsity": float(sparsity),
            "target_sparsity": float(target_sparsity),
            "metrics": {name: float(value) for name, value in (metrics or {}).items()},
        }
        self.rows.append(row)
        return row

    @property
    def metric_names(self) -> list[str]:
        """Every metric that appears in some row, in order of first appearance."""
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(row["metrics"]))
        return list(names)

    def to_csv_text(self) -> str:
        """The rows as CSV: the base columns, then one column per metric (empty where not measured)."""
        names = self.metric_names
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*BASE_COLUMNS, *names])
        for row in self.rows:
            base = [row[column] for column in BASE_COLUMNS]
            writer.writerow(base + [row["metrics"].get(name, "") for name in names])
        return buffer.getvalue()

    def to_csv(self, path: str) -> None:
        """Write :meth:`to_csv_text` to ``path`` atomically."""
        write_atomically(path, self.to_csv_text())

    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(row, metrics=dict(row["metrics"])) for row in self.rows]

    def load_state_dict(self, rows: list[dict[str, Any]]) -> None:
        self.rows = []
        for row in rows:
            self.add(**row)
