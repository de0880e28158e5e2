"""The Dockerfile builds, without a Docker engine or an image registry (image/release/docker.py).

buildah builds it with `--isolation chroot`; `FROM debian:bookworm` is a minimal bookworm rootfs
made here with mmdebstrap and imported with `podman import`, found with `--pull=never`. The base
tarball and the container storage are cached under build/cache/docker/, so only the first run
makes the base. A second slow test runs the ISO build inside the built image (what
`docker run --privileged -v "$PWD/build:/src/build"` does) and compares its ISO with the host's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from image.release import docker

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
    assert store.flags == ["--root", f"{tmp_path}/storage", "--runroot", f"{tmp_path}/run", "--storage-driver", "vfs"]
    assert store.base_tarball == tmp_path / "debian-bookworm-minbase.tar"
    assert docker.ca_mount_args(store, None) == []
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    assert docker.ca_mount_args(store, ca) == [
        "--volume",
        f"{ca}:/run/build-ca/ca-bundle.crt:ro",
        "--volume",
        f"{tmp_path}/pip-build.conf:/etc/pip.conf:ro",
    ]
    assert (tmp_path / "pip-build.conf").read_text() == "[global]\ncert = /run/build-ca/ca-bundle.crt\n"


@pytest.fixture(scope="module")
def built_image() -> tuple[docker.ContainerStore, dict[str, object]]:
    """The Dockerfile built once for this module (buildah reuses its cached layers when it can)."""
    store = docker.default_store()
    # This workplace's egress inspects TLS: the build's pip trusts the host's CA bundle (not kept in the image).
    return store, docker.build_image(store, TAG, ca_bundle=docker.host_ca_bundle())


@pytest.mark.slow
@pytest.mark.root
def test_dockerfile_builds_with_buildah(built_image) -> None:
    store, config = built_image
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


@pytest.mark.slow
@pytest.mark.root
def test_iso_builds_inside_the_image(built_image, built_pipeline) -> None:
    """The image's default command (`inv build`) makes the same ISO as the host build, byte for byte."""
    store, _ = built_image
    out_dir = REPO / "build" / "docker-run"
    shutil.rmtree(out_dir, ignore_errors=True)
    # Cold build, but with the host's downloads (.debs, wheels): inputs, not products.
    for cache in ("apt", "wheels"):
        if (built_pipeline.paths.cache / cache).is_dir():
            shutil.copytree(built_pipeline.paths.cache / cache, out_dir / "cache" / cache, symlinks=True)
    try:
        docker.build_inside(store, TAG, out_dir, ca_bundle=docker.host_ca_bundle())
        iso = out_dir / "out" / built_pipeline.artifact.name
        assert iso.is_file(), f"no ISO in {out_dir / 'out'}"
        subprocess.run(["sha512sum", "--quiet", "-c", "SHA512SUMS"], cwd=iso.parent, check=True)
        inside = (iso.parent / f"{iso.name}.sha512").read_text().strip()
        host = built_pipeline.artifact.with_name(f"{iso.name}.sha512").read_text().strip()
        assert inside == host, "the container's ISO differs from the host's (same tree, same inputs)"
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
