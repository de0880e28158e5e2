"""Boot-time networking for the failback client (guide step 5, issue 6).

Runs right after the summary line: shows every NIC (MAC, link, address) while DHCP runs, bounded by
FAILBACK_DHCP_TIMEOUT (the image's network.dhcp_timeout, 30 s like the real LiveCD). A static address from
the seed (IPADDR/NETMASK/GATEWAY/DNS[/NIC], kernel `failback.IPADDR=`...) or the standard kernel `ip=`
argument is applied at once instead of waiting; with no address at the end the admin is asked for one
(NIC, address, netmask or prefix, gateway, DNS, optional HTTPS proxy), each answer checked. Static addresses
are applied by `/usr/bin/start.sh` (CONFIG_NETWORK=1 RESTART_CLIENT=0), the same code the admin runs.

The HTTPS proxy goes into https_proxy/HTTPS_PROXY of this process, so botocore (DRS, S3), urllib and the
replication software (a child process) all use it; the replication stream to TCP 1500 is a direct TCP/TLS
connection and never uses it. Then the seed URL (failback.seed=) is fetched, through the proxy.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from failback_client import network_values as nv
from failback_client import seed as seedmod
from failback_client.console import Console
from failback_client.errors import ConnectivityError, UsageError
from failback_client.logs import REDACTOR
from failback_client.machine import _read, _under
from failback_client.settings import Settings, env_flag, fill_from_seed

log = logging.getLogger(__name__)

ENV_NETWORK = "FAILBACK_NETWORK"  # 1: manage the network even off the LiveCD; 0: never
ENV_DHCP_TIMEOUT = "FAILBACK_DHCP_TIMEOUT"  # seconds (the launcher sets the image's network.dhcp_timeout)
ENV_START_SH = "FAILBACK_START_SH"  # tests: another start.sh
DEFAULT_DHCP_TIMEOUT = 30
RESOLVER_WAIT_S = 30.0  # systemd-resolved normally starts within a second; minutes only on a very slow machine
START_SH = "/usr/bin/start.sh"
STATIC_GLOB_DIR = "/etc/systemd/network"
DIRECT_NOTE = "the replication stream (TCP 1500) goes direct, not through the HTTPS proxy"


@dataclass(frozen=True)
class Nic:
    name: str
    mac: str
    carrier: bool | None  # None: unknown (interface down)
    addresses: tuple[str, ...] = ()  # global IPv4 "a.b.c.d/prefix"

    def describe(self) -> str:
        link = {True: "link up", False: "no link", None: "link unknown"}[self.carrier]
        addr = ", ".join(self.addresses) if self.addresses else "no address yet"
        return f"{self.name}  {self.mac or '?'}  {link}  {addr}"


def ip_addresses() -> dict[str, list[str]]:
    """Global IPv4 addresses per interface, from `ip -j -4 addr show`."""
    try:
        proc = subprocess.run(
            ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=10, check=False
        )
        data = json.loads(proc.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("cannot list addresses: %s", e)
        return {}
    result: dict[str, list[str]] = {}
    for link in data:
        for a in link.get("addr_info", []):
            if a.get("family") == "inet" and a.get("scope") == "global":
                result.setdefault(link.get("ifname", "?"), []).append(f"{a['local']}/{a['prefixlen']}")
    return result


def list_nics(sysroot: str = "/", addresses: Callable[[], dict[str, list[str]]] = ip_addresses) -> list[Nic]:
    """Physical Ethernet NICs (they have a `device`; lo, bridges and tunnels do not), sorted by name."""
    base = _under(sysroot, "/sys/class/net")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    addrs = addresses()
    nics = []
    for name in names:
        d = os.path.join(base, name)
        if not os.path.exists(os.path.join(d, "device")) or _read(os.path.join(d, "type")) not in ("", "1"):
            continue
        carrier = _read(os.path.join(d, "carrier"))
        nics.append(
            Nic(
                name,
                _read(os.path.join(d, "address")),
                True if carrier == "1" else False if carrier == "0" else None,
                tuple(addrs.get(name, [])),
            )
        )
    return nics


# ---- where the settings come from -----------------------------------------------------------------------


@dataclass
class NetworkPlan:
    dhcp_timeout: int = DEFAULT_DHCP_TIMEOUT
    static: nv.StaticConfig | None = None
    static_origin: str = ""
    proxy: str | None = None
    proxy_origin: str = ""
    warnings: list[str] = field(default_factory=list)


def parse_ip_arg(cmdline: str) -> tuple[nv.StaticConfig | None, str | None]:
    """The kernel's `ip=` (last one wins, as in the kernel): `ip=dhcp`, or
    `ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>`, plus dracut's
    `nameserver=`. Returns (static config or None, the ip= text)."""
    words = seedmod.cmdline_args(cmdline)
    ips = [w[3:] for w in words if w.startswith("ip=")]
    nameservers = [w[11:] for w in words if w.startswith("nameserver=")]
    if not ips:
        return None, None
    text = ips[-1]
    fields = text.split(":")
    if len(fields) == 1 or (len(fields) == 2 and fields[1] in ("dhcp", "on", "any")):
        if fields[-1] in ("dhcp", "on", "any", "auto", "off", "none", "dhcp6", "auto6", "link-local", ""):
            return None, text  # DHCP (what happens anyway) or no autoconfiguration
        raise UsageError(
            f"kernel argument ip={text}: not a form this LiveCD knows; use ip=dhcp or "
            "ip=<address>::<gateway>:<netmask>:<hostname>:<nic>:none:<dns>"
        )
    fields += [""] * (9 - len(fields))
    client, _server, gateway, netmask, hostname, device, autoconf, dns0, dns1 = fields[:9]
    if not client or autoconf in ("dhcp", "on", "any", "dhcp6", "auto6"):
        return None, text
    dns = [d for d in (dns0, dns1, *nameservers) if d]
    values = {"IPADDR": client, "NETMASK": netmask, "GATEWAY": gateway, "DNS": ",".join(dns), "NIC": device}
    try:
        cfg = nv.static_config(values)
    except ValueError as e:
        raise UsageError(
            f"kernel argument ip={text}: {e} (form: ip=<address>::<gateway>:<netmask>:<hostname>:"
            "<nic>:none:<dns0>:<dns1>, or add nameserver=<dns>)"
        ) from None
    return nv.StaticConfig(cfg.address, cfg.prefix, cfg.gateway, cfg.dns, cfg.nic, hostname or None), text


def plan(settings: Settings, env: dict[str, str] | os._Environ[str] | None = None, cmdline: str = "") -> NetworkPlan:
    """What to do: timeout, a static address (seed > ip=), the HTTPS proxy (environment > seed)."""
    env = os.environ if env is None else env
    p = NetworkPlan()
    raw = env.get(ENV_DHCP_TIMEOUT, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise UsageError(f"{ENV_DHCP_TIMEOUT}={raw!r} is not a number of seconds (1 or more)")
        p.dhcp_timeout = int(raw)
    seed = settings.seed
    if seed is not None and "IPADDR" in seed:
        values = {k: seed.get(k) or "" for k in (*seedmod.STATIC_KEYS, "NIC")}
        p.static = nv.static_config(values)  # already checked when the seed was read
        p.static_origin = seed.values["IPADDR"].origin
    else:
        static, text = parse_ip_arg(cmdline)
        if static is not None:
            p.static, p.static_origin = static, f"kernel argument ip={text}"
    for var in ("https_proxy", "HTTPS_PROXY"):
        if env.get(var):
            p.proxy, p.proxy_origin = env[var], f"variable {var}"
            break
    else:
        if seed is not None and seed.get("HTTPS_PROXY"):
            p.proxy, p.proxy_origin = seed.get("HTTPS_PROXY"), seed.values["HTTPS_PROXY"].origin
    if p.proxy:
        problem = nv.proxy_problem(p.proxy)
        if problem:
            raise UsageError(f"{problem} (from {p.proxy_origin})")
        REDACTOR.add(nv.proxy_password(p.proxy))
    return p


# ---- doing it --------------------------------------------------------------------------------------------


Runner = Callable[[list[str], dict[str, str]], "subprocess.CompletedProcess[str]"]


def _run_start_sh(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False)


def apply_static(
    cfg: nv.StaticConfig, console: Console, *, proxy: str | None = None, runner: Runner = _run_start_sh
) -> bool:
    """Configure `cfg` with start.sh (which checks again, writes the networkd file, restarts networkd and
    waits for the address). True when the address came up; the reason is shown otherwise."""
    env = {**cfg.env(), "CONFIG_NETWORK": "1", "RESTART_CLIENT": "0"}
    if proxy is not None:
        env["HTTPS_PROXY"] = proxy
    console.info(f"Network: configuring the static address {cfg.describe()}…")
    proc = runner([os.environ.get(ENV_START_SH) or START_SH], env)
    for line in (proc.stdout + proc.stderr).splitlines():
        log.info("start.sh: %s", line)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        console.error(f"The static address was not applied: {detail[-1] if detail else f'exit {proc.returncode}'}")
        return False
    console.ok(f"Network: {cfg.describe()}")
    return True


def apply_proxy(proxy: str | None, origin: str, console: Console) -> None:
    """Every HTTPS call of this process and its children goes through `proxy` from now on."""
    if not proxy:
        return
    url = nv.proxy_url(proxy)
    REDACTOR.add(nv.proxy_password(url))
    os.environ["https_proxy"] = url
    os.environ["HTTPS_PROXY"] = url
    console.info(f"HTTPS proxy {nv.proxy_display(url)} ({origin}) for DRS and S3; {DIRECT_NOTE}.")


def wait_for_address(
    console: Console,
    timeout: float,
    *,
    sysroot: str = "/",
    addresses: Callable[[], dict[str, list[str]]] = ip_addresses,
    nic: str | None = None,
    poll: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Nic | None:
    """Show each NIC and every change of its link or address until one (or `nic`) has a global IPv4
    address, or `timeout` seconds pass."""
    start = clock()
    shown: dict[str, Nic] = {}
    while True:
        nics = list_nics(sysroot, addresses)
        if not nics and not shown:
            shown[""] = Nic("", "", None)
            console.warn("Network: no network card found yet (check the NIC and its driver)")
        for n in nics:
            if shown.get(n.name) != n:
                shown[n.name] = n
                console.info(f"Network: {n.describe()}")
        ready = [n for n in nics if n.addresses and (nic is None or n.name == nic)]
        if ready:
            return ready[0]
        if clock() - start >= timeout:
            return None
        sleep(poll)


def _ask(console: Console, prompt: str, check: Callable[[str], str | None], default: str | None = None) -> str:
    while True:
        answer = console.ask(prompt).strip()
        if not answer and default is not None:
            return default
        problem = check(answer)
        if problem is None:
            return answer
        console.error(f"{problem}. Please try again.")


def prompt_static(console: Console, nics: list[Nic]) -> tuple[nv.StaticConfig, str | None]:
    """Ask for NIC, address, netmask or prefix, gateway, DNS and an optional HTTPS proxy; each re-asked with
    the reason until valid."""
    nic = None
    if nics:
        console.info("Network cards:")
        for i, n in enumerate(nics, 1):
            console.info(f"  {i}) {n.describe()}")
        default_nic = next((n for n in nics if n.carrier), nics[0])
        names = [n.name for n in nics]

        def nic_check(answer: str) -> str | None:
            if answer in names or (answer.isdigit() and 1 <= int(answer) <= len(nics)):
                return None
            return f"{answer!r} is not one of the network cards above; give its number or name"

        answer = _ask(console, f"Network card [{default_nic.name}]: ", nic_check, default=default_nic.name)
        nic = nics[int(answer) - 1].name if answer.isdigit() else answer
    address = _ask(console, "IPv4 address (e.g. 192.168.10.20): ", nv.ipv4_problem)
    netmask = _ask(console, "Subnet mask or prefix length (e.g. 255.255.255.0 or 24): ", nv.netmask_problem)
    gateway = _ask(console, "Default gateway (e.g. 192.168.10.1): ", lambda a: nv.gateway_problem(a, address, netmask))
    dns = _ask(console, "DNS server(s), separated by commas (e.g. 192.168.10.10): ", nv.dns_problem)
    proxy = _ask(
        console, "HTTPS proxy (http://host:port; press Enter for none): ", lambda a: nv.proxy_problem(a), default=""
    )
    cfg = nv.static_config({"IPADDR": address, "NETMASK": netmask, "GATEWAY": gateway, "DNS": dns, "NIC": nic or ""})
    return cfg, (nv.proxy_url(proxy) if proxy else None)


def _manage(settings: Settings) -> bool:
    """On the LiveCD (or with FAILBACK_NETWORK=1), unless FAILBACK_NETWORK=0."""
    if ENV_NETWORK in os.environ:
        return env_flag(os.environ, ENV_NETWORK)
    return settings.sysroot in ("", "/") and os.path.isdir("/run/live/medium") and os.geteuid() == 0


def _static_configured(sysroot: str) -> bool:
    d = _under(sysroot, STATIC_GLOB_DIR)
    try:
        return any(f.startswith("05-failback-static-") and f.endswith(".network") for f in os.listdir(d))
    except OSError:
        return False


def prepare_network(
    settings: Settings,
    console: Console,
    *,
    runner: Runner = _run_start_sh,
    addresses: Callable[[], dict[str, list[str]]] = ip_addresses,
) -> Nic | None:
    """The network step between the summary line and the credentials (see the module's docstring)."""
    cmdline = seedmod.read_cmdline(settings.sysroot)
    p = plan(settings, os.environ, cmdline)
    if settings.seed is not None:
        for warning in settings.seed.warnings:
            console.warn(warning)
    if not _manage(settings):
        log.info("network: not managed here (not the LiveCD; FAILBACK_NETWORK=1 forces it)")
        apply_proxy(p.proxy, p.proxy_origin, console)
        _fetch_url_seed(settings, console)
        return None
    ready: Nic | None = None
    if _static_configured(settings.sysroot):
        console.info("Network: static address set by /usr/bin/start.sh (CONFIG_NETWORK=1); waiting for it…")
    elif p.static is not None:
        console.claim_or_wait()  # only one console's instance configures the network
        console.info(f"Network: static address from {p.static_origin}")
        if not apply_static(p.static, console, runner=runner):
            raise ConnectivityError(
                f"the static address from {p.static_origin} did not come up; check the values "
                "and the cable, or run CONFIG_NETWORK=1 /usr/bin/start.sh from the tty2 shell"
            )
    else:
        console.info(f"Network: DHCP on every network card with a link (up to {p.dhcp_timeout} s)…")
    ready = wait_for_address(console, p.dhcp_timeout, sysroot=settings.sysroot, addresses=addresses)
    while ready is None:
        console.warn(f"Network: no address after {p.dhcp_timeout} s (no DHCP answer).")
        if settings.no_prompt:
            raise ConnectivityError(
                f"no network address after {p.dhcp_timeout} s and --no-prompt forbids asking: give IPADDR, NETMASK, "
                "GATEWAY and DNS in the seed or the kernel command line (ip=... or failback.IPADDR=...), or run "
                "IPADDR=... NETMASK=... GATEWAY=... DNS=... CONFIG_NETWORK=1 /usr/bin/start.sh from the tty2 shell"
            )
        console.info("Configure a static IPv4 address:")
        cfg, proxy = prompt_static(console, list_nics(settings.sysroot, addresses))
        if apply_static(cfg, console, proxy=proxy, runner=runner):
            if proxy:
                p.proxy, p.proxy_origin = proxy, "prompt"
            ready = wait_for_address(console, 10, sysroot=settings.sysroot, addresses=addresses, nic=cfg.nic)
    console.ok(f"Network ready: {ready.name} {', '.join(ready.addresses)}")
    if not wait_for_resolver(settings.sysroot):
        console.warn(
            f"Network: name resolution (systemd-resolved) is not up after {RESOLVER_WAIT_S:.0f} s; "
            "host names may not resolve (see `systemctl status systemd-resolved` on tty2)"
        )
    apply_proxy(p.proxy, p.proxy_origin, console)
    _fetch_url_seed(settings, console)
    return ready


def wait_for_resolver(
    sysroot: str,
    timeout: float = RESOLVER_WAIT_S,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """The LiveCD's /etc/resolv.conf is systemd-resolved's stub file, which exists once resolved runs. The
    client starts before resolved (its unit does not wait for sysinit.target, so the summary line shows at
    once), so the first name lookup waits for that file. False when it did not appear in time."""
    path = _under(sysroot, "/etc/resolv.conf")
    deadline = clock() + timeout
    while not os.path.exists(path):  # follows the symlink: False while its target is missing
        if clock() >= deadline:
            return False
        sleep(0.2)
    return True


def _fetch_url_seed(settings: Settings, console: Console) -> None:
    seed = settings.seed
    if seed is None or not seed.url:
        return
    shown = seed.url.split("@")[-1] if "@" in seed.url else seed.url
    console.info(f"Fetching the seed {shown}…")
    fetched = seedmod.fetch_url(seed.url, proxy=os.environ.get("https_proxy") or None)
    for warning in fetched.warnings:
        console.warn(warning)
    seed.merge_below(fetched)
    filled = fill_from_seed(settings, fetched)
    console.ok(f"Seed {shown}: {len(fetched.values)} setting(s), used: {', '.join(filled) or 'none new'}")


def direct_note() -> str | None:
    """For the connectivity check: what to say about TCP 1500 when an HTTPS proxy is set."""
    return DIRECT_NOTE if (os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")) else None
