"""trap-dask: a radio transients pipeline on Dask with a TraP-compatible export database."""

__version__ = "0.1.0"
