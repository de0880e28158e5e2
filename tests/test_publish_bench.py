"""Publish benchmark (slow): 200 MiB to 1 region and to the 28 commercial regions on loopback.

Prints the two wall times side by side with their ratio (target: 28 regions <= 3x one region).
No timed assertion: only that both publishes completed and verified.
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
    # the artifact left this host once per run; everything else was copied inside S3
    assert result.one.sent_mib < 201 and result.many.sent_mib < 201
    assert result.many.copied_mib >= 27 * 200
