"""Publish benchmark (slow): 200 MiB to 1 region and to the 28 commercial regions on loopback.

Prints the wall times side by side with their ratio (target: 28 regions <= 3x one region), next
to the raw floor (the fewest boto3 calls leaving the same objects) and the CPU seconds of the
publisher and of the S3 server. No timed assertion: only that every publish completed and
verified, and that the figures measure what they claim.
"""

from __future__ import annotations

import pytest

from image.bench.publish import run_benchmark


@pytest.mark.slow
def test_publish_benchmark_1_vs_28_regions(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_benchmark(size_mib=200, regions=28)
    with capsys.disabled():
        print("\n" + result.render())
    assert result.one.ok and result.many.ok
    assert result.one.regions == 1 and result.many.regions == 28
    assert result.floor_one.regions == 1 and result.floor_many.regions == 28
    # the artifact left this host once per run; everything else was copied inside S3
    assert result.one.sent_mib < 201 and result.many.sent_mib < 201
    assert result.many.copied_mib >= 55 * 200
    # the S3 server (its own process) did the copying, measured apart from the publisher
    assert result.many.server_cpu > result.one.server_cpu > 0
    assert result.floor_many.server_cpu > 0 and result.many.client_cpu > 0
    # the test server's storage is printed with the figures (memory unless the RAM is missing)
    assert result.storage.startswith("moto key buffer: ") and result.storage in result.render()
    assert ("in memory" in result.storage) == (result.storage_name == "memory")


def test_moto_storage_memory_disk_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from image.bench import publish as bp

    monkeypatch.setattr(bp, "_mem_available", lambda: 64 * 2**30)
    mem = bp.moto_storage("memory", 200, 28)
    assert mem.name == "memory" and int(mem.env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"]) > 200 * bp.MiB
    line = mem.describe(int(mem.env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"]))
    assert line.startswith("moto key buffer: in memory (MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=210763776")
    assert "MALLOC_ARENA_MAX=1" in line and "57 objects" in line
    assert bp.moto_storage("disk", 200, 28).env == {}
    # without the RAM for 57 objects of 200 MiB it stays on disk, and says so
    monkeypatch.setattr(bp, "_mem_available", lambda: 4 * 2**30)
    low = bp.moto_storage("memory", 200, 28)
    assert low.name == "disk" and low.env == {} and "stayed on disk" in low.describe(5241856)
    with pytest.raises(ValueError, match="bad moto storage 'ram'"):
        bp.moto_storage("ram", 200, 28)


def test_moto_process_runs_with_the_storage_asked() -> None:
    """The server reports the key buffer moto itself reads, and the parent's environment is untouched."""
    from image.bench import publish as bp

    storage = bp.MotoStorage("memory", {"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(9 * bp.MiB), "MALLOC_ARENA_MAX": "1"})
    before = dict(bp.os.environ)
    with bp.MotoProcess(storage) as server:
        assert server.key_buffer == 9 * bp.MiB
        assert dict(bp.os.environ) == before
    with bp.MotoProcess() as server:
        assert server.key_buffer == 5 * bp.MiB - 1024  # moto's default: spool to disk past 5 MiB
