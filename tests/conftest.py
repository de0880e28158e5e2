"""Shared pytest set-up.

- Plain `pytest` runs the fast unit tests only; tests marked slow, boot or e2e run with
  `--run-slow` (what `inv test` passes) or FAILBACK_RUN_SLOW=1. Tests marked network (they reach
  the Debian mirror or another network service) run with --run-slow too, or alone with
  `--run-network`, so the fast suite runs offline. Tests marked root are skipped when not running as root.
- tests/controlplane_fixture.py's fixtures are registered for every module (pytest_plugins).
- `built_iso` (session scope) runs the default incremental build once per session — a no-op
  when build/ is already up to date — and gives the ISO's path; `built_pipeline` gives the
  pipeline itself (paths of the layers, manifest, keys).
- The session fails when its tests left a mount, loop device or daemon behind (tests/leakcheck.py).
- Ctrl-C reaches the programs the tests start, however the suite was started (below).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

from tests.leakcheck import pytest_sessionfinish, pytest_sessionstart  # noqa: E402,F401  (hooks, by name)

SLOW_MARKERS = ("slow", "boot", "e2e")

# A shell without job control starts `cmd &` with SIGINT ignored (POSIX), an ignored signal stays
# ignored across exec, and Python then installs no KeyboardInterrupt handler: every client a test
# spawns would shrug off the ^C it is sent. A caught signal is reset to the default on exec, so
# catching it here gives the children the disposition a terminal (or systemd) gives them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Fixtures every test module may use without importing them: the local DRS control plane
# (drs_controlplane, drs_controlplane_factory) and the client stack (moto, assets, s3, stack_factory).
pytest_plugins = ["tests.controlplane_fixture"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow, boot, e2e or network (full builds, QEMU boots, the mirror)",
    )
    parser.addoption(
        "--run-network",
        action="store_true",
        default=False,
        help="also run the tests marked network (they reach the Debian mirror or another network service)",
    )


def run_slow(config: pytest.Config) -> bool:
    return bool(config.getoption("--run-slow")) or os.environ.get("FAILBACK_RUN_SLOW") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow_ok = run_slow(config)
    network_ok = slow_ok or bool(config.getoption("--run-network"))
    is_root = os.geteuid() == 0
    skip_slow = pytest.mark.skip(reason="slow/boot/e2e test: run with --run-slow (inv test) or FAILBACK_RUN_SLOW=1")
    skip_network = pytest.mark.skip(reason="reaches the network: run with --run-network or --run-slow (inv test)")
    skip_root = pytest.mark.skip(reason="needs root")
    for item in items:
        if not slow_ok and any(item.get_closest_marker(m) for m in SLOW_MARKERS):
            item.add_marker(skip_slow)
        elif not network_ok and item.get_closest_marker("network"):
            item.add_marker(skip_network)
        if not is_root and item.get_closest_marker("root"):
            item.add_marker(skip_root)


@pytest.fixture(scope="session")
def built_pipeline():
    """The default build (image/image.yaml into build/), brought up to date once per session."""
    from image.stages.pipeline import Pipeline

    if os.geteuid() != 0:
        pytest.skip("the image build needs root (mmdebstrap, chroot, mounts)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
    pipe = Pipeline.from_files()
    pipe.build()
    logging.getLogger("tests").info("built_iso:\n%s", pipe.report.format())
    return pipe


@pytest.fixture(scope="session")
def built_iso(built_pipeline) -> Path:
    """Path of the ISO of the default build (built once per session if out of date)."""
    return built_pipeline.artifact
