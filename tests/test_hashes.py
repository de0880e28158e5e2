"""image/stages/hashes.py: streamed sha512, `<artifact>.sha512` (bare hex) and a SHA512SUMS sha512sum accepts."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from image.stages.hashes import sha512_file, write_hashes


def test_sha512_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 12345)  # several read chunks and a partial one
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha512_file(path) == hashlib.sha512(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha512_file(empty) == hashlib.sha512(b"").hexdigest()


def test_write_hashes_formats_and_sha512sum_accepts_them(tmp_path: Path) -> None:
    iso = tmp_path / "aws-failback-livecd-64bit.iso"
    iso.write_bytes(os.urandom(100_000))
    single, sums = write_hashes(iso)
    digest = hashlib.sha512(iso.read_bytes()).hexdigest()
    assert single == tmp_path / "aws-failback-livecd-64bit.iso.sha512"
    assert single.read_text() == digest + "\n"  # bare lower-case hex, like the hashes bucket
    assert sums == tmp_path / "SHA512SUMS"
    assert sums.read_text() == f"{digest}  aws-failback-livecd-64bit.iso\n"
    ok = subprocess.run(["sha512sum", "-c", "--strict", "SHA512SUMS"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "aws-failback-livecd-64bit.iso: OK" in ok.stdout

    # A changed artifact fails the real checker (the check can fail), and re-hashing fixes it.
    with iso.open("r+b") as f:
        f.write(b"X")
    bad = subprocess.run(["sha512sum", "-c", "SHA512SUMS"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "FAILED" in bad.stdout
    write_hashes(iso)
    assert subprocess.run(["sha512sum", "-c", "SHA512SUMS"], cwd=tmp_path, capture_output=True).returncode == 0


def test_sums_keep_other_existing_artifacts(tmp_path: Path) -> None:
    a, b = tmp_path / "a.iso", tmp_path / "b.iso"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    write_hashes(a)
    write_hashes(b)
    write_hashes(a)  # again: replaces its own line, keeps b's
    lines = (tmp_path / "SHA512SUMS").read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["a.iso", "b.iso"]
    assert (
        subprocess.run(["sha512sum", "-c", "--strict", "SHA512SUMS"], cwd=tmp_path, capture_output=True).returncode == 0
    )
    b.unlink()
    write_hashes(a)  # a vanished artifact's line is dropped
    assert (tmp_path / "SHA512SUMS").read_text().count("\n") == 1


def test_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build the ISO first"):
        write_hashes(tmp_path / "nope.iso")


def test_sha512_of_a_prefix_and_a_short_file(tmp_path: Path) -> None:
    """Disk images are compared over the source volume's size; a target shorter than that is an error."""
    data = bytes(range(256)) * 9000  # > 2 chunks
    f = tmp_path / "disk.img"
    f.write_bytes(data)
    assert sha512_file(f) == hashlib.sha512(data).hexdigest()
    assert sha512_file(f, 1_500_001) == hashlib.sha512(data[:1_500_001]).hexdigest()
    with pytest.raises(ValueError, match="ended 1 bytes before"):
        sha512_file(f, len(data) + 1)
