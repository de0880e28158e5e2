"""The live system's overlay: rendered units pass `systemd-analyze verify`, shell scripts pass
shellcheck, and start.sh / the launcher behave as documented.

How the units are verified on this (non-live) host: the overlay is rendered into a temporary
root, which gets the host's own systemd unit directory and the few host binaries the verified
units run (agetty, systemd-networkd*; the host is the same Debian 12 as the live rootfs), with
merged-/usr links like the live system. `systemd-analyze verify --root=<tmp>` then resolves every
unit, drop-in and ExecStart path inside that tree. systemd 252's verify exits 0 on parse
warnings, so any output also counts as a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from image.stages.config import DEFAULT_CONFIG, load_config
from image.stages.overlay import RenderError
from image.stages.overlay import render_overlay as pipeline_render

REPO = Path(__file__).resolve().parent.parent
OVERLAY = REPO / "overlay"

# The values the overlay's templates see: the real image definition's.
VALUES: dict[str, Any] = load_config(DEFAULT_CONFIG).template_vars()

# A live system in RAM during a failback: no package downloads, no scrubbing or trimming of the
# server's disks behind the client's back.
MASKED_HOUSEKEEPING = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)

VERIFIED_UNITS = [
    "failback-client@tty1.service",
    "failback-client@ttyS0.service",
    "getty@tty2.service",
    "systemd-networkd-wait-online.service",
]
# Host binaries the verified units (and what they pull in) execute.
HOST_BINARIES = [
    "/usr/sbin/agetty",
    "/usr/lib/systemd/systemd-networkd",
    "/usr/lib/systemd/systemd-networkd-wait-online",
]


def render_overlay(dest: Path, values: dict[str, Any] | None = None) -> None:
    """Render overlay/ into dest with the pipeline's renderer (a fresh dest each time)."""
    pipeline_render(OVERLAY, dest, VALUES if values is None else values)


@pytest.fixture(scope="module")
def live_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("liveroot") / "root"
    render_overlay(root)
    return root


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rendered overlay plus the host's units and binaries, laid out like the live rootfs."""
    root = tmp_path_factory.mktemp("verifyroot") / "root"
    render_overlay(root)
    for d in ("bin", "sbin", "lib", "lib64"):
        (root / "usr" / d).mkdir(parents=True, exist_ok=True)
        (root / d).symlink_to(f"usr/{d}")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    for binary in HOST_BINARIES:
        shutil.copy2(binary, root / binary.lstrip("/"))
    return root


def analyze_verify(root: Path, units: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        check=False,
    )


def test_units_pass_systemd_analyze_verify(verify_root: Path) -> None:
    proc = analyze_verify(verify_root, VERIFIED_UNITS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == "", "systemd-analyze verify warned:\n" + proc.stdout + proc.stderr


def test_verify_reports_a_broken_unit(verify_root: Path, tmp_path: Path) -> None:
    """The check above can fail: a typo in the client unit is reported."""
    root = tmp_path / "broken"
    shutil.copytree(verify_root, root, symlinks=True)
    unit = root / "etc/systemd/system/failback-client@.service"
    unit.write_text(unit.read_text().replace("Restart=always", "Restart=alwayz"))
    proc = analyze_verify(root, ["failback-client@tty1.service"])
    assert "alwayz" in proc.stdout + proc.stderr


def test_client_unit_contract(live_root: Path, verify_root: Path) -> None:
    text = (live_root / "etc/systemd/system/failback-client@.service").read_text()
    for line in (
        "TTYPath=/dev/%i",
        "StandardInput=tty",
        "Restart=always",
        "Conflicts=getty@%i.service serial-getty@%i.service",
        "Environment=FAILBACK_CONSOLE_LOCK=/run/failback-client/console.lock",
        "ExecStart=/usr/lib/failback/launch %i",
        "Nice=-15",  # ahead of the services starting beside it (4 s sooner under TCG)
    ):
        assert re.search(rf"^{re.escape(line)}", text, re.M), line
    # The summary line comes at once: the client waits for the network itself (issue 2 and 6).
    assert not re.search(r"^(After|Requires|Wants)=.*network-online\.target", text, re.M)
    # ... and for the file systems, tmpfiles and udev's coldplug too, after that line (bootwait.py); only
    # efivarfs comes first (the line's Secure Boot state).
    after = " ".join(re.findall(r"^After=(.*)$", text, re.M)).split()
    assert "sys-firmware-efi-efivars.mount" in after
    assert not {"local-fs.target", "sysinit.target", "systemd-udev-trigger.service"} & set(after), after
    waited = re.search(r'^Environment="FAILBACK_WAIT_UNITS=([^"]*)"', text, re.M)
    assert waited, "the client unit names the units its workflow waits for"
    assert waited.group(1).split() == [
        "local-fs.target",
        "systemd-tmpfiles-setup.service",
        "systemd-udev-trigger.service",
    ]
    # Each one a unit systemd has (a typo would make the wait fail). A host without the udev package (a
    # container) lacks udev's units; the image installs udev, whose coldplug unit has this name.
    known = {p.name for p in (verify_root / "usr/lib/systemd/system").iterdir()}
    if "systemd-udevd.service" not in known:
        known.add("systemd-udev-trigger.service")
    assert set(waited.group(1).split()) <= known


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("getty.target.wants/failback-client@tty1.service", "/etc/systemd/system/failback-client@.service"),
        ("getty.target.wants/failback-client@ttyS0.service", "/etc/systemd/system/failback-client@.service"),
        ("getty.target.wants/getty@tty2.service", "/lib/systemd/system/getty@.service"),
        ("multi-user.target.wants/systemd-networkd.service", "/lib/systemd/system/systemd-networkd.service"),
        ("sockets.target.wants/systemd-networkd.socket", "/lib/systemd/system/systemd-networkd.socket"),
        (
            "network-online.target.wants/systemd-networkd-wait-online.service",
            "/lib/systemd/system/systemd-networkd-wait-online.service",
        ),
        ("sysinit.target.wants/systemd-resolved.service", "/lib/systemd/system/systemd-resolved.service"),
        ("sysinit.target.wants/systemd-timesyncd.service", "/lib/systemd/system/systemd-timesyncd.service"),
        ("getty@tty1.service", "/dev/null"),
        ("serial-getty@ttyS0.service", "/dev/null"),
        *[(unit, "/dev/null") for unit in MASKED_HOUSEKEEPING],
    ],
)
def test_units_enabled_by_symlink(live_root: Path, link: str, target: str) -> None:
    path = live_root / "etc/systemd/system" / link
    assert path.is_symlink(), f"{link} is not a symlink in the rendered overlay"
    assert os.readlink(path) == target


def test_enabled_host_units_exist(verify_root: Path) -> None:
    """Every enabling symlink points at a real unit (systemd-resolved is a separate package the
    live rootfs installs; this host may lack it)."""
    for link in (verify_root / "etc/systemd/system").rglob("*.service"):
        if not link.is_symlink() or os.readlink(link) == "/dev/null":
            continue
        target = verify_root / os.readlink(link).lstrip("/")
        if "resolved" in link.name or "resolve1" in link.name:
            continue
        assert target.is_file(), f"{link} -> {os.readlink(link)} does not exist"


def test_resolv_conf_points_at_resolved_stub(live_root: Path) -> None:
    assert os.readlink(live_root / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"


def test_wait_online_is_bounded_and_its_arguments_parse(live_root: Path) -> None:
    dropin = live_root / "etc/systemd/system/systemd-networkd-wait-online.service.d/failback.conf"
    lines = [ln for ln in dropin.read_text().splitlines() if ln.startswith("ExecStart=/")]
    assert len(lines) == 1
    argv = lines[0].removeprefix("ExecStart=").split()
    assert "--any" in argv
    assert f"--timeout={VALUES['network']['dhcp_timeout']}" in argv  # type: ignore[index]
    # The real binary parses every option before acting on --help: a bad one fails here.
    proc = subprocess.run(
        ["/usr/lib/systemd/systemd-networkd-wait-online", *argv[1:], "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_templates_take_image_values(tmp_path: Path) -> None:
    values = {**VALUES, "hostname": "other-host", "network": {"dhcp_timeout": 7}, "client": {"venv": "/opt/x"}}
    tmp_path = tmp_path / "root"
    render_overlay(tmp_path, values)
    assert (tmp_path / "etc/hostname").read_text() == "other-host\n"
    assert "other-host" in (tmp_path / "etc/hosts").read_text()
    assert (
        "--timeout=7"
        in (tmp_path / "etc/systemd/system/systemd-networkd-wait-online.service.d/failback.conf").read_text()
    )
    assert 'python="/opt/x/bin/python"' in (tmp_path / "usr/lib/failback/launch").read_text()
    assert not list(tmp_path.rglob("*.j2"))


def test_templates_refuse_a_missing_value(tmp_path: Path) -> None:
    values = {k: v for k, v in VALUES.items() if k != "network"}
    with pytest.raises(RenderError, match=r"systemd-networkd-wait-online.service.d/failback.conf.j2.*network"):
        render_overlay(tmp_path / "root", values)


def test_issue_explains_the_console(live_root: Path) -> None:
    issue = (live_root / "etc/issue").read_text()
    assert "CONFIG_NETWORK=1 /usr/bin/start.sh" in issue
    assert "tty2" in issue and "Alt+F2" in issue
    assert "ttyS0" in issue


def test_journald_is_volatile_and_off_the_console(live_root: Path) -> None:
    text = (live_root / "etc/systemd/journald.conf.d/failback.conf").read_text()
    assert "Storage=volatile" in text
    assert "ForwardToConsole=no" in text
    assert re.search(r"^RuntimeMaxUse=\d+M$", text, re.M)


def shell_scripts(root: Path) -> list[Path]:
    found = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with p.open("rb") as f:
                if f.read(11) == b"#!/bin/sh\n" or p.read_bytes().startswith(b"#!/bin/sh"):
                    found.append(p)
    return found


def test_shell_scripts_are_shellcheck_clean(live_root: Path) -> None:
    scripts = shell_scripts(live_root)
    names = {p.name for p in scripts}
    assert {"start.sh", "launch", "console-present"} <= names
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"
    proc = subprocess.run(["shellcheck", "-s", "sh", *map(str, scripts)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- start.sh, run with dash (Debian's /bin/sh) against a fake root ------------------------------------------


@pytest.fixture
def fake_system(tmp_path: Path, live_root: Path) -> dict[str, object]:
    """A fake /sys with NICs, and systemctl/ip stand-ins on PATH that log their calls."""
    root = tmp_path / "root"
    for nic, carrier in (("eth0", "0"), ("ens3", "1"), ("lo", "1")):
        d = root / "sys/class/net" / nic
        d.mkdir(parents=True)
        (d / "carrier").write_text(carrier + "\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    (bindir / "systemctl").write_text(f'#!/bin/sh\necho "systemctl $*" >> {log}\n')
    # `ip -4 -o addr show dev NIC` shows whatever address the static config asked for.
    (bindir / "ip").write_text(
        f'#!/bin/sh\necho "ip $*" >> {log}\n'
        f"f=$(ls {root}/etc/systemd/network/05-failback-static-*.network 2>/dev/null | head -n1)\n"
        '[ -n "$f" ] || exit 0\n'
        'a=$(sed -n "s/^Address=//p" "$f")\n'
        '[ -z "${FAKE_IP_SILENT:-}" ] && echo "2: ens3    inet $a brd 0.0.0.0 scope global ens3"\n'
        "exit 0\n"
    )
    for f in bindir.iterdir():
        f.chmod(0o755)
    return {"root": root, "bindir": bindir, "log": log, "script": live_root / "usr/bin/start.sh"}


def run_start(fake: dict[str, object], **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        "PATH": f"{fake['bindir']}:/usr/bin:/bin",
        "FAILBACK_ROOT": str(fake["root"]),
        "FAILBACK_ADDR_TIMEOUT": "2",
        **env,
    }
    return subprocess.run(["dash", str(fake["script"])], env=full, capture_output=True, text=True, check=False)


GOOD = {"IPADDR": "192.168.10.20", "NETMASK": "255.255.255.0", "GATEWAY": "192.168.10.1", "DNS": "192.168.10.10"}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"IPADDR": ""}, "IPADDR"),
        ({"IPADDR": "192.168.10"}, "IPADDR"),
        ({"IPADDR": "192.168.10.256"}, "IPADDR"),
        ({"IPADDR": "192.168.010.20"}, "IPADDR"),
        ({"IPADDR": "192.168.10.20; reboot"}, "IPADDR"),
        ({"NETMASK": "255.0.255.0"}, "NETMASK"),
        ({"NETMASK": "33"}, "NETMASK"),
        ({"NETMASK": "0.0.0.0"}, "NETMASK"),
        ({"NETMASK": "abc"}, "NETMASK"),
        ({"GATEWAY": "192.168.11.1"}, "GATEWAY"),
        ({"GATEWAY": "gateway"}, "GATEWAY"),
        ({"GATEWAY": "192.168.10.20"}, "GATEWAY"),
        ({"DNS": ""}, "DNS"),
        ({"DNS": "192.168.10.10,8.8.8"}, "DNS"),
        ({"NIC": "eth9"}, "NIC"),
        ({"NIC": "../x"}, "NIC"),
        ({"CONFIG_NETWORK": "maybe"}, "CONFIG_NETWORK"),
    ],
)
def test_start_sh_rejects_bad_values_and_changes_nothing(
    fake_system: dict[str, object], change: dict[str, str], named: str
) -> None:
    env = {**GOOD, "CONFIG_NETWORK": "1", **change}
    env = {k: v for k, v in env.items() if v != "" or k == "IPADDR" or k == "DNS"}
    proc = run_start(fake_system, **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(rf"error: .*\b{named}\b", proc.stderr), proc.stderr
    assert not (Path(str(fake_system["root"])) / "etc").exists(), "start.sh wrote something despite the error"
    assert not Path(str(fake_system["log"])).exists(), "start.sh ran a command despite the error"


def test_start_sh_writes_static_config_and_restarts(fake_system: dict[str, object]) -> None:
    proc = run_start(fake_system, **{**GOOD, "DNS": "192.168.10.10, 1.1.1.1", "CONFIG_NETWORK": "1"})
    assert proc.returncode == 0, proc.stderr
    root = Path(str(fake_system["root"]))
    # eth0 has no carrier; ens3 is the first NIC with a link.
    files = list((root / "etc/systemd/network").glob("*.network"))
    assert [f.name for f in files] == ["05-failback-static-ens3.network"]
    text = files[0].read_text()
    assert "Name=ens3" in text
    assert "Address=192.168.10.20/24" in text
    assert "Gateway=192.168.10.1" in text
    assert re.findall(r"^DNS=(.*)$", text, re.M) == ["192.168.10.10", "1.1.1.1"]
    calls = Path(str(fake_system["log"])).read_text().splitlines()
    assert calls[0] == "systemctl restart systemd-networkd.service"
    assert "ip -4 -o addr show dev ens3" in calls
    assert calls[-1] == "systemctl --no-block restart failback-client@*.service"


def test_start_sh_waits_for_a_link_that_comes_late(fake_system: dict[str, object]) -> None:
    """Right after boot no NIC may have a link yet (networkd still starting, the link negotiating):
    start.sh waits for one instead of failing at once -- the client runs it that early for ip=."""
    sysnet = Path(str(fake_system["root"])) / "sys/class/net"
    (sysnet / "ens3/carrier").write_text("0\n")
    later = subprocess.Popen(["sh", "-c", f"sleep 1.5; echo 1 > '{sysnet}/eth0/carrier'"])
    try:
        proc = run_start(fake_system, **{**GOOD, "CONFIG_NETWORK": "1", "FAILBACK_LINK_TIMEOUT": "10"})
    finally:
        later.wait()
    assert proc.returncode == 0, proc.stderr
    assert "waiting up to 10 s for a wired network interface with a link" in proc.stderr
    assert (sysnet.parent.parent.parent / "etc/systemd/network/05-failback-static-eth0.network").is_file()


def test_start_sh_gives_up_on_a_link_that_never_comes(fake_system: dict[str, object]) -> None:
    root = Path(str(fake_system["root"]))
    (root / "sys/class/net/ens3/carrier").write_text("0\n")
    started = time.monotonic()
    proc = run_start(fake_system, **{**GOOD, "CONFIG_NETWORK": "1", "FAILBACK_LINK_TIMEOUT": "1"})
    assert proc.returncode == 2 and time.monotonic() - started >= 1
    assert "no wired network interface has a link after 1 s: plug in a cable" in proc.stderr
    assert not (root / "etc").exists() and not Path(str(fake_system["log"])).exists()
    bad = run_start(fake_system, **{**GOOD, "CONFIG_NETWORK": "1", "FAILBACK_LINK_TIMEOUT": "soon"})
    assert bad.returncode == 2 and "FAILBACK_LINK_TIMEOUT='soon' is not a number of seconds" in bad.stderr


def test_start_sh_named_nic_and_prefix_netmask(fake_system: dict[str, object]) -> None:
    proc = run_start(
        fake_system, **{**GOOD, "NETMASK": "16", "GATEWAY": "192.168.0.1", "NIC": "eth0", "CONFIG_NETWORK": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    text = (Path(str(fake_system["root"])) / "etc/systemd/network/05-failback-static-eth0.network").read_text()
    assert "Address=192.168.10.20/16" in text


def test_start_sh_reports_an_address_that_never_comes(fake_system: dict[str, object]) -> None:
    proc = run_start(fake_system, **{**GOOD, "CONFIG_NETWORK": "1", "FAKE_IP_SILENT": "1"})
    assert proc.returncode == 1
    assert "did not get 192.168.10.20/24 within 2 s" in proc.stderr
    assert "failback-client" not in Path(str(fake_system["log"])).read_text()


def test_start_sh_without_config_network_only_restarts_client(fake_system: dict[str, object]) -> None:
    proc = run_start(fake_system)
    assert proc.returncode == 0, proc.stderr
    assert Path(str(fake_system["log"])).read_text().splitlines() == [
        "systemctl --no-block restart failback-client@*.service"
    ]
    assert not (Path(str(fake_system["root"])) / "etc").exists()


# --- the launcher and the console check ------------------------------------------------------------------------


@pytest.fixture
def launcher(tmp_path: Path) -> tuple[Path, Path]:
    """The launcher rendered with client.venv pointing at a fake python that dumps its environment
    and its arguments."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    client = venv / "bin/python"
    client.write_text('#!/bin/sh\nenv | sort\nprintf "ARGV=%s\\n" "$*"\n')
    client.chmod(0o755)
    root = tmp_path / "root"
    render_overlay(root, {**VALUES, "client": {"venv": str(venv)}})
    return root / "usr/lib/failback/launch", tmp_path


def run_launch(launch: Path, tty: str, seed: Path, **env: str) -> dict[str, str]:
    proc = subprocess.run(
        ["dash", str(launch), tty],
        env={"PATH": "/usr/bin:/bin", "FAILBACK_SEED_ENV": str(seed), **env},
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def test_launcher_exports_seed_and_sets_term(launcher: tuple[Path, Path]) -> None:
    launch, tmp = launcher
    seed = tmp / "client.env"
    seed.write_text("AWS_REGION=eu-west-1\nAWS_DRS_ENDPOINT=\nRECOVERY_INSTANCE_ID=i-0123456789abcdef0\nNO_PROMPT=1\n")
    env = run_launch(launch, "ttyS0", seed, DEVICE_MAPPING="/dev/sda:/dev/nvme0n1")
    assert env["AWS_REGION"] == "eu-west-1"
    assert env["AWS_DRS_ENDPOINT"] == ""  # set but empty: the default endpoint
    assert env["RECOVERY_INSTANCE_ID"] == "i-0123456789abcdef0"
    assert env["NO_PROMPT"] == "1"
    assert env["DEVICE_MAPPING"] == "/dev/sda:/dev/nvme0n1"
    assert "AWS_ACCESS_KEY" not in env and "AWS_SESSION_TOKEN" not in env  # unset stays unset
    assert env["TERM"] == "vt220"
    assert env["FAILBACK_CONSOLE"] == "ttyS0"
    # The venv's python runs the client's main() (pip's console script would import re first).
    assert env["ARGV"] == "-c import sys; from failback_client.cli import main; sys.exit(main())"
    assert run_launch(launch, "tty1", tmp / "absent.env")["TERM"] == "linux"


def test_launcher_reads_the_proxy_and_the_dhcp_timeout(launcher: tuple[Path, Path]) -> None:
    launch, tmp = launcher
    netenv = tmp / "network.env"
    netenv.write_text("https_proxy='http://10.0.2.2:3128'\nHTTPS_PROXY='http://10.0.2.2:3128'\n")
    env = run_launch(launch, "tty1", tmp / "absent.env", FAILBACK_NETWORK_ENV=str(netenv))
    assert env["https_proxy"] == env["HTTPS_PROXY"] == "http://10.0.2.2:3128"
    assert env["FAILBACK_DHCP_TIMEOUT"] == str(VALUES["network"]["dhcp_timeout"])
    assert run_launch(launch, "tty1", tmp / "absent.env", FAILBACK_DHCP_TIMEOUT="5")["FAILBACK_DHCP_TIMEOUT"] == "5"


def test_launcher_explains_a_missing_client(tmp_path: Path) -> None:
    root = tmp_path / "root"
    render_overlay(root, {**VALUES, "client": {"venv": str(tmp_path / "nowhere")}})
    text = (root / "usr/lib/failback/launch").read_text().replace("sleep 30", "sleep 0")
    (root / "launch").write_text(text)
    proc = subprocess.run(["dash", str(root / "launch"), "tty1"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "bin/python is missing" in proc.stderr and "without the client" in proc.stderr


@pytest.mark.parametrize(
    ("tty", "uart_type", "present"),
    [("ttyS0", "4", True), ("ttyS1", "0", False), ("ttyS2", None, False), ("tty1", "", True)],
)
def test_console_present(live_root: Path, tmp_path: Path, tty: str, uart_type: str | None, present: bool) -> None:
    d = tmp_path / "sys/class/tty" / tty
    if uart_type is not None:
        d.mkdir(parents=True)
        if uart_type:
            (d / "type").write_text(uart_type + "\n")
    proc = subprocess.run(
        ["dash", str(live_root / "usr/lib/failback/console-present"), tty],
        env={"FAILBACK_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert (proc.returncode == 0) == present


# --- against the real live rootfs (when the build has made it) -----------------------------------------------


@pytest.fixture(scope="module")
def merged_live_root(live_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The build's rootfs with the rendered overlay on top (overlayfs, as live-boot stacks them)."""
    from image.core.paths import DEFAULT_BUILD, BuildPaths

    rootfs = BuildPaths(DEFAULT_BUILD).rootfs
    if not (rootfs / "usr/lib/systemd/systemd").exists():
        pytest.skip("the build's rootfs does not exist yet (inv rootfs)")
    if os.geteuid() != 0:
        pytest.skip("mounting overlayfs needs root")
    work = tmp_path_factory.mktemp("merged")
    for d in ("upper", "work", "merged"):
        (work / d).mkdir()
    merged = work / "merged"
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={live_root}:{rootfs},upperdir={work / 'upper'},workdir={work / 'work'}",
            str(merged),
        ],
        check=True,
    )
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


@pytest.mark.root
def test_units_verify_on_the_real_rootfs(merged_live_root: Path) -> None:
    units = [
        *VERIFIED_UNITS,
        "systemd-resolved.service",
        "systemd-timesyncd.service",
        "multi-user.target",
        "timers.target",
    ]
    proc = analyze_verify(merged_live_root, units)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


@pytest.mark.root
@pytest.mark.parametrize(
    ("unit", "state"),
    [
        ("failback-client@tty1.service", "enabled"),
        ("failback-client@ttyS0.service", "enabled"),
        ("getty@tty1.service", "masked"),
        ("serial-getty@ttyS0.service", "masked"),
        ("getty@tty2.service", "enabled"),
        ("systemd-networkd.service", "enabled"),
        ("systemd-networkd-wait-online.service", "enabled"),
        ("systemd-resolved.service", "enabled"),
        ("systemd-timesyncd.service", "enabled"),
        *[(unit, "masked") for unit in MASKED_HOUSEKEEPING],
    ],
)
def test_unit_states_on_the_real_rootfs(merged_live_root: Path, unit: str, state: str) -> None:
    proc = subprocess.run(
        ["systemctl", f"--root={merged_live_root}", "is-enabled", unit], capture_output=True, text=True, check=False
    )
    assert proc.stdout.strip() == state, proc.stdout + proc.stderr


def networkd_parse(files: list[Path], tmp_path: Path) -> str:
    """What the real systemd-networkd says when it loads `files` as its only configuration (run for a
    few seconds in its own mount and network namespaces, so the host's network is untouched)."""
    netdir = tmp_path / "network"
    netdir.mkdir()
    for f in files:
        shutil.copyfile(f, netdir / f.name)
    script = (
        f"mount --bind {netdir} /etc/systemd/network && mount -t tmpfs tmpfs /run/systemd && "
        "exec /lib/systemd/systemd-networkd"
    )
    proc = subprocess.run(
        ["timeout", "4", "unshare", "-m", "-n", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_LEVEL": "debug"},
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert "Enumeration completed" in output, output[-2000:]
    return "\n".join(line for line in output.splitlines() if "/etc/systemd/network/" in line)


@pytest.mark.root
def test_networkd_accepts_our_network_files(live_root: Path, fake_system: dict[str, object], tmp_path: Path) -> None:
    assert run_start(fake_system, **{**GOOD, "CONFIG_NETWORK": "1"}).returncode == 0
    written = list((Path(str(fake_system["root"])) / "etc/systemd/network").glob("*.network"))
    ours = sorted((live_root / "etc/systemd/network").glob("*.network"))
    assert ours and written
    assert networkd_parse([*ours, *written], tmp_path) == ""
    # ...and it does complain about a bad key: the check above can fail.
    bad = tmp_path / "99-bad.network"
    bad.write_text("[Match]\nName=eth0\n\n[Network]\nDHCPP=yes\n")
    (tmp_path / "again").mkdir()
    assert "Unknown key 'DHCPP'" in networkd_parse([bad], tmp_path / "again")


def test_lvm_autoactivation_is_off_in_the_live_root(live_root: Path) -> None:
    """The overlay's 69-lvm.rules replaces lvm2's (same name, /etc wins): no rules, so the local disks'
    volume groups are not activated at boot under the replication's feet."""
    rules = live_root / "etc/udev/rules.d/69-lvm.rules"
    lines = [line for line in rules.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines == []
