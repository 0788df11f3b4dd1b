"""What a local worker process runs as it starts (Dask's ``preload``): the modules of the
per-image work, imported with the garbage collector off, then frozen out of its collections.

Importing them (distributed, astropy, scipy among them) makes hundreds of thousands of objects,
none of them garbage. With the collector on, its passes walked them during the import and at
every full collection after, the last one as the process exits: for two worker processes on
2048^2 surveys, 0.15 CPU-s as they started and 0.24 as they ended (benchmarks/RESULTS.md,
issue 15 round 25).
``trap-dask run`` does the same in its own process (``pipeline._imports_frozen``).
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterable

#: The modules a worker's first tasks need (the writer's, sqlalchemy among them, only where the
#: writer goes: its worker imports them while the first images are extracted).
MODULES = ("trap_dask.tasks", "trap_dask.route")


def import_frozen(modules: Iterable[str]) -> None:
    """Import ``modules`` without garbage collection, then freeze every object the process holds
    (``gc.freeze``: left out of later collections); the collector is on again after if it was."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


def dask_setup(worker: object) -> None:
    """Dask's preload hook, called once in each worker process as it starts."""
    import_frozen(MODULES)
