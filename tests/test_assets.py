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
from drs_agent.testing import Pki, make_image, replicator_config, sha512_file, start_agent

from image.assets import TARBALL, build_assets

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
    assert sha512_file(tgt) == sha512_file(src)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["completed"] is True and status["dataReplicationState"] == "CONTINUOUS"
    assert status["initiationSteps"]["ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION"] == "SUCCEEDED"
    assert status["replicatedDisks"][0]["replicatedStorageBytes"] == size
