"""Publish benchmark (slow): 200 MiB to 1 region and to the 28 commercial regions on loopback.

Prints the wall times side by side with their ratio (target: 28 regions <= 3x one region), next
to the raw floor (the fewest boto3 calls leaving the same objects) and the CPU seconds of the
publisher and of the S3 server. No timed assertion: only that every publish completed and
verified, and that the figures measure what they claim.
"""

from __future__ import annotations

import pytest

from image.bench_publish import run_benchmark


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
