"""The replication software bundle: reproducible, hashed, and runnable straight from the tarball."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from drs_agent.testing import Pki, make_image, replicator_config, start_agent

from image.release.assets import TARBALL, AssetsError, build_assets, fetch_wheels, locked_pins
from image.stages.hashes import sha512_file

SO = "failback_assets/lib/blake3/blake3.cpython-311-x86_64-linux-gnu.so"

EPOCH = 1_700_000_000


@pytest.fixture()
def epoch(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
    return EPOCH


def test_bundle_is_reproducible(tmp_path: Path, epoch: int) -> None:
    a = build_assets(tmp_path / "a")
    # A fresh checkout has other file mtimes: touch the sources, build again elsewhere.
    for py in (Path(__file__).parents[1] / "client/replicator/failback_replicator").glob("*.py"):
        os.utime(py, (time.time(), time.time()))
    b = build_assets(tmp_path / "b")
    assert a.sha512 == b.sha512
    assert a.tarball.read_bytes() == b.tarball.read_bytes()
    assert a.sha512 == hashlib.sha512(a.tarball.read_bytes()).hexdigest()
    assert a.sha512_file.read_text().split() == [a.sha512]  # bare hex, as the hashes bucket holds it


def test_bundle_layout_and_metadata(tmp_path: Path, epoch: int) -> None:
    assets = build_assets(tmp_path)
    assert assets.tarball.name == TARBALL
    assert json.loads(assets.manifest.read_text()) == {"installerVersion": assets.version}
    raw = assets.tarball.read_bytes()
    assert raw[4:8] == b"\0\0\0\0", "gzip header carries a timestamp"
    with tarfile.open(assets.tarball) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert "failback_assets/bin/failback-replicator" in names
    assert "failback_assets/lib/failback_replicator/engine.py" in names
    assert "failback_assets/PROTOCOL.md" in names
    # The pinned blake3 wheel, unpacked for the LiveCD's CPython 3.11 (no installation there).
    assert {SO, "failback_assets/lib/blake3/__init__.py", "failback_assets/requirements.lock"} <= set(names)
    assert "failback_assets/lib/blake3-1.0.11.dist-info/METADATA" in names
    assert {m.mode for m in members if m.name.startswith("failback_assets/lib/") and m.isfile()} == {0o644}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "root", "root", EPOCH)}
    launcher = next(m for m in members if m.name.endswith("bin/failback-replicator"))
    assert launcher.mode == 0o755
    objects = {(bucket, key) for bucket, key, _ in assets.bucket_objects("eu-west-1")}
    assert objects == {
        ("aws-elastic-disaster-recovery-eu-west-1", f"{assets.version}/failback_assets/{TARBALL}"),
        ("aws-elastic-disaster-recovery-hashes-eu-west-1", f"{assets.version}/failback_assets/{TARBALL}.sha512"),
        ("aws-elastic-disaster-recovery-eu-west-1", "latest/manifest.json"),
    }


def test_unpacked_bundle_replicates_with_system_python(tmp_path: Path, epoch: int) -> None:
    """What the client does after the download: unpack, write the configuration, start, steer."""
    assets = build_assets(tmp_path / "out")
    with tarfile.open(assets.tarball) as tar:
        tar.extractall(tmp_path / "opt")
    launcher = tmp_path / "opt/failback_assets/bin/failback-replicator"

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run([launcher, "--config", bad], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "missing setting" in proc.stderr

    pki = Pki.create(tmp_path / "pki")
    size = 8 * 1024 * 1024
    src = make_image(tmp_path / "source.img", size, seed=21)
    tgt = tmp_path / "target.img"
    with open(tgt, "wb") as f:
        f.truncate(size)
    with start_agent(pki, {"/dev/xvda": src}) as agent:
        cfg = replicator_config(pki, agent.port, {"/dev/xvda": tgt}, tmp_path / "state", rescan=False)
        (tmp_path / "replicator.json").write_text(cfg.to_json())
        (tmp_path / "command").write_text("FINAL_SYNC\n")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = "/usr/bin:/bin"  # Debian's python3, as on the LiveCD: not the dev venv
        proc = subprocess.run(
            [launcher, "--config", tmp_path / "replicator.json", "--command-file", tmp_path / "command",
             "--status-file", tmp_path / "status.json", "--progress-interval", "0"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Final sync completed" in proc.stdout
        # Debian's python3 has no blake3: the bundle's own copy was used.
        assert "protocol version 2, block digest blake3" in proc.stderr, proc.stderr[-2000:]
        assert sha512_file(tgt) == sha512_file(src)
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["completed"] is True and status["dataReplicationState"] == "CONTINUOUS"
        assert status["initiationSteps"]["ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION"] == "SUCCEEDED"
        assert status["replicatedDisks"][0]["replicatedStorageBytes"] == size

        # A broken native library (a bad unpack, a noexec mount...) costs speed, not the failback.
        (tmp_path / "opt" / SO).write_bytes(b"\x7fELF not really")
        tgt2 = tmp_path / "target2.img"
        with open(tgt2, "wb") as f:
            f.truncate(size)
        cfg = replicator_config(pki, agent.port, {"/dev/xvda": tgt2}, tmp_path / "state2", rescan=False)
        (tmp_path / "replicator.json").write_text(cfg.to_json())
        proc = subprocess.run(
            [launcher, "--config", tmp_path / "replicator.json", "--command-file", tmp_path / "command",
             "--status-file", tmp_path / "status.json", "--progress-interval", "0"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sha512_file(tgt2) == sha512_file(src)
    assert "protocol version 2, block digest sha256" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "blake3 unavailable" in line]) == 1, proc.stderr


@pytest.mark.network  # pip download from PyPI (once; then from build/cache/replicator-wheels)
def test_pinned_wheels_are_hash_checked(tmp_path: Path) -> None:
    """The bundle is never built from a wheel that is not the pinned one: a tampered cache and an
    unfetchable pin both stop the build with a message that says what to do."""
    wheels = fetch_wheels()  # the real lock (downloaded once into build/cache/replicator-wheels)
    assert [w.name for w in wheels] == ["blake3-1.0.11-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"]
    lock = Path(__file__).parents[1] / "client/replicator/requirements.lock"
    assert hashlib.sha256(wheels[0].read_bytes()).hexdigest() in locked_pins(lock)["blake3==1.0.11"]
    # A cached wheel that changed since it was fetched.
    cache = tmp_path / "cache"
    house = cache / hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    house.mkdir(parents=True)
    (house / ".complete").touch()
    (house / wheels[0].name).write_bytes(wheels[0].read_bytes() + b"\0")
    with pytest.raises(AssetsError, match="matches no hash"):
        fetch_wheels(lock, cache)
    # A pin whose hash PyPI's wheel does not have: pip refuses it, the build stops.
    bad = tmp_path / "requirements.lock"
    bad.write_text("blake3==1.0.11 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(AssetsError, match="cannot fetch the wheels the replication bundle needs"):
        fetch_wheels(bad, cache)
    assert not list(cache.glob("*.partial"))
    bad.write_text("blake3==1.0.11\n")
    with pytest.raises(AssetsError, match="no --hash"):
        fetch_wheels(bad, cache)
