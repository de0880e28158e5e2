"""Building the Dockerfile without a Docker engine or a registry: buildah with chroot isolation.

No registry is reachable here, so `FROM debian:bookworm` is satisfied by a minimal bookworm rootfs
made with mmdebstrap and imported (`podman import`) under the names a short-name lookup finds
with `--pull=never`. The container storage lives under build/cache/docker/ (vfs driver: no
overlay mounts needed), apart from the host's own, and is reused between runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from image.core.errors import ImageError
from image.core.run import run

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BASE_NAMES = ("docker.io/library/debian:bookworm", "localhost/debian:bookworm")
DEFAULT_TAG = "localhost/failback-livecd:latest"
MIRROR = "http://deb.debian.org/debian"
# Fixed, so the base tarball is the same bytes for the same packages.
BASE_EPOCH = "1700000000"


@dataclass(frozen=True)
class ContainerStore:
    """Where buildah/podman keep images for us (not /var/lib/containers)."""

    root: Path  # build/cache/docker

    @property
    def base_tarball(self) -> Path:
        return self.root / "debian-bookworm-minbase.tar"

    @property
    def flags(self) -> list[str]:
        return ["--root", str(self.root / "storage"), "--runroot", str(self.root / "run"), "--storage-driver", "vfs"]


def default_store() -> ContainerStore:
    return ContainerStore(REPO / "build" / "cache" / "docker")


def make_base_tarball(store: ContainerStore, mirror: str = MIRROR) -> Path:
    """A minbase bookworm rootfs tarball (what Docker Hub's debian:bookworm is), made once."""
    if store.base_tarball.is_file():
        return store.base_tarball
    store.root.mkdir(parents=True, exist_ok=True)
    tmp = store.base_tarball.with_suffix(".tmp.tar")
    run(["mmdebstrap", "--variant=minbase", "--components=main", "--include=ca-certificates",
         "bookworm", str(tmp), mirror], env={"SOURCE_DATE_EPOCH": BASE_EPOCH})  # fmt: skip
    tmp.replace(store.base_tarball)
    return store.base_tarball


def image_exists(store: ContainerStore, name: str) -> bool:
    return run(["podman", *store.flags, "image", "exists", name], check=False).returncode == 0


def import_base(store: ContainerStore) -> None:
    """Make `debian:bookworm` resolvable without a registry (no-op when it already is)."""
    if all(image_exists(store, n) for n in BASE_NAMES):
        return
    tar = make_base_tarball(store)
    run(["podman", *store.flags, "import", "--change", 'CMD ["bash"]', str(tar), BASE_NAMES[0]])
    run(["podman", *store.flags, "tag", BASE_NAMES[0], BASE_NAMES[1]])


def host_ca_bundle() -> Path | None:
    """The CA bundle this host tells pip to use (PIP_CERT / pip.conf `cert`), when it has one: behind a
    TLS-inspecting proxy the build's pip must trust the same CAs as the host's."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    return None


def ca_mount_args(store: ContainerStore, ca_bundle: Path | None) -> list[str]:
    """buildah volumes that make the RUN steps' pip trust `ca_bundle`. Volumes are not committed:
    the image itself keeps Debian's CAs only."""
    if ca_bundle is None:
        return []
    store.root.mkdir(parents=True, exist_ok=True)
    pip_conf = store.root / "pip-build.conf"
    pip_conf.write_text("[global]\ncert = /run/build-ca/ca-bundle.crt\n")
    return ["--volume", f"{ca_bundle}:/run/build-ca/ca-bundle.crt:ro", "--volume", f"{pip_conf}:/etc/pip.conf:ro"]


class DockerError(ImageError, ValueError):
    """A bad option of `inv docker` (e.g. an unknown engine)."""


def build_image(
    store: ContainerStore, tag: str = DEFAULT_TAG, context: Path = REPO, ca_bundle: Path | None = None
) -> dict[str, object]:
    """Build the Dockerfile with buildah (chroot isolation, no pulls); returns the image's OCI config."""
    for tool in ("buildah", "podman", "mmdebstrap"):
        if not shutil.which(tool):
            raise FileNotFoundError(f"{tool} is missing: run ./install-deps.sh")
    import_base(store)
    run(["buildah", *store.flags, "bud", "--isolation", "chroot", "--pull=never", "--layers",
         *ca_mount_args(store, ca_bundle), "-f", str(context / "Dockerfile"), "-t", tag, str(context)])  # fmt: skip
    return image_config(store, tag)


def image_config(store: ContainerStore, tag: str) -> dict[str, object]:
    out = run(["buildah", *store.flags, "inspect", "--type", "image", tag], capture=True).stdout
    return json.loads(out)["OCIv1"]["config"]


class Container:
    """A working container of an image (buildah from/run/rm), for checks inside the image."""

    def __init__(self, store: ContainerStore, image: str) -> None:
        self.store = store
        self.image = image
        self.name = ""

    def __enter__(self) -> Container:
        self.name = run(["buildah", *self.store.flags, "from", "--pull=never", self.image], capture=True).stdout.strip()
        return self

    def __exit__(self, *exc: object) -> None:
        run(["buildah", *self.store.flags, "rm", self.name], check=False)

    def run(self, *cmd: str, check: bool = True, options: Sequence[str] = ()) -> str:
        return run(["buildah", *self.store.flags, "run", "--isolation", "chroot", *options, self.name, "--", *cmd],
                   capture=True, check=check).stdout  # fmt: skip


# What `docker run --privileged` gives the build and buildah's chroot isolation does not by default:
# mmdebstrap (root mode) mounts /proc and /sys in the rootfs it makes and creates device nodes; the
# client stage unshares a mount namespace. (--cap-add ALL is refused here: the host's own bounding
# set lacks some capabilities.)
BUILD_CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_MKNOD")
BUILD_VOLUME = "/src/build"  # the Dockerfile's VOLUME


def build_inside(
    store: ContainerStore, image: str, build_dir: Path, ca_bundle: Path | None = None, task: Sequence[str] = ("build",)
) -> str:
    """Run `inv <task>` (the image's default command) in a working container of `image`, with the
    host's `build_dir` as the image's /src/build volume, as `docker run --privileged -v ...` would.
    Returns the task's output; the products land in `build_dir`."""
    build_dir.mkdir(parents=True, exist_ok=True)
    options = [f"--cap-add={c}" for c in BUILD_CAPABILITIES]
    options += ["--volume", f"{build_dir.resolve()}:{BUILD_VOLUME}", *ca_mount_args(store, ca_bundle)]
    with Container(store, image) as ctr:
        # buildah run mounts a fresh anonymous volume over every VOLUME of the image, on top of a
        # --volume for the same path: drop the declaration in this working container (not the image).
        run(["buildah", *store.flags, "config", "--volume", f"{BUILD_VOLUME}-", ctr.name])
        return ctr.run(".venv/bin/inv", *task, options=options)


def build(
    tag: str = DEFAULT_TAG,
    engine: str | None = None,
    store: ContainerStore | None = None,
    ca_bundle: Path | None = None,
) -> str:
    """Build the Dockerfile with `engine` ("docker" or "buildah"; default: docker when installed).
    Returns how to run the result."""
    engine = engine or ("docker" if shutil.which("docker") else "buildah")
    if engine == "docker":
        run(["docker", "build", "-t", tag, str(REPO)])
        return f'docker run --privileged -v "$PWD/build:/src/build" {tag}'
    if engine != "buildah":
        raise DockerError(f"engine {engine!r}: use docker or buildah")
    store = store or default_store()
    build_image(store, tag, ca_bundle=ca_bundle)
    return f'podman {" ".join(store.flags)} run --privileged -v "$PWD/build:/src/build" {tag}'
