#!/bin/sh
# Installs everything the build and the tests need, on Debian 12, as root.
# Shared by the README set-up, .ci/run and the Dockerfile: keep it the only place
# that installs packages. Idempotent: a second run only checks.
set -eu
cd "$(dirname "$0")"

APT_PACKAGES="
  mmdebstrap squashfs-tools zstd xz-utils
  isolinux syslinux-common dosfstools mtools gdisk fdisk
  ovmf qemu-system-x86 qemu-utils
  python3 python3-venv python3-pip python3-dev gcc
  git ca-certificates openssl e2fsprogs util-linux cpio busybox-static
  shellcheck systemd buildah podman uidmap
  ntfs-3g python3-hivex libhivex-bin libwin-hivex-perl reglookup
"

missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "install-deps: installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $missing
fi

# The development virtual environment uses Debian's python3 (the same minor
# version as the one inside the LiveCD).
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv "$VENV"
fi
stamp="$VENV/.deps-$(cat requirements-dev.txt pyproject.toml client/pyproject.toml controlplane/pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e ./client
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e ./controlplane
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e ./client/replicator -e ./agent
  # image/ (the builder) as a package too: tasks.py and the tests import it without sys.path edits.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
  rm -f "$VENV"/.deps-*
  touch "$stamp"
fi
# The real AWS CLI, for the test that drives the local DRS control plane with it
# (tests/test_controlplane_awscli.py). awscli pins its own botocore, newer than requirements-dev.txt's,
# so it gets its own environment.
AWSCLI_VENV=.venv-awscli
AWSCLI_VERSION=1.46.2
if [ "$("$AWSCLI_VENV/bin/pip" show awscli 2>/dev/null | sed -n 's/^Version: //p')" != "$AWSCLI_VERSION" ]; then
  [ -x "$AWSCLI_VENV/bin/pip" ] || /usr/bin/python3 -m venv "$AWSCLI_VENV"
  "$AWSCLI_VENV/bin/pip" install -q --disable-pip-version-check "awscli==$AWSCLI_VERSION"
fi
echo "install-deps: ready ($VENV/bin/inv --list shows the tasks)"
