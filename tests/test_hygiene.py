"""Test hygiene (issue 17, item 6): a tree with a live mount is never copied, a tool's unexplained warning fails
the build, a failed run's leftovers are cleared at the next start, and the session fails on a leak.

What happened once: the conversion fixture's mmdebstrap printed `W: umount /proc failed` and exited 0,
`cp -a` copied the live /proc into the image (ENOSPC), and the leftover work/ broke every later run.
The fake mmdebstrap below replays exactly that: it mounts a tmpfs at <target>/proc and warns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from image.core import mounts
from image.core.mounts import LiveMountError
from image.core.paths import BuildPaths
from image.core.run import ToolWarningError, run
from image.core.tool_warnings import MMDEBSTRAP
from image.stages import rootfs
from image.stages.config import load_config
from image.vm import convert_fixture

REPO = Path(__file__).resolve().parent.parent

BUSY_PROC_MMDEBSTRAP = """\
#!/bin/sh
# Stands in for mmdebstrap on a machine where /proc stayed busy: leaves a mount in the target, warns, exits 0.
prev=""
for a in "$@"; do [ "$prev" = "{suite}" ] && t="$a"; prev="$a"; done
mkdir -p "$t/proc" && mount -t tmpfs fake-proc "$t/proc" || exit 3
echo "I: installing remaining packages inside the chroot..." >&2
echo "umount: $t/proc: target is busy." >&2
echo "W: umount /proc failed: 8192" >&2
exit 0
"""


def _fake_tool(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / name).write_text(script)
    (bin_dir / name).chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", f"{d}:{os.environ['PATH']}")
    return d


@pytest.fixture
def cleanup(tmp_path: Path) -> Iterator[None]:
    """Whatever a test leaves mounted or attached under tmp_path is freed, pass or fail."""
    yield
    mounts.release(tmp_path)


def _tmpfs(where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "hygiene-test", str(where)])


# ---- reading mountinfo and loop devices ---------------------------------------------------------------------------


def test_mountinfo_is_read_with_its_escapes_and_deepest_first(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    base = tmp_path / "a b"
    info.write_text(
        "22 1 0:21 / / rw shared:1 - ext4 /dev/sda1 rw\n"
        f"30 22 0:5 / {str(base).replace(' ', chr(92) + '040')} rw - tmpfs tmp rw\n"
        f"31 30 0:6 / {str(base).replace(' ', chr(92) + '040')}/tree/proc rw shared:2 - proc proc rw\n"
        "32 22 0:7 / /elsewhere rw - tmpfs tmp rw\n"
    )
    found = mounts.mounts_under(base, info)
    assert [m.target for m in found] == [base / "tree" / "proc", base]
    assert (found[0].fstype, found[0].source) == ("proc", "proc")
    assert mounts.mounts_under(tmp_path / "a", info) == []  # a sibling's prefix is not "under"


def test_loop_devices_are_read_from_sysfs(tmp_path: Path) -> None:
    sys_block = tmp_path / "block"
    for name, backing in (("loop0", "/srv/x/work/cloud-disk.img (deleted)"), ("loop1", "/other.img")):
        (sys_block / name / "loop").mkdir(parents=True)
        (sys_block / name / "loop" / "backing_file").write_text(backing + "\n")
    (sys_block / "loop2").mkdir()  # not attached: no loop/ directory
    found = mounts.loop_devices_under(Path("/srv/x/work"), sys_block)
    assert found == [mounts.LoopDevice("/dev/loop0", Path("/srv/x/work/cloud-disk.img"))]


# ---- 1. a tree with a live mount under it is refused before copying ----------------------------------------------


@pytest.mark.root
def test_a_tree_with_a_live_mount_is_refused_naming_the_mount(tmp_path: Path, cleanup: None) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    mounts.require_no_mounts(tree, "copy it")  # nothing mounted: fine
    _tmpfs(tree / "proc")
    with pytest.raises(LiveMountError) as err:
        mounts.require_no_mounts(tree, "copy it into cloud-disk.img")
    msg = str(err.value)
    assert "refusing to copy it into cloud-disk.img" in msg
    assert f"{tree / 'proc'} (tmpfs hygiene-test)" in msg
    assert f"umount -R {tree / 'proc'}" in msg


@pytest.mark.root
def test_mksquashfs_refuses_a_tree_with_a_live_mount(tmp_path: Path, cleanup: None) -> None:
    from image.stages import squashfs

    src = tmp_path / "rootfs"
    (src / "etc").mkdir(parents=True)
    _tmpfs(src / "dev")
    dest = tmp_path / "00-base.squashfs"
    with pytest.raises(LiveMountError, match=r"refusing to pack it into 00-base.squashfs"):
        squashfs.mksquashfs(src, dest, load_config().squashfs, 0)
    assert not dest.exists() and not dest.with_name(dest.name + ".tmp").exists()


@pytest.mark.root
def test_convert_fixture_never_copies_a_tree_with_a_live_mount(
    tmp_path: Path, cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixture's own `cp -a tree/. mnt`: a tree whose /proc stayed mounted is refused before the copy, and
    nothing of the run stays mounted or attached."""

    def tree_with_proc_mounted(target: Path, apt_cache: Path) -> None:
        (target / "etc").mkdir(parents=True)
        _tmpfs(target / "proc")

    monkeypatch.setattr(convert_fixture, "_mmdebstrap", tree_with_proc_mounted)
    dest = tmp_path / "key" / "cloud-disk.img"
    dest.parent.mkdir()
    with pytest.raises(LiveMountError, match=r"refusing to copy it into cloud-disk.img"):
        convert_fixture.build_image(dest, tmp_path / "apt")
    work = dest.parent / "work"
    assert not (work / "mnt" / "etc").exists()  # cp never ran (the mounted image would have it)
    assert mounts.mounts_under(work) == [] and mounts.loop_devices_under(work) == []


# ---- 2. a tool's unexplained warning fails the command -----------------------------------------------------------


def test_a_planted_mmdebstrap_warning_fails_the_command_with_its_message(fake_bin: Path) -> None:
    _fake_tool(fake_bin, "mmdebstrap", "#!/bin/sh\necho 'I: fine' >&2\necho 'W: umount /proc failed: 8192' >&2\n")
    for capture in (False, True):
        with pytest.raises(ToolWarningError) as err:
            run(["mmdebstrap", "bookworm", "/nowhere"], capture=capture)
        assert err.value.returncode == 0
        assert "W: umount /proc failed: 8192" in str(err.value)
        assert "image/core/tool_warnings.py" in str(err.value)


def test_warnings_known_harmless_and_other_output_pass(fake_bin: Path) -> None:
    harmless = (
        "W: Download is performed unsandboxed as root as file '/var/cache/apt/archives/partial/x.deb' "
        "couldn't be accessed by user '_apt'. - pkgAcquire::Run (13: Permission denied)"
    )
    assert MMDEBSTRAP.offending(harmless) == []
    _fake_tool(
        fake_bin,
        "mmdebstrap",
        f"#!/bin/sh\necho \"{harmless}\" >&2\necho 'I: W: in the middle' >&2\n"
        "echo 'W: on stdout is not a warning of the tool' \n",
    )
    assert "I: W: in the middle" in run(["mmdebstrap"], capture=True).stderr
    run(["mmdebstrap"])
    # Another tool's "W: " line is its own business.
    _fake_tool(fake_bin, "othertool", "#!/bin/sh\necho 'W: umount /proc failed' >&2\n")
    run(["othertool"], capture=True)


@pytest.mark.root
def test_rootfs_stage_fails_on_the_warning_and_leaves_nothing_mounted(
    tmp_path: Path, fake_bin: Path, cleanup: None
) -> None:
    cfg = load_config()
    _fake_tool(fake_bin, "mmdebstrap", BUSY_PROC_MMDEBSTRAP.replace("{suite}", cfg.debian.suite))
    paths = BuildPaths(tmp_path / "build")
    with pytest.raises(ToolWarningError, match=r"W: umount /proc failed"):
        rootfs.build_rootfs(cfg, paths, 0)
    tmp = paths.rootfs.with_name("rootfs.tmp")
    assert (tmp / "proc").is_dir() and mounts.mounts_under(tmp) == []


# ---- 3. a failed or killed run does not break the next one -------------------------------------------------------


def _image_on_loop(path: Path) -> str:
    with path.open("wb") as f:
        f.truncate(8 * 1024 * 1024)
    run(["mkfs.ext4", "-q", "-F", str(path)])
    return run(["losetup", "--find", "--show", str(path)], capture=True).stdout.strip()


@pytest.mark.root
def test_a_fixture_run_killed_half_way_does_not_break_the_next(
    tmp_path: Path, fake_bin: Path, cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left as a kill -9 in the middle leaves it: a tree with its /proc mounted, the image attached to a loop
    device and mounted at mnt/ with a chroot's /dev bind mount on it. The next start clears it all and builds."""
    cache = tmp_path / "cache"
    work = cache / convert_fixture.fixture_key() / "work"
    old = cache / "0123456789abcdef" / "work"  # a leftover of an earlier recipe
    for w in (work, old):
        _tmpfs(w / "tree" / "proc")
    dev = _image_on_loop(work / "cloud-disk.img")
    (work / "mnt").mkdir()
    run(["mount", dev, str(work / "mnt")])
    # The chroot's /dev bind mount, of a stand-in: a mutant that deletes through it must not empty the real /dev.
    host_dev = tmp_path / "host-dev"
    host_dev.mkdir()
    (host_dev / "null").write_text("a node of the host's /dev\n")
    (work / "mnt" / "dev").mkdir()
    run(["mount", "--rbind", str(host_dev), str(work / "mnt" / "dev")])
    run(["mount", "--make-rslave", str(work / "mnt" / "dev")])

    built: list[Path] = []

    def build(w: Path, dest: Path, apt_cache: Path) -> None:  # the minutes of mmdebstrap are not the point
        assert sorted(p.name for p in w.iterdir()) == []  # a fresh work dir
        dest.write_bytes(b"image")
        built.append(dest)

    monkeypatch.setattr(convert_fixture, "_build_in", build)
    fixture = convert_fixture.cloud_fixture(cache)
    assert fixture.image == built[0] and fixture.image.read_bytes() == b"image"
    assert not work.exists() and not old.exists()
    assert mounts.mounts_under(cache) == [] and mounts.loop_devices_under(cache) == []
    assert (host_dev / "null").is_file()  # the /dev bind mount was unmounted, not deleted through


@pytest.mark.root
def test_the_real_busy_proc_failure_then_the_next_start(
    tmp_path: Path, fake_bin: Path, cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fresh machine's failure end to end with a fake mmdebstrap: the warning fails the build with its
    message, nothing stays mounted, and the next start (a working mmdebstrap) is not stopped by work/."""
    cfg = load_config()
    _fake_tool(fake_bin, "mmdebstrap", BUSY_PROC_MMDEBSTRAP.replace("{suite}", cfg.debian.suite))
    cache = tmp_path / "cache"
    with pytest.raises(ToolWarningError, match=r"W: umount /proc failed: 8192"):
        convert_fixture.cloud_fixture(cache)
    work = cache / convert_fixture.fixture_key() / "work"
    assert (work / "tree" / "proc").is_dir() and mounts.mounts_under(cache) == []

    monkeypatch.setattr(convert_fixture, "_build_in", lambda w, dest, apt: dest.write_bytes(b"image"))
    assert convert_fixture.cloud_fixture(cache).image.read_bytes() == b"image"
    assert not work.exists()


# ---- 4. the session-end leak check -------------------------------------------------------------------------------

LEAKY_DAEMONS = """\
import socket, subprocess
kept = []

def test_leaves_a_child_and_a_listener(tmp_path):
    proc = subprocess.Popen(["sleep", "120"])
    (tmp_path.parent.parent / "child.pid").write_text(str(proc.pid))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    kept.append(s)
"""

LEAKY_MOUNTS = """\
import subprocess

def test_leaves_a_mount_and_a_loop_device(tmp_path):
    (tmp_path / "m").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "leaky", str(tmp_path / "m")], check=True)
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1024 * 1024))
    subprocess.run(["losetup", "--find", str(img)], check=True)
"""

CLEAN = """\
import socket, subprocess

def test_cleans_up(tmp_path):
    (tmp_path / "m").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "clean", str(tmp_path / "m")], check=True)
    subprocess.run(["umount", str(tmp_path / "m")], check=True)
    subprocess.run(["sleep", "0"], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
"""


def _inner_pytest(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(source)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.leakcheck",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'basetemp'}",
            f"--rootdir={tmp_path}",
            str(tmp_path / "test_inner.py"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_leak_check_fails_on_a_leftover_child_process_and_listening_socket(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    try:
        r = _inner_pytest(tmp_path, LEAKY_DAEMONS)
        assert "1 passed" in r.stdout
        assert r.returncode == 1, r.stdout + r.stderr
        assert "leak check" in r.stdout
        assert f"process {pid_file.read_text()} still running: sleep 120" in r.stdout
        assert "listening socket 127.0.0.1:" in r.stdout
    finally:
        if pid_file.exists():
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.root
def test_leak_check_fails_on_a_leftover_mount_and_loop_device(tmp_path: Path, cleanup: None) -> None:
    r = _inner_pytest(tmp_path, LEAKY_MOUNTS)
    assert "1 passed" in r.stdout
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"mount {tmp_path / 'basetemp'}" in r.stdout and "(tmpfs leaky)" in r.stdout
    assert "loop device /dev/loop" in r.stdout and "disk.img: detach it" in r.stdout


@pytest.mark.root
def test_leak_check_passes_a_clean_run(tmp_path: Path) -> None:
    r = _inner_pytest(tmp_path, CLEAN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "leak check" not in r.stdout


def test_leak_check_lets_the_multiprocessing_resource_tracker_be(tmp_path: Path) -> None:
    """Known harmless (tests/leakcheck.py says why): it exits with the pytest process that started it."""
    r = _inner_pytest(
        tmp_path,
        "import multiprocessing\n\ndef test_a_pool():\n"
        "    with multiprocessing.get_context('spawn').Pool(1) as p:\n"
        "        assert p.apply(abs, (-1,)) == 1\n",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "leak check" not in r.stdout
