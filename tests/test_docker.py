"""The Dockerfile builds, without a Docker engine or an image registry (image/docker.py).

buildah builds it with `--isolation chroot`; `FROM debian:bookworm` is a minimal bookworm rootfs
made here with mmdebstrap and imported with `podman import`, found with `--pull=never`. The base
tarball and the container storage are cached under build/cache/docker/, so only the first run
makes the base. Set FAILBACK_DOCKER_RUN_BUILD=1 to also try the ISO build inside the image.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from image import docker

REPO = Path(__file__).resolve().parent.parent
TAG = "localhost/failback-livecd:test"


def test_dockerfile_uses_the_shared_install_script() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "FROM debian:bookworm"
    assert any(ln.startswith("RUN ./install-deps.sh") for ln in lines)
    assert 'ENTRYPOINT [".venv/bin/inv"]' in lines and 'CMD ["build"]' in lines
    assert 'docker run --privileged -v "$PWD/build:/src/build" failback-livecd' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "build" in ignored and ".venv" in ignored
    assert ".git" not in ignored  # source_date_epoch: git needs the history


def test_store_keeps_its_own_storage(tmp_path: Path) -> None:
    store = docker.ContainerStore(tmp_path)
    assert store.flags == ["--root", f"{tmp_path}/storage", "--runroot", f"{tmp_path}/run",
                           "--storage-driver", "vfs"]
    assert store.base_tarball == tmp_path / "debian-bookworm-minbase.tar"
    assert docker.ca_mount_args(store, None) == []
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    assert docker.ca_mount_args(store, ca) == ["--volume", f"{ca}:/run/build-ca/ca-bundle.crt:ro",
                                               "--volume", f"{tmp_path}/pip-build.conf:/etc/pip.conf:ro"]
    assert (tmp_path / "pip-build.conf").read_text() == "[global]\ncert = /run/build-ca/ca-bundle.crt\n"


@pytest.mark.slow
@pytest.mark.root
def test_dockerfile_builds_with_buildah() -> None:
    store = docker.default_store()
    # This workplace's egress inspects TLS: the build's pip trusts the host's CA bundle (not kept in the image).
    config = docker.build_image(store, TAG, ca_bundle=docker.host_ca_bundle())
    assert config["Entrypoint"] == [".venv/bin/inv"]
    assert config["Cmd"] == ["build"]
    assert config["WorkingDir"] == "/src"
    # The image holds a working build environment: the tasks, the build tools, no host build/.
    with docker.Container(store, TAG) as ctr:
        assert "build" in ctr.run(".venv/bin/inv", "--list")
        for tool in ("mmdebstrap", "mksquashfs", "mkfs.vfat", "mcopy", "qemu-system-x86_64", "shellcheck"):
            assert ctr.run("sh", "-c", f"command -v {tool} || true").strip(), f"{tool} is not in the image"
        assert ctr.run(".venv/bin/python", "-c", "import pycdlib, jinja2, yaml, invoke; print('ok')").strip() == "ok"
        assert not ctr.run("sh", "-c", "ls -A /src/build 2>/dev/null || true").strip(), "build/ leaked in"
        if os.environ.get("FAILBACK_DOCKER_RUN_BUILD") == "1":
            ctr.run(".venv/bin/inv", "build")
            assert ctr.run("sh", "-c", "ls /src/build/out/*.iso").strip()
