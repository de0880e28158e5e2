"""image/stages/rootfs.py: cache key, mmdebstrap command, manifest, kernel/initrd; the built base (slow)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from image.stages import rootfs
from image.stages.config import DEFAULT_CONFIG, DEFAULT_INITRAMFS, ConfigError, load_config

CFG = load_config(DEFAULT_CONFIG)
KEY = rootfs.rootfs_key(CFG, 1700000000, "mmdebstrap 1.3.5")


@pytest.mark.parametrize(
    "changed",
    [
        replace(CFG, debian=replace(CFG.debian, suite="trixie")),
        replace(CFG, debian=replace(CFG.debian, mirror="http://snapshot.debian.org/archive/debian/20250520T000000Z")),
        replace(CFG, debian=replace(CFG.debian, security_mirror="")),
        replace(CFG, debian=replace(CFG.debian, components=("main",))),
        replace(CFG, packages=(*CFG.packages, "vim-tiny")),
        replace(CFG, packages=tuple(p for p in CFG.packages if p != "less")),
        replace(CFG, exclude_paths=CFG.exclude_paths[1:]),
        replace(CFG, include_paths=()),
        replace(CFG, initramfs=replace(CFG.initramfs, modules=CFG.initramfs.modules[1:])),
        replace(CFG, initramfs=replace(CFG.initramfs, drop=())),
        replace(CFG, initramfs=replace(CFG.initramfs, level=3)),
        replace(CFG, initramfs=DEFAULT_INITRAMFS),
        replace(CFG, mask_units=CFG.mask_units[1:]),
        replace(CFG, mask_generators=CFG.mask_generators[1:]),
    ],
    ids=[
        "suite",
        "mirror",
        "security",
        "components",
        "add-package",
        "drop-package",
        "excludes",
        "includes",
        "initramfs-modules",
        "initramfs-drop",
        "initramfs-level",
        "initramfs-default",
        "mask-units",
        "mask-generators",
    ],
)
def test_key_changes_with_each_input(changed) -> None:
    assert rootfs.rootfs_key(changed, 1700000000, "mmdebstrap 1.3.5") != KEY


def test_key_changes_with_epoch_and_tool_but_not_other_settings() -> None:
    assert rootfs.rootfs_key(CFG, 1700000001, "mmdebstrap 1.3.5") != KEY
    assert rootfs.rootfs_key(CFG, 1700000000, "mmdebstrap 1.4.0") != KEY
    assert rootfs.rootfs_key(CFG, 1700000000, "mmdebstrap 1.3.5") == KEY
    # Boot menu, hostname, compression... belong to later stages: the base stays cached.
    assert (
        rootfs.rootfs_key(replace(CFG, hostname="other", kernel_cmdline="boot=live x"), 1700000000, "mmdebstrap 1.3.5")
        == KEY
    )


def test_mmdebstrap_command(tmp_path: Path) -> None:
    cmd = rootfs.mmdebstrap_command(CFG, tmp_path / "target", tmp_path / "apt cache")
    assert cmd[0] == "mmdebstrap" and "--variant=minbase" in cmd
    [include] = [c for c in cmd if c.startswith("--include=")]
    assert include.removeprefix("--include=").split(",") == [*CFG.packages, "usr-is-merged"]
    purge = next(c for c in cmd if "apt-get purge" in c)
    assert "--no-download" in purge and " usrmerge " in purge and " perl " in purge
    assert "--components=main,non-free-firmware" in cmd
    excludes = [c for c in cmd if c.startswith("--dpkgopt=path-exclude=")]
    includes = [c for c in cmd if c.startswith("--dpkgopt=path-include=")]
    assert len(excludes) == len(CFG.exclude_paths) and len(includes) == len(CFG.include_paths)
    # dpkg applies the last matching filter: the re-includes must come after the excludes.
    assert cmd.index(includes[0]) > cmd.index(excludes[-1])
    assert cmd[-5:] == [
        "bookworm",
        str(tmp_path / "target"),
        "deb http://deb.debian.org/debian bookworm main non-free-firmware",
        "deb http://deb.debian.org/debian bookworm-updates main non-free-firmware",
        "deb http://deb.debian.org/debian-security bookworm-security main non-free-firmware",
    ]
    assert any("sync-in '" + str(tmp_path / "apt cache") + "'" in c for c in cmd), "cache path must be quoted"
    assert not any("Check-Valid-Until" in c for c in cmd)
    assert any("machine-id" in c for c in cmd)
    hook = next(a for a in cmd if "/etc/hostname" in a)
    assert hook.startswith("--customize-hook=rm -f ") and 'echo localhost > "$1"/etc/hostname' in hook, hook
    assert "chmod 0644" in hook and ".resolv.conf.systemd-resolved.bak" in hook, "no build-host file or mode leaks in"


def test_initramfs_files_from_the_definition() -> None:
    files = {f.path: f for f in rootfs.initramfs_setup_files(CFG)}
    conf = files["/etc/initramfs-tools/conf.d/failback.conf"].text
    assert "MODULES=list\n" in conf and "COMPRESS=zstd\n" in conf and f"COMPRESSLEVEL={CFG.initramfs.level}\n" in conf
    hook = files["/etc/initramfs-tools/hooks/failback"]
    assert hook.mode == 0o755 and hook.text.startswith("#!/bin/sh\n")
    added = [line.split()[1] for line in hook.text.splitlines() if line.startswith("manual_add_modules ")]
    assert added == list(CFG.initramfs.modules)
    for needed in ("sr_mod", "isofs", "squashfs", "overlay", "usb_storage", "ahci"):
        assert needed in added, needed
    # Not conffiles of initramfs-tools (dpkg would stop to ask about a pre-existing one), and no
    # module list initramfs-tools would load at boot whether the hardware is there or not.
    assert set(files) == {
        "/etc/initramfs-tools/conf.d/failback.conf",
        "/etc/initramfs-tools/hooks/failback",
        "/etc/initramfs-tools/scripts/init-bottom/failback-keep-code",
        "/etc/initramfs-tools/scripts/failback",
    }
    # The boot script (boot=failback) is sourced by /init, not run: no #!, not executable; it looks for
    # the ISO's label.
    boot = files["/etc/initramfs-tools/scripts/failback"]
    assert boot.mode == 0o644 and not boot.text.startswith("#!")
    assert f'failback_label="{CFG.iso.volume_label}"' in boot.text and "\nmountroot() {\n" in boot.text


def test_keep_code_script_leaves_a_sleeping_busybox_shell(tmp_path: Path) -> None:
    """The init-bottom script returns at once (the boot goes on) and leaves a background shell whose
    mappings keep the initrd's code pages allocated; without keep_code there is no such script."""
    script_file = next(f for f in rootfs.initramfs_setup_files(CFG) if f.path.endswith("/failback-keep-code"))
    assert CFG.initramfs.keep_code and script_file.mode == 0o755
    [(script, _)] = rootfs.write_setup_files((script_file,), tmp_path / "staging")
    subprocess.run(["shellcheck", "-s", "sh", str(script)], check=True)
    assert subprocess.run([str(script), "prereqs"], capture_output=True, text=True, check=True).stdout == "\n"
    # Run it for real under busybox's sh (what the initrd runs it with; its `sleep` applet too): it
    # must return at once while a child keeps sleeping. A marker in the environment finds the children.
    marker = f"KEEP_CODE_TEST={os.getpid()}-{time.monotonic_ns()}"
    busybox = shutil.which("busybox")
    assert busybox, "install-deps.sh installs busybox-static"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sleep").symlink_to(busybox)
    run = subprocess.run(
        [busybox, "sh", str(script)],
        env={"PATH": str(bin_dir), marker.split("=")[0]: marker},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert run.returncode == 0 and run.stdout == run.stderr == ""

    def left_behind() -> list[tuple[int, list[bytes]]]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                    found.append((int(proc.name), (proc / "cmdline").read_bytes().split(b"\0")))
            except OSError:
                continue
        return found

    # The background shell may not have forked its `sleep` yet when the script returns.
    deadline = time.monotonic() + 10
    left = left_behind()
    while [b"sleep", b"86400", b""] not in [c for _, c in left] and time.monotonic() < deadline:
        time.sleep(0.05)
        left = left_behind()
    try:
        assert [b"sleep", b"86400", b""] in [c for _, c in left], left
        assert any(c[:2] == [busybox.encode(), b"sh"] for _, c in left), "the loop's shell was not left behind"
    finally:
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.kill(pid, signal.SIGKILL)
    off = replace(CFG, initramfs=replace(CFG.initramfs, keep_code=False))
    assert not any(f.path.endswith("/failback-keep-code") for f in rootfs.initramfs_setup_files(off))


def test_default_initramfs_is_debians() -> None:
    conf, boot = rootfs.initramfs_setup_files(replace(CFG, initramfs=DEFAULT_INITRAMFS))
    assert "MODULES=most\n" in conf.text and "COMPRESSLEVEL" not in conf.text
    assert boot.path == "/etc/initramfs-tools/scripts/failback"  # whatever the initramfs section says


def _fake_initramfs_tree(root: Path) -> Path:
    """A tree shaped like the one mkinitramfs builds, with modules from three places."""
    kernel = root / "usr/lib/modules/6.1.0-99-amd64/kernel"
    for rel in (
        "drivers/net/ethernet/intel/e1000e.ko",
        "drivers/scsi/sr_mod.ko",
        "fs/squashfs/squashfs.ko",
        "fs/btrfs/btrfs.ko",
    ):
        (kernel / rel).parent.mkdir(parents=True, exist_ok=True)
        (kernel / rel).write_bytes(b"\0")
    (root / "usr/lib/firmware/bnx2x").mkdir(parents=True)
    (root / "usr/lib/firmware/bnx2x/fw.bin").write_bytes(b"\0")
    return kernel


def test_hook_passes_shellcheck_drops_globs_then_adds_modules(tmp_path: Path) -> None:
    hook_file = next(f for f in rootfs.initramfs_setup_files(CFG) if f.path.endswith("/failback"))
    [(hook, _)] = rootfs.write_setup_files((hook_file,), tmp_path / "staging")
    subprocess.run(["shellcheck", "-s", "sh", str(hook)], check=True)
    assert subprocess.run([str(hook), "prereqs"], capture_output=True, text=True, check=True).stdout == "\n"
    # Run it for real, with a stand-in hook-functions library that records manual_add_modules calls
    # (the real one needs a kernel's module tree): the drops must happen before the adds.
    dest = tmp_path / "initramfs"
    kernel = _fake_initramfs_tree(dest)
    lib = tmp_path / "hook-functions"
    lib.write_text('manual_add_modules() { [ ! -e usr/lib/firmware ] && echo "$1" >> "$RECORD"; }\n')
    script = tmp_path / "hook-under-test"
    script.write_text(hook.read_text().replace("/usr/share/initramfs-tools/hook-functions", str(lib)))
    script.chmod(0o755)
    record = tmp_path / "added"
    subprocess.run(
        [str(script)], env={"DESTDIR": str(dest), "RECORD": str(record), "PATH": "/usr/bin:/bin"}, check=True
    )
    assert not (kernel / "drivers/net").exists() and not (dest / "usr/lib/firmware").exists()
    assert not (kernel / "fs/btrfs").exists()
    assert (kernel / "drivers/scsi/sr_mod.ko").is_file() and (kernel / "fs/squashfs/squashfs.ko").is_file()
    assert record.read_text().split() == list(CFG.initramfs.modules)
    # Without DESTDIR it must refuse rather than delete from the build machine's own root.
    bad = subprocess.run([str(hook)], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert bad.returncode != 0 and "DESTDIR" in bad.stderr


def test_mask_units_link_to_dev_null(tmp_path: Path) -> None:
    [hook] = rootfs.mask_hooks(("systemd-pstore.service", "dev-x\\x2d1.mount"))
    root = tmp_path / "root dir"
    root.mkdir()
    subprocess.run(["sh", "-c", hook.removeprefix("--customize-hook="), "hook", str(root)], check=True)
    for unit in ("systemd-pstore.service", "dev-x\\x2d1.mount"):
        assert (root / "etc/systemd/system" / unit).readlink() == Path("/dev/null")
    assert rootfs.mask_hooks(()) == []
    [hook] = rootfs.mask_hooks((), ("systemd-gpt-auto-generator",))
    subprocess.run(["sh", "-c", hook.removeprefix("--customize-hook="), "hook", str(root)], check=True)
    assert (root / "etc/systemd/system-generators/systemd-gpt-auto-generator").readlink() == Path("/dev/null")
    cmd = rootfs.mmdebstrap_command(CFG, tmp_path / "t", tmp_path / "a")
    assert CFG.mask_units and CFG.mask_generators
    assert all(h in cmd for h in rootfs.mask_hooks(CFG.mask_units, CFG.mask_generators))


def test_setup_files_go_in_before_the_packages(tmp_path: Path) -> None:
    staged = rootfs.write_setup_files(rootfs.initramfs_setup_files(CFG), tmp_path / "stag ing")
    cmd = rootfs.mmdebstrap_command(CFG, tmp_path / "target", tmp_path / "apt", staged)
    hooks = [c.removeprefix("--essential-hook=") for c in cmd if c.startswith("--essential-hook=")]
    assert hooks[0].startswith("mkdir -p ") and '"$1"/etc/initramfs-tools/hooks' in hooks[0]
    for host, f in staged:
        assert host.read_text() == f.text and (host.stat().st_mode & 0o777) == f.mode
        up = hooks.index(f"upload '{host}' {f.path}")
        assert hooks[up + 1] == f'chmod {f.mode:o} "$1"{f.path}'
    assert rootfs.mmdebstrap_command(CFG, tmp_path / "t", tmp_path / "a").count("--essential-hook") == 0


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"policy": "some"}, "initramfs.policy", "most, dep, list, netboot"),
        ({"modules": ["sr mod"]}, "initramfs.modules[0]", "kernel module name"),
        ({"policy": "list", "modules": []}, "initramfs.modules", "find the live medium"),
        ({"drop": ["/usr/lib/firmware"]}, "initramfs.drop[0]", "relative to the initramfs root"),
        ({"drop": ["usr/../etc"]}, "initramfs.drop[0]", "without '..'"),
        ({"compression": "lzop"}, "initramfs.compression", "zstd, lz4, xz, gzip"),
        ({"compression": "lz4", "level": 3}, "initramfs.compression", "'lz4' in packages"),
        ({"level": 20}, "initramfs.level", "between 1 and 19"),
        ({"colour": 1}, "initramfs.colour", "unknown key"),
        ({"mask_units": ["pstore"]}, "mask_units[0]", "systemd unit file name"),
        ({"mask_generators": ["gpt-auto"]}, "mask_generators[0]", "systemd generator"),
    ],
)
def test_bad_initramfs_settings_name_the_key(tmp_path: Path, change: dict, key: str, words: str) -> None:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    if "mask_units" in change or "mask_generators" in change:
        data.update(change)
    else:
        data["initramfs"].update(change)
    path = tmp_path / "image.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: {key}: " in str(err.value) and words in str(err.value)


def test_initramfs_section_is_optional(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    del data["initramfs"]
    path = tmp_path / "image.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).initramfs == DEFAULT_INITRAMFS


def test_snapshot_mirror_disables_valid_until(tmp_path: Path) -> None:
    cfg = replace(
        CFG,
        debian=replace(
            CFG.debian, mirror="http://snapshot.debian.org/archive/debian/20250520T000000Z", security_mirror=""
        ),
    )
    cmd = rootfs.mmdebstrap_command(cfg, tmp_path / "t", tmp_path / "c")
    assert '--aptopt=Acquire::Check-Valid-Until "false"' in cmd
    assert not any("security" in c for c in cmd if c.startswith("deb "))


STATUS = """\
Package: zlib1g
Status: install ok installed
Architecture: amd64
Version: 1:1.2.13.dfsg-1

Package: adduser
Status: install ok installed
Architecture: all
Version: 3.134

Package: removed-one
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0
"""


def test_manifest_lists_installed_packages_sorted(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(STATUS)
    (root / "var/lib/dpkg/available").write_text("")
    dest = tmp_path / "filesystem.packages"
    rootfs.write_manifest(root, dest)  # real dpkg-query on a real status database
    assert dest.read_text() == "adduser\t3.134\tall\nzlib1g\t1:1.2.13.dfsg-1\tamd64\n"


def test_boot_files_are_extracted(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "boot").mkdir(parents=True)
    (root / "boot/vmlinuz-6.1.0-99-amd64").write_bytes(b"kernel")
    (root / "boot/initrd.img-6.1.0-99-amd64").write_bytes(b"initrd")
    k, i = tmp_path / "out/vmlinuz", tmp_path / "out/initrd.img"
    rootfs.extract_boot_files(root, k, i)
    assert k.read_bytes() == b"kernel" and i.read_bytes() == b"initrd"
    assert (tmp_path / "out/kernel-version").read_text() == "6.1.0-99-amd64\n"


def test_boot_files_errors(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "boot").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="expected exactly one kernel"):
        rootfs.extract_boot_files(root, tmp_path / "k", tmp_path / "i")
    (root / "boot/vmlinuz-6.1.0-99-amd64").write_bytes(b"kernel")
    with pytest.raises(RuntimeError, match="initramfs was not generated"):
        rootfs.extract_boot_files(root, tmp_path / "k", tmp_path / "i")


# --- the real base of the default build -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.root
def test_built_base(built_pipeline, tmp_path: Path) -> None:
    p = built_pipeline.paths
    manifest = dict(line.split("\t")[:2] for line in p.manifest.read_text().splitlines())
    for pkg in ("busybox", "systemd-sysv", "python3", "python3-venv", "firmware-bnx2x", "systemd-resolved"):
        assert pkg in manifest, pkg
    assert not [m for m in manifest if m.startswith(("grub", "shim"))], "boot loaders do not belong in the base"
    assert (p.rootfs / "etc/machine-id").read_bytes() == b""
    assert (p.rootfs / "etc/hostname").read_text() == "localhost\n", "the build host's name must not leak in"
    assert (p.rootfs / "etc/hostname").stat().st_mode & 0o7777 == 0o644, "nor the build host's file mode"
    assert not (p.rootfs / "etc/.resolv.conf.systemd-resolved.bak").exists(), "nor its resolv.conf"
    assert not list((p.rootfs / "var/cache/apt/archives").glob("*.deb")), "downloads must not stay in the base"
    assert list(p.apt_cache.glob("*.deb")), "downloads are kept for the next cold build"
    assert not list((p.rootfs / "usr/share/man").rglob("*.gz")), "man pages are excluded"
    assert (p.rootfs / "usr/share/doc/python3/copyright").is_file(), "licences are kept"
    kver = (p.kernel.parent / "kernel-version").read_text().strip()
    mods = p.rootfs / "usr/lib/modules" / kver / "kernel"
    assert (mods / "drivers/net/ethernet/broadcom").is_dir()
    assert not list((mods / "sound").rglob("*.ko")), "sound modules are excluded"
    # The boot script (boot=failback) must be in the initramfs, or the ISO cannot find its squashfs layers.
    listing = subprocess.run(
        ["chroot", str(p.rootfs), "lsinitramfs", f"/boot/initrd.img-{kver}"], capture_output=True, text=True, check=True
    ).stdout
    assert "scripts/failback" in listing.split() and "usr/bin/busybox" in listing
    assert "squashfs.ko" in listing and "overlay.ko" in listing
    # The initramfs section: the live medium's drivers, no network drivers or firmware (initramfs.drop).
    for module in ("sr_mod.ko", "isofs.ko", "ahci.ko", "usb-storage.ko", "uas.ko", "virtio_blk.ko"):
        assert f"/{module}" in listing, module
    assert "kernel/drivers/net/" not in listing and "usr/lib/firmware/" not in listing
    # No LVM autoactivation of the local disks (the failback's target) in the initrd; the live root's
    # overlay replaces the same rules file, whose name must be lvm2's.
    assert "usr/lib/udev/rules.d/69-lvm.rules" not in listing and "usr/sbin/lvm\n" not in listing
    assert (p.rootfs / "usr/lib/udev/rules.d/69-lvm.rules").is_file()
    assert _forced_modules(p.initrd, tmp_path) == [], "the initrd must not load drivers whatever the hardware"
    # initramfs.drop must not break a kept module: every dependency depmod recorded is in the initrd.
    subprocess.run(
        f"zstd -dc {p.initrd} | cpio -id --quiet 'usr/lib/modules/*/modules.dep'", shell=True, cwd=tmp_path, check=True
    )
    [dep_file] = tmp_path.glob("usr/lib/modules/*/modules.dep")
    needed = {w.rstrip(":") for line in dep_file.read_text().splitlines() for w in line.split()}
    absent = sorted(n for n in needed if f"{dep_file.parent.relative_to(tmp_path)}/{n}" not in listing)
    assert not absent, f"modules.dep names modules the initrd lacks: {absent[:5]}"
    for unit in built_pipeline.cfg.mask_units:
        assert (p.rootfs / "etc/systemd/system" / unit).readlink() == Path("/dev/null"), unit
    for generator in built_pipeline.cfg.mask_generators:  # each one masks a generator systemd has
        assert (p.rootfs / "etc/systemd/system-generators" / generator).readlink() == Path("/dev/null")
        assert (p.rootfs / "usr/lib/systemd/system-generators" / generator).is_file(), generator
    assert p.initrd.read_bytes()[:4] == b"\x28\xb5\x2f\xfd", "zstd-compressed (initramfs.compression)"


def _forced_modules(initrd: Path, tmp: Path) -> list[str]:
    """The modules the initrd loads at boot whatever the hardware (its conf/modules)."""
    subprocess.run(f"zstd -dc {initrd} | cpio -id --quiet conf/modules", shell=True, cwd=tmp, check=True)
    listed = tmp / "conf/modules"
    lines = listed.read_text().splitlines() if listed.exists() else []
    return [line for line in lines if line.strip() and not line.startswith("#")]


# --- the initrd's boot script (boot=failback) ------------------------------------------------------


def _boot_script(tmp_path: Path, label: str) -> Path:
    cfg = replace(CFG, iso=replace(CFG.iso, volume_label=label))
    files = rootfs.initramfs_setup_files(cfg)
    script_file = next(f for f in files if f.path == "/etc/initramfs-tools/scripts/failback")
    [(script, _)] = rootfs.write_setup_files((script_file,), tmp_path / "staging")
    return script


def _medium(tmp_path: Path, label: str) -> Path:
    """A file system labelled `label` with two squashfs layers and the list that stacks them. ext2, not
    iso9660: this host's kernel has no isofs (the script does not care; the QEMU boots prove the ISO)."""
    layers = {"00-base.squashfs": {"a": "base a", "b": "base b"}, "10-top.squashfs": {"b": "top b", "c": "top c"}}
    content = tmp_path / "medium"
    (content / "live").mkdir(parents=True)
    for i, (name, files) in enumerate(layers.items()):
        tree = tmp_path / f"layer{i}"
        tree.mkdir()
        for fname, text in files.items():
            (tree / fname).write_text(text + "\n")
        subprocess.run(
            ["mksquashfs", str(tree), str(content / "live" / name), "-quiet", "-noappend", "-no-progress"], check=True
        )
    (content / "live/filesystem.module").write_text("".join(f"{name}\n" for name in layers))
    out = tmp_path / "medium.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-L", label, "-d", str(content), str(out), "4M"], check=True)
    return out


def _run_boot_script(script: Path, tmp_path: Path, cmdline: str) -> subprocess.CompletedProcess[str]:
    """mountroot() of the script under busybox sh (as in the initrd), in a private mount namespace; prints
    the stacked root's files. panic() is initramfs-tools'; here it prints and fails."""
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    shell = (
        f'panic() {{ echo "PANIC: $*"; exit 3; }}; . {script}; rootmnt={root}; mountroot || exit 4; '
        f"cat {root}/a {root}/b {root}/c; echo new > {root}/d; cat {tmp_path}/live/overlay/rw/d; "
        f'busybox mount | grep -c " {tmp_path}/live/"'
    )
    env = {
        "PATH": os.environ["PATH"],
        "FAILBACK_LIVE_DIR": str(tmp_path / "live"),
        "FAILBACK_CMDLINE": str(tmp_path / "cmdline"),
    }
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "busybox", "sh", "-c", shell],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.root
def test_boot_script_stacks_the_layers_of_the_labelled_medium(tmp_path: Path) -> None:
    label = f"FBTEST{os.getpid() % 1000000}"  # ext2 labels: at most 16 bytes
    script = _boot_script(tmp_path, label)
    subprocess.run(["shellcheck", "-s", "sh", str(script)], check=True)
    medium = _medium(tmp_path, label)
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-r", str(medium)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        run = _run_boot_script(script, tmp_path, "BOOT_IMAGE=/live/vmlinuz boot=failback failback.wait=10 quiet")
        assert run.returncode == 0, run.stdout + run.stderr
        # the top layer (listed last) wins; writes go to the RAM-backed upper layer
        # medium + 2 layers + overlay tmpfs + the root
        assert run.stdout.split("\n") == ["base a", "top b", "top c", "new", "4", ""], run.stdout + run.stderr
        # another label: looked for failback.wait seconds, then a panic that says what to do
        other = _boot_script(tmp_path / "other", label + "X")
        run = _run_boot_script(other, tmp_path / "other", "boot=failback failback.wait=1")
        assert run.returncode == 3
        assert f"no CD, DVD or USB stick labelled {label}X" in run.stdout and "failback.wait=SECONDS" in run.stdout
        assert loop in run.stdout, "the panic lists the block devices it saw"
        run = _run_boot_script(script, tmp_path / "other", "boot=failback failback.wait=1m")
        assert run.returncode == 3 and "failback.wait=1m: not a whole number of seconds" in run.stdout
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
