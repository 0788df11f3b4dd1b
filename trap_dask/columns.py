"""Columnar tables held as a dict of equal-length numpy arrays, one per column name.

The running catalogue, the writer's staged rows and the export database's writes all pass rows
this way (no per-row Python objects); these are the few operations they share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: Column name -> values, every array of the same length (one entry per row).
Columns = Mapping[str, np.ndarray]


def take(columns: Columns, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The ``rows`` (indices or a boolean mask) of every column."""
    return {name: values[rows] for name, values in columns.items()}


def concat(parts: Sequence[Columns]) -> dict[str, np.ndarray]:
    """Parts with the same columns, one after the other (the first part's column order); at
    least one part."""
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
