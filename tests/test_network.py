"""The client's network step (failback_client.network): NIC display, bounded DHCP wait, static address from
seed / ip= / prompt applied through the real start.sh, HTTPS proxy, the seed URL fetched afterwards."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from failback_client import network
from failback_client import network_values as nv
from failback_client.console import Console
from failback_client.errors import ConnectivityError, UsageError
from failback_client.seed import Seed, parse_cmdline, parse_env
from failback_client.settings import Settings, from_arguments_and_seed

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _proxy_env_restored() -> Iterator[None]:
    """apply_proxy() sets os.environ on purpose (children inherit it): undo that after each test."""
    saved = {k: os.environ.get(k) for k in ("https_proxy", "HTTPS_PROXY")}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def console(answers: str = "") -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(stdin=io.StringIO(answers), stdout=out, plain=True), out


def fake_sys(root: Path, nics: dict[str, tuple[str, str]]) -> Path:
    """/sys/class/net with physical NICs (name -> (mac, carrier)) plus lo (no device)."""
    for name, (mac, carrier) in nics.items():
        d = root / "sys/class/net" / name
        d.mkdir(parents=True)
        (d / "device").mkdir()
        (d / "address").write_text(mac + "\n")
        (d / "carrier").write_text(carrier + "\n")
        (d / "type").write_text("1\n")
    lo = root / "sys/class/net/lo"
    lo.mkdir(parents=True)
    (lo / "address").write_text("00:00:00:00:00:00\n")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/cmdline").write_text("boot=live\n")
    return root


def settings_for(root: Path, seed: Seed | None = None, *argv: str) -> Settings:
    from failback_client.cli import build_parser

    s = from_arguments_and_seed(build_parser().parse_args(list(argv)), seed or Seed(), {"FAILBACK_SYSROOT": str(root)})
    return s


# ---- ip= -------------------------------------------------------------------------------------------------


def test_ip_arg_static_kernel_form() -> None:
    cfg, text = network.parse_ip_arg("boot=live ip=10.0.2.50::10.0.2.2:255.255.255.0:fb1:ens3:none:10.0.2.3\n")
    assert cfg == nv.StaticConfig("10.0.2.50", 24, "10.0.2.2", ("10.0.2.3",), "ens3", "fb1")
    assert text == "10.0.2.50::10.0.2.2:255.255.255.0:fb1:ens3:none:10.0.2.3"


def test_ip_arg_without_nic_and_with_nameserver() -> None:
    cfg, _ = network.parse_ip_arg("ip=192.168.1.5::192.168.1.1:24:::off nameserver=192.168.1.9 nameserver=1.1.1.1")
    assert cfg is not None and cfg.nic is None and cfg.dns == ("192.168.1.9", "1.1.1.1") and cfg.prefix == 24


@pytest.mark.parametrize("line", ["ip=dhcp", "ip=on", "ip=ens3:dhcp", "quiet", "ip=::::::dhcp"])
def test_ip_arg_dhcp_forms_are_not_static(line: str) -> None:
    assert network.parse_ip_arg(line)[0] is None


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("ip=10.0.2.300::10.0.2.2:24::ens3:none:10.0.2.3", "IPADDR"),
        ("ip=10.0.2.50::10.0.3.2:24::ens3:none:10.0.2.3", "GATEWAY"),
        ("ip=10.0.2.50::10.0.2.2:24::ens3:none", "DNS missing"),
        ("ip=10.0.2.50::10.0.2.2:255.0.255.0::ens3:none:10.0.2.3", "NETMASK"),
        ("ip=bogus", "not a form this LiveCD knows"),
    ],
)
def test_ip_arg_errors(line: str, named: str) -> None:
    with pytest.raises(UsageError, match="kernel argument ip=") as e:
        network.parse_ip_arg(line)
    assert named in str(e.value)


# ---- the plan: seed > ip=, environment > seed for the proxy --------------------------------------------------


def test_plan_seed_static_beats_ip_arg(tmp_path: Path) -> None:
    seed = parse_env(
        "IPADDR=10.9.0.5\nNETMASK=16\nGATEWAY=10.9.0.1\nDNS=10.9.0.2,10.9.0.3\nNIC=ens4\n",
        "volume FBSEED:failback-seed.env",
    )
    p = network.plan(settings_for(tmp_path, seed), {}, "ip=10.0.2.50::10.0.2.2:24::ens3:none:10.0.2.3")
    assert p.static == nv.StaticConfig("10.9.0.5", 16, "10.9.0.1", ("10.9.0.2", "10.9.0.3"), "ens4")
    assert p.static_origin == "seed volume FBSEED:failback-seed.env line 1"
    p = network.plan(settings_for(tmp_path), {}, "ip=10.0.2.50::10.0.2.2:24::ens3:none:10.0.2.3")
    assert p.static is not None and p.static.address == "10.0.2.50" and p.static_origin.startswith("kernel argument")


def test_plan_proxy_environment_beats_seed_and_timeout(tmp_path: Path) -> None:
    seed = parse_cmdline("failback.HTTPS_PROXY=http://u:seedpass99@10.0.2.2:3128")
    p = network.plan(settings_for(tmp_path, seed), {"FAILBACK_DHCP_TIMEOUT": "7"}, "")
    assert p.proxy == "http://u:seedpass99@10.0.2.2:3128" and p.proxy_origin == "seed kernel command line"
    assert p.dhcp_timeout == 7
    p = network.plan(settings_for(tmp_path, seed), {"https_proxy": "http://10.0.2.2:8888"}, "")
    assert p.proxy == "http://10.0.2.2:8888" and p.proxy_origin == "variable https_proxy"
    with pytest.raises(UsageError, match="FAILBACK_DHCP_TIMEOUT='x'"):
        network.plan(settings_for(tmp_path), {"FAILBACK_DHCP_TIMEOUT": "x"}, "")
    with pytest.raises(UsageError, match=r"needs a port.*\(from variable HTTPS_PROXY\)"):
        network.plan(settings_for(tmp_path), {"HTTPS_PROXY": "proxy.example.com"}, "")


# ---- NICs and the bounded wait ---------------------------------------------------------------------------------


def test_list_nics_physical_only(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, {"ens3": ("52:54:00:12:34:56", "1"), "ens4": ("52:54:00:aa:bb:cc", "0")})
    nics = network.list_nics(str(root), lambda: {"ens3": ["10.0.2.15/24"], "lo": ["127.0.0.1/8"]})
    assert nics == [
        network.Nic("ens3", "52:54:00:12:34:56", True, ("10.0.2.15/24",)),
        network.Nic("ens4", "52:54:00:aa:bb:cc", False, ()),
    ]


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_wait_shows_each_change_and_returns_the_first_address(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, {"ens3": ("52:54:00:12:34:56", "1")})
    clock = FakeClock()
    answers = iter([{}, {}, {}, {"ens3": ["10.0.2.15/24"]}])
    con, out = console()
    nic = network.wait_for_address(
        con, 30, sysroot=str(root), addresses=lambda: next(answers), clock=clock, sleep=clock.sleep
    )
    assert nic is not None and nic.addresses == ("10.0.2.15/24",)
    lines = out.getvalue().splitlines()
    assert lines == [
        "Network: ens3  52:54:00:12:34:56  link up  no address yet",
        "Network: ens3  52:54:00:12:34:56  link up  10.0.2.15/24",
    ]
    assert clock.t == 1.5


def test_wait_is_bounded(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, {"ens3": ("52:54:00:12:34:56", "0")})
    clock = FakeClock()
    con, _ = console()
    assert network.wait_for_address(con, 30, sysroot=str(root), addresses=dict, clock=clock, sleep=clock.sleep) is None
    assert 30 <= clock.t <= 30.5


# ---- the prompt ----------------------------------------------------------------------------------------------


def test_prompt_reasks_with_the_reason(tmp_path: Path) -> None:
    nics = [network.Nic("ens3", "52:54:00:12:34:56", False), network.Nic("ens4", "52:54:00:aa:bb:cc", True)]
    answers = "\n".join(
        [
            "9",
            "",
            "192.168.10.300",
            "192.168.10.20",
            "255.0.255.0",
            "24",
            "192.168.11.1",
            "192.168.10.1",
            "8.8.8",
            "192.168.10.10, 192.168.10.11",
            "proxy.local",
            "10.0.2.2:3128",
        ]
    )
    con, out = console(answers + "\n")
    cfg, proxy = network.prompt_static(con, nics)
    assert cfg == nv.StaticConfig("192.168.10.20", 24, "192.168.10.1", ("192.168.10.10", "192.168.10.11"), "ens4")
    assert proxy == "http://10.0.2.2:3128"
    text = out.getvalue()
    assert "'9' is not one of the network cards above" in text
    assert "Network card [ens4]:" in text  # the default: the first with a link
    assert "'192.168.10.300' is not an IPv4 address" in text
    assert "'255.0.255.0' is not a subnet mask" in text
    assert "gateway 192.168.11.1 is not in the subnet 192.168.10.0/24" in text
    assert "'8.8.8' is not an IPv4 address" in text
    assert "proxy.local needs a port" in text


# ---- the whole step, with the real start.sh against a fake root -------------------------------------------------


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """The rendered overlay's start.sh with systemctl/ip stand-ins (as tests/test_overlay_units.py does)."""
    from tests.test_overlay_units import render_overlay

    overlay = tmp_path / "overlay"
    render_overlay(overlay)
    root = fake_sys(tmp_path / "root", {"ens3": ("52:54:00:12:34:56", "1")})
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    (bindir / "systemctl").write_text(f'#!/bin/sh\necho "systemctl $*" >> {log}\n')
    (bindir / "ip").write_text(
        f"#!/bin/sh\nf=$(ls {root}/etc/systemd/network/05-failback-static-*.network 2>/dev/null | head -n1)\n"
        '[ -n "$f" ] || exit 0\na=$(sed -n "s/^Address=//p" "$f")\n'
        'echo "2: ens3    inet $a brd 0.0.0.0 scope global ens3"\n'
    )
    for f in bindir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("FAILBACK_NETWORK", "1")
    monkeypatch.setenv("FAILBACK_DHCP_TIMEOUT", "2")
    monkeypatch.setenv("FAILBACK_START_SH", str(overlay / "usr/bin/start.sh"))
    monkeypatch.setenv("FAILBACK_ROOT", str(root))
    monkeypatch.setenv("FAILBACK_ADDR_TIMEOUT", "2")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    yield {"root": root, "log": log}


def addresses_from(root: Path):
    """What `ip` would show: the static file's address once start.sh wrote it."""

    def addresses() -> dict[str, list[str]]:
        files = list((root / "etc/systemd/network").glob("05-failback-static-*.network"))
        if not files:
            return {}
        addr = [ln.split("=", 1)[1] for ln in files[0].read_text().splitlines() if ln.startswith("Address=")]
        return {"ens3": addr}

    return addresses


def test_no_dhcp_prompts_applies_with_start_sh_and_sets_proxy(live: dict[str, object]) -> None:
    root = Path(str(live["root"]))
    con, out = console("\n192.168.10.20\n255.255.255.0\n192.168.10.1\n192.168.10.10\nhttp://10.0.2.2:3128\n")
    s = settings_for(root)
    nic = network.prepare_network(s, con, addresses=addresses_from(root))
    assert nic is not None and nic.addresses == ("192.168.10.20/24",)
    text = out.getvalue()
    assert "Network: no address after 2 s (no DHCP answer)." in text
    assert "OK: Network: 192.168.10.20/24 via 192.168.10.1, DNS 192.168.10.10 on ens3" in text
    assert f"HTTPS proxy http://10.0.2.2:3128 (prompt) for DRS and S3; {network.DIRECT_NOTE}." in text
    assert os.environ["https_proxy"] == "http://10.0.2.2:3128" == os.environ["HTTPS_PROXY"]
    written = (root / "etc/systemd/network/05-failback-static-ens3.network").read_text()
    assert "Address=192.168.10.20/24" in written and "DNS=192.168.10.10" in written
    assert (root / "run/failback/network.env").read_text() == (
        "https_proxy='http://10.0.2.2:3128'\nHTTPS_PROXY='http://10.0.2.2:3128'\n"
    )
    calls = Path(str(live["log"])).read_text().splitlines()
    assert calls == ["systemctl restart systemd-networkd.service"]  # RESTART_CLIENT=0: the client stays
    assert network.direct_note() == network.DIRECT_NOTE


def test_seed_static_applied_without_waiting_for_dhcp(live: dict[str, object]) -> None:
    root = Path(str(live["root"]))
    seed = parse_env("IPADDR=10.0.2.60\nNETMASK=24\nGATEWAY=10.0.2.2\nDNS=10.0.2.3\n", "volume FBSEED:x")
    con, out = console("")
    nic = network.prepare_network(settings_for(root, seed), con, addresses=addresses_from(root))
    assert nic is not None and nic.addresses == ("10.0.2.60/24",)
    assert "Network: static address from seed volume FBSEED:x line 1" in out.getvalue()
    assert "no address after" not in out.getvalue()


def test_no_address_with_no_prompt_is_an_error(live: dict[str, object]) -> None:
    root = Path(str(live["root"]))
    con, _ = console("")
    with pytest.raises(ConnectivityError, match="no network address after 2 s and --no-prompt forbids asking"):
        network.prepare_network(settings_for(root, None, "--no-prompt"), con, addresses=dict)
    assert not (root / "etc").exists()


def test_bad_static_from_start_sh_is_reported(live: dict[str, object]) -> None:
    root = Path(str(live["root"]))
    cfg = nv.StaticConfig("10.0.2.60", 24, "10.0.2.2", ("10.0.2.3",), "eth7")  # no such NIC
    con, out = console("")
    assert not network.apply_static(cfg, con)
    assert (
        "The static address was not applied: start.sh: error: NIC='eth7': no such network interface" in out.getvalue()
    )
    assert not (root / "etc").exists()


def test_dhcp_address_no_prompt_needed(live: dict[str, object]) -> None:
    root = Path(str(live["root"]))
    con, out = console("")
    nic = network.prepare_network(settings_for(root), con, addresses=lambda: {"ens3": ["10.0.2.15/24"]})
    assert nic is not None and "OK: Network ready: ens3 10.0.2.15/24" in out.getvalue()
    assert not Path(str(live["log"])).exists()


def test_not_managed_off_the_livecd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAILBACK_NETWORK", "0")
    con, out = console("")
    assert network.prepare_network(settings_for(fake_sys(tmp_path, {})), con) is None
    assert out.getvalue() == ""


def test_start_sh_proxy_only_and_bad_proxy(live: dict[str, object]) -> None:
    script = os.environ["FAILBACK_START_SH"]
    root = Path(str(live["root"]))
    ok = subprocess.run(
        ["dash", script],
        env={**os.environ, "HTTPS_PROXY": "10.0.2.2:3128"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "https_proxy='http://10.0.2.2:3128'" in (root / "run/failback/network.env").read_text()
    for bad, why in (
        ("http://p", "needs a port"),
        ("ftp://p:1", "must be written http://host:port"),
        ("http://p:99999", "port is not a number"),
        ("http://u:pa'ss@p:1", "quotes or spaces"),
    ):
        proc = subprocess.run(
            ["dash", script],
            env={
                **os.environ,
                "HTTPS_PROXY": bad,
                "CONFIG_NETWORK": "1",
                "IPADDR": "10.0.2.9",
                "NETMASK": "24",
                "GATEWAY": "10.0.2.2",
                "DNS": "10.0.2.3",
            },
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 2 and "error: HTTPS_PROXY: " in proc.stderr and why in proc.stderr, proc.stderr
        assert "pa'ss" not in proc.stderr
    assert not (root / "etc").exists()  # nothing changed by the refused runs
    gone = subprocess.run(
        ["dash", script], env={**os.environ, "HTTPS_PROXY": ""}, capture_output=True, text=True, check=False
    )
    assert gone.returncode == 0 and not (root / "run/failback/network.env").exists()


def test_url_seed_fetched_after_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading

    body = b"RECOVERY_INSTANCE_ID=i-0123456789abcdef0\nAWS_REGION=us-east-1\n"

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FAILBACK_NETWORK", "0")
        seed = parse_cmdline(
            f"failback.seed=http://127.0.0.1:{server.server_address[1]}/s.env failback.AWS_REGION=eu-west-1"
        )
        s = settings_for(fake_sys(tmp_path, {}), seed)
        con, out = console("")
        network.prepare_network(s, con)
    finally:
        server.shutdown()
        server.server_close()
    assert s.recovery_instance_id == "i-0123456789abcdef0" and s.region == "eu-west-1"
    assert s.origin["recovery_instance_id"].startswith("seed URL http://127.0.0.1:")
    assert "used: recovery_instance_id" in out.getvalue()


def test_after_start_sh_the_static_address_is_kept(live: dict[str, object]) -> None:
    """A client restarted by start.sh neither re-applies a seed's address nor talks about DHCP."""
    root = Path(str(live["root"]))
    env = {
        **os.environ,
        "CONFIG_NETWORK": "1",
        "RESTART_CLIENT": "0",
        "IPADDR": "10.0.2.70",
        "NETMASK": "24",
        "GATEWAY": "10.0.2.2",
        "DNS": "10.0.2.3",
    }
    assert subprocess.run(["dash", os.environ["FAILBACK_START_SH"]], env=env, check=False).returncode == 0
    seed = parse_env("IPADDR=10.0.2.60\nNETMASK=24\nGATEWAY=10.0.2.2\nDNS=10.0.2.3\n", "volume FBSEED:x")
    con, out = console("")
    nic = network.prepare_network(settings_for(root, seed), con, addresses=addresses_from(root))
    assert nic is not None and nic.addresses == ("10.0.2.70/24",)
    assert "static address set by /usr/bin/start.sh" in out.getvalue() and "DHCP" not in out.getvalue()


def test_wait_for_resolver_waits_for_resolveds_stub_file(tmp_path: Path) -> None:
    """/etc/resolv.conf is a symlink to systemd-resolved's stub file: lookups wait until resolved made it."""
    (tmp_path / "etc").mkdir()
    stub = tmp_path / "run/systemd/resolve/stub-resolv.conf"
    (tmp_path / "etc/resolv.conf").symlink_to(stub)
    now = [0.0]
    naps: list[float] = []

    def sleep(s: float) -> None:
        naps.append(s)
        now[0] += s
        if len(naps) == 3:  # resolved comes up while we wait
            stub.parent.mkdir(parents=True)
            stub.write_text("nameserver 127.0.0.53\n")

    assert network.wait_for_resolver(str(tmp_path), 30, sleep=sleep, clock=lambda: now[0]) is True
    assert len(naps) == 3


def test_wait_for_resolver_gives_up_after_its_timeout(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/resolv.conf").symlink_to(tmp_path / "run/missing")
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    assert network.wait_for_resolver(str(tmp_path), 2, sleep=sleep, clock=lambda: now[0]) is False
    assert now[0] >= 2
