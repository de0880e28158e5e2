"""Replication benchmark (slow): prints figures next to baselines from the same run.

Speed targets are reported, not asserted; what is asserted is correctness (digests, inside the
benchmark), what was sent, and the memory budget of a 1 GiB LiveCD.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from image.bench.replication import MiB, count_zero_blocks, filesystem_image, run_benchmark


@pytest.mark.slow
def test_replication_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_benchmark(256 * MiB)
    with capsys.disabled():
        print("\n" + result.report())
    assert result.delta_blocks_sent == len(range(0, result.delta_blocks_total, 100))
    # Both ends in the dev venv have blake3: protocol version 2 negotiates it (SHA-256 ran beside it).
    assert (result.protocol_version, result.digest) == (2, "blake3") and result.sha256_full_sync_s > 0
    assert 0 <= result.resume_extra_blocks <= 2 * result.resume_checkpoint_blocks
    # Memory is a bound, not a speed: VmHWM of the replicator process (the 3.3 GiB one CI run reported
    # was ru_maxrss inheriting the big pytest parent's peak; tests/test_replication_memory.py).
    assert result.replicator_peak_rss_kib < 128 * 1024, f"replicator peak RSS {result.replicator_peak_rss_kib} KiB"


@pytest.mark.slow
def test_replication_benchmark_on_a_filesystem_volume(capsys: pytest.CaptureFixture[str]) -> None:
    """A server's disk: ext4 half full of files. Its free space (zero blocks) goes as no data."""
    result = run_benchmark(256 * MiB, volume="filesystem")
    with capsys.disabled():
        print("\n" + result.report())
    assert result.file_bytes >= 64 * MiB and result.zero_blocks >= 64
    data_blocks = result.size_bytes // MiB - result.zero_blocks
    assert result.wire_bytes <= data_blocks * (MiB + 64) + 256 * 1024, "zero blocks carried data"
    assert result.delta_blocks_sent == len(range(0, result.delta_blocks_total, 100))
    assert result.replicator_peak_rss_kib < 128 * 1024


def test_filesystem_volume_is_an_ext4_image_half_full(tmp_path: Path) -> None:
    from image.core.run import run

    img, used = filesystem_image(tmp_path / "vol.img", 32 * MiB, tmp_path / "files")
    assert 12 * MiB <= used <= 16 * MiB and not (tmp_path / "files").exists()
    run(["e2fsck", "-fn", img], capture=True)
    assert 8 <= count_zero_blocks(img, MiB) < 32
