"""Stage 1: the base root filesystem (mmdebstrap, minbase), its package manifest, kernel and initrd.

The base is cached under a key over everything that determines it (suite, mirrors, components,
packages, path excludes, SOURCE_DATE_EPOCH, mmdebstrap's version and this module's code), so
an unchanged definition is never rebuilt. Downloaded .debs are kept in build/cache/apt (or a
shared directory) so a second cold build need not download again; they are inputs, not products.
"""

from __future__ import annotations

import logging
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from image.core.mounts import clear_leftovers, release
from image.core.paths import REPO, BuildPaths, code_digest, digest
from image.core.run import run
from image.stages import templating
from image.stages.config import ImageConfig, apt_sources

log = logging.getLogger("image.stages.rootfs")

# This stage's code and the templates of its initramfs set-up files: editing them changes the key.
# This stage's code and data; the image modules it imports (config, templating, core) join by themselves.
CODE = ("image/stages/rootfs.py", "image/stages/templates/initramfs-*")
BASE_HOSTNAME = "localhost"
BASE_FILES_HOOK = (
    f'rm -f "$1"/etc/hostname "$1"/etc/.resolv.conf.systemd-resolved.bak'
    f' && echo {BASE_HOSTNAME} > "$1"/etc/hostname && chmod 0644 "$1"/etc/hostname'
)
MEDIUM_WAIT_S = 60  # boot=failback looks this long for the medium (failback.wait= overrides it)
# Needed only while bootstrapping (usrmerge converts the tree, and pulls in perl): ~45 MB less.
BOOTSTRAP_ONLY = (
    "usrmerge",
    "libfile-find-rule-perl",
    "libnumber-compare-perl",
    "libtext-glob-perl",
    "perl",
    "perl-modules-5.36",
    "libperl5.36",
)


def mmdebstrap_version() -> str:
    return run(["mmdebstrap", "--version"], capture=True).stdout.strip()


@dataclass(frozen=True)
class SetupFile:
    """A file put into the rootfs before its packages are installed (so their scripts see it)."""

    path: str  # absolute path inside the rootfs
    text: str
    mode: int


def initramfs_setup_files(cfg: ImageConfig) -> tuple[SetupFile, ...]:
    """initramfs-tools settings from the image definition's `initramfs` section. They must exist
    before linux-image-* is installed, so the one initrd its postinst generates is already the
    small one. None of them is a conffile of initramfs-tools (dpkg would ask about those)."""
    env = templating.environment()
    values = {
        "source": f"image/{cfg.path.name}",
        "initramfs": cfg.initramfs,
        "label": cfg.iso.volume_label,
        "wait": MEDIUM_WAIT_S,
    }
    files = [
        SetupFile(
            "/etc/initramfs-tools/conf.d/failback.conf",
            env.get_template("initramfs-failback.conf.j2").render(values),
            0o644,
        )
    ]
    if cfg.initramfs.modules or cfg.initramfs.drop:
        files.append(
            SetupFile(
                "/etc/initramfs-tools/hooks/failback", env.get_template("initramfs-hook.j2").render(values), 0o755
            )
        )
    # The boot script for boot=failback in the kernel command line: finds the medium, stacks the layers.
    files.append(
        SetupFile("/etc/initramfs-tools/scripts/failback", env.get_template("initramfs-boot.j2").render(values), 0o644)
    )
    if cfg.initramfs.keep_code:
        # initramfs-tools copies /etc/initramfs-tools/scripts/* into every initrd it builds.
        files.append(
            SetupFile(
                "/etc/initramfs-tools/scripts/init-bottom/failback-keep-code",
                env.get_template("initramfs-keep-code.j2").render(values),
                0o755,
            )
        )
    return tuple(files)


def rootfs_key(cfg: ImageConfig, epoch: int, tool_version: str, repo: Path = REPO) -> str:
    """Cache key of the base: changes whenever any input of mmdebstrap changes."""
    return digest(
        "rootfs",
        code_digest(*CODE, repo=repo),
        cfg.debian,
        apt_sources(cfg),  # the lines mmdebstrap gets, as config.py writes them (its code is in no key)
        cfg.packages,
        cfg.exclude_paths,
        cfg.include_paths,
        initramfs_setup_files(cfg),
        cfg.mask_units,
        cfg.mask_generators,
        epoch,
        tool_version,
    )


def write_setup_files(files: tuple[SetupFile, ...], staging: Path) -> list[tuple[Path, SetupFile]]:
    """Write `files` under `staging` (fresh) for mmdebstrap to upload; (host path, file) pairs."""
    if staging.exists():
        shutil.rmtree(staging)
    out = []
    for i, f in enumerate(files):
        host = staging / f"{i:02d}-{Path(f.path).name}"
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_text(f.text)
        host.chmod(f.mode)
        out.append((host, f))
    return out


def setup_hooks(staged: Sequence[tuple[Path, SetupFile]]) -> list[str]:
    """mmdebstrap --essential-hook options that put the staged files in place (after the essential
    packages, before the package list is installed)."""
    if not staged:
        return []
    dirs = sorted({str(Path(f.path).parent) for _, f in staged})
    hooks = ["--essential-hook=mkdir -p " + " ".join(f'"$1"{shlex.quote(d)}' for d in dirs)]
    for host, f in staged:
        hooks.append(f"--essential-hook=upload {shlex.quote(str(host))} {shlex.quote(f.path)}")
        hooks.append(f'--essential-hook=chmod {f.mode:o} "$1"{shlex.quote(f.path)}')
    return hooks


def mask_hooks(units: Sequence[str], generators: Sequence[str] = ()) -> list[str]:
    """Mask `units` the way `systemctl mask` does (a link to /dev/null in /etc/systemd/system), and
    `generators` the way systemd.generator(7) says (a link to /dev/null in /etc/systemd/system-generators):
    each unit or generator a live system starts costs a process start under emulation and on slow firmware."""
    hooks = []
    for directory, names in (("system", units), ("system-generators", generators)):
        if names:
            links = " ".join(f'"$1"/etc/systemd/{directory}/{shlex.quote(n)}' for n in names)
            hooks.append(
                f'--customize-hook=mkdir -p "$1"/etc/systemd/{directory} && for l in '
                + links
                + '; do ln -sfn /dev/null "$l"; done'
            )
    return hooks


def mmdebstrap_command(
    cfg: ImageConfig, target: Path, apt_cache: Path, staged: Sequence[tuple[Path, SetupFile]] = ()
) -> list[str]:
    d = cfg.debian
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        f"--architectures={d.architecture}",
        f"--components={','.join(d.components)}",
        # usr-is-merged stands in for usrmerge (purged below) in init-system-helpers' dependency.
        f"--include={','.join((*cfg.packages, 'usr-is-merged'))}",
        '--aptopt=APT::Install-Recommends "false"',
        '--aptopt=Acquire::Retries "3"',
    ]
    if "snapshot.debian.org" in d.mirror or "snapshot.debian.org" in d.security_mirror:
        # Snapshot Release files are old on purpose.
        cmd.append('--aptopt=Acquire::Check-Valid-Until "false"')
    # Excludes first, then the includes that re-include exceptions (dpkg: last match wins).
    cmd += [f"--dpkgopt=path-exclude={p}" for p in cfg.exclude_paths]
    cmd += [f"--dpkgopt=path-include={p}" for p in cfg.include_paths]
    q = shlex.quote(str(apt_cache))
    cmd += [
        # Reuse and refill the .deb cache: keep the downloads in the chroot until the end,
        # copy them out, then delete them from the rootfs.
        "--skip=download/empty",
        "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
        f"--setup-hook=sync-in {q} /var/cache/apt/archives/",
        *setup_hooks(staged),
        f"--customize-hook=sync-out /var/cache/apt/archives {q}",
        '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
        '--customize-hook=chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get purge -q -y --no-download '
        "--autoremove " + " ".join(BOOTSTRAP_ONLY),
        # An empty machine-id: systemd makes a transient one at each boot (no two servers share it).
        '--customize-hook=rm -f "$1"/var/lib/dbus/machine-id; : > "$1"/etc/machine-id',
        # mmdebstrap copies the build machine's /etc/hostname in (its content AND mode), and
        # systemd-resolved's postinst keeps a backup of the build machine's resolv.conf: the base would
        # differ from one build host (or container) to the next. The overlay sets the image's hostname.
        f"--customize-hook={BASE_FILES_HOOK}",
        *mask_hooks(cfg.mask_units, cfg.mask_generators),
        d.suite,
        str(target),
        *apt_sources(cfg),
    ]
    return cmd


def build_rootfs(cfg: ImageConfig, paths: BuildPaths, epoch: int) -> None:
    """Create paths.rootfs from scratch (the caller decides whether it is needed)."""
    apt_cache = paths.apt_cache
    apt_cache.mkdir(parents=True, exist_ok=True)
    tmp = paths.rootfs.with_name("rootfs.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)  # mmdebstrap wants the parent to exist
    for p in (tmp, paths.rootfs):
        clear_leftovers(p)  # a failed run's tree may still have mmdebstrap's /proc mounted in it
    log.info("rootfs: mmdebstrap %s with %d packages (a few minutes)...", cfg.debian.suite, len(cfg.packages))
    staged = write_setup_files(initramfs_setup_files(cfg), paths.cache / "rootfs-setup")
    try:
        run(mmdebstrap_command(cfg, tmp, apt_cache, staged), env={"SOURCE_DATE_EPOCH": str(epoch)})
    except BaseException:
        release(tmp)  # e.g. "W: umount /proc failed": nothing stays mounted; the tree goes at the next start
        raise
    tmp.rename(paths.rootfs)
    write_manifest(paths.rootfs, paths.manifest)
    extract_boot_files(paths.rootfs, paths.kernel, paths.initrd)


def write_manifest(rootfs: Path, dest: Path) -> None:
    """Exact versions of every installed package, one `name<TAB>version<TAB>arch` a line, sorted."""
    out = run(
        [
            "dpkg-query",
            f"--admindir={rootfs / 'var/lib/dpkg'}",
            "-W",
            "-f=${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n",
        ],
        capture=True,
    ).stdout
    lines = sorted(line.split("\t", 1)[1] for line in out.splitlines() if line.startswith("ii "))
    if not lines:
        raise RuntimeError(f"rootfs: no installed packages found in {rootfs}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(lines) + "\n")


def extract_boot_files(rootfs: Path, kernel: Path, initrd: Path) -> None:
    """Copy the (single) kernel and its initrd out of rootfs/boot for the ISO."""
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(
            f"rootfs: expected exactly one kernel in {rootfs / 'boot'}, found "
            f"{[k.name for k in kernels]}; list one linux-image package in the image definition"
        )
    version = kernels[0].name.removeprefix("vmlinuz-")
    init = rootfs / "boot" / f"initrd.img-{version}"
    if not init.is_file():
        raise RuntimeError(f"rootfs: {init} is missing: the kernel's initramfs was not generated")
    kernel.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernels[0], kernel)
    shutil.copyfile(init, initrd)
    (kernel.parent / "kernel-version").write_text(version + "\n")
