"""The checksums that recognise input files already in an export database."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from trap_dask.checksums import SHA256, XXH3, bytes_checksum, file_checksum, kind_for, kind_of


@pytest.fixture
def some_file(tmp_path):
    path = tmp_path / "image.fits"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 9 << 20, dtype=np.uint8).tobytes())  # > 2 chunks
    return path


def test_a_file_read_in_chunks_has_the_checksum_of_its_bytes(some_file):
    raw = np.fromfile(some_file, dtype=np.uint8)
    for kind in (XXH3, SHA256):
        assert file_checksum(str(some_file), kind) == bytes_checksum(raw, kind) == bytes_checksum(raw.tobytes(), kind)
    assert file_checksum(str(some_file)) == bytes_checksum(raw)  # XXH3 by default


def test_the_kinds_as_written(some_file):
    data = some_file.read_bytes()
    new, old = bytes_checksum(data), bytes_checksum(data, SHA256)
    assert new.startswith("xxh3:") and len(new) == 5 + 32 and int(new[5:], 16) >= 0
    assert old == hashlib.sha256(data).hexdigest()  # what databases before schema 9 hold
    assert (kind_of(new), kind_of(old)) == (XXH3, SHA256)
    assert bytes_checksum(data[:-1]) != new  # one byte less: another checksum
    with pytest.raises(ValueError, match="unknown checksum kind"):
        bytes_checksum(data, "md5")


def test_a_database_keeps_the_kind_it_holds(some_file):
    data = some_file.read_bytes()
    assert kind_for([]) == XXH3  # a new database, or one whose files were all unreadable
    assert kind_for([bytes_checksum(data)]) == XXH3
    assert kind_for([bytes_checksum(data, SHA256)]) == SHA256
    assert kind_for([bytes_checksum(data), bytes_checksum(data, SHA256)]) == SHA256
