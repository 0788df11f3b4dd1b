"""Checksums of input files: how a run recognises an image already in its export database.

A checksum is written as ``xxh3:`` and the 32 hex digits of the file's 128-bit XXH3 hash (about
7x faster than sha256 here: 2 against 14 ms for a 2048^2 image). Databases written before it hold
the bare 64 hex digits of the file's sha256; a run appending to one of those goes on with sha256,
so that one database never holds both kinds and its files are recognised whichever run read them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import xxhash

XXH3 = "xxh3"  #: the XXH3 128-bit hash, written with its prefix
SHA256 = "sha256"  #: the bare hex sha256 of the databases written before
_PREFIX = f"{XXH3}:"
_CHUNK = 1 << 22  #: bytes read at a time (B)


def _hasher(kind: str):
    if kind == XXH3:
        return xxhash.xxh3_128()
    if kind == SHA256:
        return hashlib.sha256()
    raise ValueError(f"unknown checksum kind {kind!r}")


def _written(kind: str, hex_digest: str) -> str:
    return f"{_PREFIX}{hex_digest}" if kind == XXH3 else hex_digest


def bytes_checksum(data, kind: str = XXH3) -> str:
    """The checksum of a file already read (its bytes: ``bytes`` or a uint8 array)."""
    hasher = _hasher(kind)
    hasher.update(data)
    return _written(kind, hasher.hexdigest())


def file_checksum(path: str, kind: str = XXH3) -> str:
    """The checksum of the file at ``path``, read in chunks (OSError if it cannot be read)."""
    hasher = _hasher(kind)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            hasher.update(chunk)
    return _written(kind, hasher.hexdigest())


def kind_of(checksum: str) -> str:
    """The kind of a checksum as written (XXH3 or SHA256)."""
    return XXH3 if checksum.startswith(_PREFIX) else SHA256


def kind_for(stored: Iterable[str]) -> str:
    """The kind a run writes and compares into a database holding the checksums ``stored``: sha256
    where it holds any of that kind (a database written before XXH3), else XXH3."""
    return SHA256 if any(kind_of(checksum) == SHA256 for checksum in stored) else XXH3
