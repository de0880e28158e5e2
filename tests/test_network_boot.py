"""Boot-time networking and the unattended seed, proven on the built ISO under QEMU (TCG, user-mode networking).

Each test boots the ISO's own kernel and initrd (-kernel/-append, as an admin's edit of the boot entry would) with
the ISO attached as the live CD, and talks to the guest over its serial console (a QEMU socket chardev: we read
everything it prints and type answers into it). The tty1 instance of the client is masked on the kernel command
line so that the serial instance runs the workflow (console arbitration would otherwise let either win).

- DHCP + seed volume: a FBSEED CD made by `inv seed` (second CD drive) takes the client past the credentials,
  the instance choice and the mapping with no input, against the local control plane at 10.0.2.2.
- ip= + proxy: a static address from the kernel's `ip=`, credentials and `HTTPS_PROXY` as inline
  `failback.KEY=` arguments; a CONNECT proxy on the host's loopback must see the client's HTTPS requests.
- no DHCP: the NIC's backend is an unconnected QEMU socket (no DHCP server behind it; user-mode networking
  always answers DHCP, `restrict=on` does not stop that); after the bounded wait the client asks for a static
  address on the serial console, re-asks on a bad value, applies the answer with start.sh and goes on.

Run: FAILBACK_ISO=build/net/out/aws-failback-livecd-64bit.iso .venv/bin/pytest -m boot --run-slow \
     tests/test_network_boot.py   (the default build's ISO otherwise). One boot at a time.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from image.release.seedimage import build_seed_image
from image.vm import media, qemu
from tests.controlplane_fixture import drs_controlplane, drs_controlplane_factory  # noqa: F401

pytestmark = pytest.mark.boot

REPO = Path(__file__).resolve().parent.parent
BASE_APPEND = "boot=failback quiet console=tty0 console=ttyS0,115200n8 systemd.mask=failback-client@tty1.service"
BOOT_TIMEOUT = 600.0


def _iso() -> Path:
    env = os.environ.get("FAILBACK_ISO")
    if env:
        return Path(env)
    from image.vm.smoke import default_iso

    return default_iso()


@pytest.fixture(scope="module")
def live_iso(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    iso = _iso()
    if not iso.is_file():
        pytest.skip(f"no ISO at {iso} (inv build, or FAILBACK_ISO=...)")
    work = tmp_path_factory.mktemp("netboot")
    kernel = media.extract_from_iso(iso, r"^/live/vmlinuz", work / "vmlinuz")
    initrd = media.extract_from_iso(iso, r"^/live/initrd", work / "initrd.img")
    return iso, kernel, initrd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    """One QEMU boot whose serial console we read and type into."""

    def __init__(
        self, workdir: Path, live: tuple[Path, Path, Path], append: str, *, nic: list[str], drives: list[str] = ()
    ) -> None:  # type: ignore[assignment]
        iso, kernel, initrd = live
        workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = workdir / "serial.log"
        self.qmp = qemu.short_socket_path("net")
        self.serial_sock = self.qmp.parent / "serial.sock"
        argv = qemu.kernel_argv(
            kernel=kernel,
            initrd=initrd,
            append=f"{BASE_APPEND} {append}",
            serial_log=self.serial_log,
            qmp_socket=self.qmp,
        )
        argv = self._replace(
            argv,
            "-serial",
            ["-chardev", f"socket,id=ser0,path={self.serial_sock},server=on,wait=on", "-serial", "chardev:ser0"],
        )
        argv = self._replace(argv, "-nic", nic)
        argv += [
            "-drive",
            f"if=none,id=live,file={iso},format=raw,media=cdrom,readonly=on",
            "-device",
            "ide-cd,drive=live,bus=ide.0",
            *drives,
        ]
        self.argv = argv
        self.text = ""
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None

    @staticmethod
    def _replace(argv: list[str], flag: str, new: list[str]) -> list[str]:
        i = argv.index(flag)
        return [*argv[:i], *new, *argv[i + 2 :]]

    def start(self) -> Guest:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(self.serial_sock))
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"QEMU did not start: {self.argv}") from None
                time.sleep(0.1)
        threading.Thread(target=self._reader, daemon=True).start()
        return self

    def _reader(self) -> None:
        assert self.sock is not None
        with self.serial_log.open("wb") as log:
            while not self._stop.is_set():
                ready, _, _ = select.select([self.sock], [], [], 0.2)
                if not ready:
                    continue
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                log.write(data)
                log.flush()
                with self._lock:
                    self._buf += data
                    self.text = qemu.clean_console(bytes(self._buf))

    def wait_for(self, pattern: str, timeout: float = BOOT_TIMEOUT, after: int = 0) -> re.Match[str]:
        """The first match of `pattern` in the console text from offset `after`."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                m = rx.search(self.text, after)
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.2)
        tail = "\n".join(self.text.splitlines()[-40:])
        exited = ""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stdout is not None:
            exited = f"\nQEMU exited {self.proc.returncode}: {self.proc.stdout.read().decode(errors='replace')}"
        raise AssertionError(
            f"{pattern!r} not on the serial console within {timeout:.0f} s{exited}; last lines:\n{tail}"
        )

    def send(self, line: str) -> None:
        assert self.sock is not None
        self.sock.sendall(line.encode() + b"\r")

    def answer(self, prompt: str, line: str, after: int = 0, timeout: float = 120) -> int:
        m = self.wait_for(prompt, timeout, after)
        self.send(line)
        return m.end()

    def stop(self) -> None:
        qemu.qmp_quit(self.qmp)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stop.set()
        if self.sock is not None:
            self.sock.close()
        shutil.rmtree(self.qmp.parent, ignore_errors=True)


@contextlib.contextmanager
def booted(*args, **kwargs) -> Iterator[Guest]:  # type: ignore[no-untyped-def]
    guest = Guest(*args, **kwargs).start()
    try:
        yield guest
    finally:
        guest.stop()


USER_NET = ["-nic", "user,model=virtio-net-pci"]
LOG_DIR = REPO / "build" / "netboot"  # serial logs stay here after the run


def logdir(name: str) -> Path:
    return LOG_DIR / name


SUMMARY = r"failback-client \S+ \| boot mode: BIOS"


# ---- DHCP + the seed volume ---------------------------------------------------------------------------------


def test_dhcp_and_unattended_seed_volume(live_iso, drs_controlplane, tmp_path: Path) -> None:  # noqa: F811
    port = drs_controlplane.plane.url.rsplit(":", 1)[1].rstrip("/")
    seed = build_seed_image(
        tmp_path / "seed.iso",
        kind="iso",
        sets=[
            "AWS_REGION=us-east-1",
            f"AWS_ACCESS_KEY={drs_controlplane.access_key}",
            f"AWS_SECRET_KEY={drs_controlplane.secret_key}",
            f"AWS_DRS_ENDPOINT=http://10.0.2.2:{port}",
            f"FAILBACK_S3_ENDPOINT=http://10.0.2.2:{port}",
            "RECOVERY_INSTANCE_ID=i-0a1b2c3d4e5f60003",
            "DEVICE_MAPPING=/dev/nvme0n1=/dev/vda",
            "NO_PROMPT=1",
            "REBOOT=0",
        ],
    )
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(1 << 30)  # 1 GiB, the recovery instance's volume
    drives = [
        "-drive",
        f"if=none,id=seed,file={seed.path},format=raw,media=cdrom,readonly=on",
        "-device",
        "ide-cd,drive=seed,bus=ide.1",
        "-drive",
        f"if=virtio,file={disk},format=raw",
    ]
    with booted(logdir("seed"), live_iso, "", nic=USER_NET, drives=drives) as g:
        start = time.monotonic()
        summary = g.wait_for(SUMMARY)
        t_summary = time.monotonic() - start
        nic = g.wait_for(r"Network: (\S+)\s+52:54:00:12:34:56\s+link up\s+10\.0\.2\.15/24", after=summary.end())
        ready = g.wait_for(r"Network ready: \S+ 10\.0\.2\.15/24", after=summary.end())
        g.wait_for(r"Credentials accepted by Elastic Disaster Recovery in us-east-1", after=ready.end())
        g.wait_for(r"Recovery instance i-0a1b2c3d4e5f60003", after=ready.end())
        done = g.wait_for(r"COMPLETE_VOLUME_MAPPING: SUCCEEDED", after=ready.end())
        t_mapped = time.monotonic() - start
        text = g.text
    assert nic.group(1)
    assert "AWS Access Key ID:" not in text and "Network card [" not in text  # nothing was asked
    assert drs_controlplane.secret_key not in text
    internal = drs_controlplane.internal("i-0a1b2c3d4e5f60003")
    print(
        f"\nseed boot: summary line {t_summary:.0f} s, mapping done {t_mapped:.0f} s after QEMU start; "
        f"internal mapping {internal.get('volumeMapping') or internal}"
    )
    assert done


# ---- ip= and the proxy ----------------------------------------------------------------------------------


class ConnectProxy:
    """A minimal HTTP proxy on 127.0.0.1 that records every request line and refuses to tunnel (the guest
    has no route to AWS here; what matters is that the client's HTTPS went to the proxy)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                if data:
                    self.requests.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self.server.close()


def test_ip_argument_and_https_proxy(live_iso, tmp_path: Path) -> None:
    proxy = ConnectProxy()
    secret = "TestSecretKey0123456789abcdefABCDEF/+xyz"
    append = (
        f"ip=10.0.2.50::10.0.2.2:255.255.255.0:::none:10.0.2.3 failback.AWS_REGION=us-east-1 "
        f"failback.AWS_ACCESS_KEY=AKIAIOSFODNN7EXAMPLE failback.AWS_SECRET_KEY={secret} "
        f"failback.NO_PROMPT=1 failback.HTTPS_PROXY=http://10.0.2.2:{proxy.port}"
    )
    try:
        with booted(logdir("ip-proxy"), live_iso, append, nic=USER_NET) as g:
            summary = g.wait_for(SUMMARY)
            g.wait_for(r"Network: static address from kernel argument ip=10\.0\.2\.50::", after=summary.end())
            ready = g.wait_for(r"Network ready: \S+ .*10\.0\.2\.50/24", after=summary.end())
            g.wait_for(
                rf"HTTPS proxy http://10\.0\.2\.2:{proxy.port} \(seed kernel command line\) for DRS and S3; "
                r"the replication stream \(TCP 1500\) goes direct",
                after=ready.end(),
            )
            g.wait_for(r"(ERROR: .*proxy.*|Press Enter to start the failback client again)", after=ready.end())
            text = g.text
    finally:
        proxy.close()
    assert any(r.startswith("CONNECT drs.us-east-1.amazonaws.com:443 ") for r in proxy.requests), proxy.requests
    assert secret not in text
    print(f"\nproxy saw: {sorted(set(proxy.requests))}")


# ---- no DHCP: the static prompt on the serial console ------------------------------------------------------


def test_no_dhcp_static_prompt_on_the_serial_console(live_iso, tmp_path: Path) -> None:
    # An unconnected socket backend: the NIC has a link but nothing answers DHCP.
    nic = ["-netdev", f"socket,id=n0,listen=127.0.0.1:{_free_port()}", "-device", "virtio-net-pci,netdev=n0"]
    with booted(logdir("no-dhcp-prompt"), live_iso, "", nic=nic) as g:
        summary = g.wait_for(SUMMARY)
        g.wait_for(r"Network: DHCP on every network card with a link \(up to 30 s\)", after=summary.end())
        at = g.wait_for(r"Network: no address after 30 s", after=summary.end()).end()
        at = g.answer(r"Network card \[(\S+)\]: ", "", at)
        at = g.answer(r"IPv4 address \(e\.g\. 192\.168\.10\.20\): ", "10.0.2.300", at)
        at = g.wait_for(r"'10\.0\.2\.300' is not an IPv4 address", after=at).end()
        at = g.answer(r"IPv4 address \(e\.g\. 192\.168\.10\.20\): ", "10.0.2.60", at)
        at = g.answer(r"Subnet mask or prefix length", "255.255.255.0", at)
        at = g.answer(r"Default gateway", "10.0.2.2", at)
        at = g.answer(r"DNS server\(s\)", "10.0.2.3", at)
        at = g.answer(r"HTTPS proxy \(http://host:port; press Enter for none\): ", "", at)
        g.wait_for(r"(OK: |✔ )Network: 10\.0\.2\.60/24 via 10\.0\.2\.2, DNS 10\.0\.2\.3 on \S+", after=at)
        ready = g.wait_for(r"Network ready: \S+ 10\.0\.2\.60/24", after=at)
        g.wait_for(r"AWS Access Key ID: ", after=ready.end())


# ---- no DHCP: the guide's start.sh command, typed at the console's root shell (tty2) ---------------------------

_QCODES = {" ": "spc", "=": "equal", ".": "dot", "/": "slash", "-": "minus", "\n": "ret"}
_SHIFTED = {'"': "apostrophe", "_": "minus"}


def _qmp(qmp_socket: Path, commands: list[dict]) -> None:
    import json

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(qmp_socket))
        f = s.makefile("rwb")
        f.readline()
        for cmd in [{"execute": "qmp_capabilities"}, *commands]:
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:  # skip asynchronous events until the command's answer
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
            assert "error" not in reply, reply


def type_on_screen(qmp_socket: Path, text: str) -> None:
    """Type `text` on the guest's keyboard (QMP send-key), one key at a time."""
    commands = []
    for ch in text:
        if ch.isalpha() and ch.isupper():
            keys = ["shift", ch.lower()]
        elif ch in _SHIFTED:
            keys = ["shift", _SHIFTED[ch]]
        else:
            keys = [_QCODES.get(ch, ch)]
        commands.append({"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": k} for k in keys]}})
    _qmp(qmp_socket, commands)


def test_no_dhcp_start_sh_typed_at_the_root_shell(live_iso, tmp_path: Path) -> None:
    nic = ["-netdev", f"socket,id=n0,listen=127.0.0.1:{_free_port()}", "-device", "virtio-net-pci,netdev=n0"]
    command = (
        'IPADDR="10.0.2.70" NETMASK="255.255.255.0" GATEWAY="10.0.2.2" DNS="10.0.2.3" '
        "CONFIG_NETWORK=1 /usr/bin/start.sh\n"
    )
    with booted(logdir("no-dhcp-start-sh"), live_iso, "", nic=nic) as g:
        first = g.wait_for(SUMMARY)
        at = g.wait_for(r"Network: no address after 30 s", after=first.end()).end()
        g.wait_for(r"Network card \[\S+\]: ", after=at)
        _qmp(
            g.qmp,
            [
                {
                    "execute": "send-key",
                    "arguments": {
                        "keys": [
                            {"type": "qcode", "data": "ctrl"},
                            {"type": "qcode", "data": "alt"},
                            {"type": "qcode", "data": "f2"},
                        ]
                    },
                }
            ],
        )
        time.sleep(3)
        type_on_screen(g.qmp, command)
        # start.sh restarts the client on its consoles: a second summary line, the static address, the prompt.
        again = g.wait_for(SUMMARY, after=at, timeout=240)
        ready = g.wait_for(r"Network ready: \S+ 10\.0\.2\.70/24", after=again.end())
        g.wait_for(r"AWS Access Key ID: ", after=ready.end())
        assert "no address after" not in g.text[again.end() :]
