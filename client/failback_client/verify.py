"""Guide step 12: connectivity checks (TCP 1500 to the recovery instance, the DRS endpoint, regional S3)
and the initiation steps reported to DRS as they succeed or fail."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from failback_client.api import DrsApi
from failback_client.console import Console
from failback_client.drs_model import FAILBACK_INITIATION_STEPS as INITIATION_STEPS
from failback_client.errors import ClientError

log = logging.getLogger(__name__)

REPLICATION_PORT = 1500
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Target:
    what: str
    host: str
    port: int
    fix: str
    via_proxy: bool = False

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def tcp_problem(target: Target, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection opens, else one sentence naming host:port, the error and the likely fix."""
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout):
            return None
    except TimeoutError:
        why = f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        why = "connection refused"
    except socket.gaierror as e:
        why = f"the name does not resolve ({e.strerror})"
    except OSError as e:
        why = e.strerror or str(e)
    via = " through the HTTPS proxy" if target.via_proxy else ""
    return f"Cannot reach {target.what} at {target.address}{via}: {why}. {target.fix}"


def _url_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    return parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)


def https_proxy(env: os._Environ[str] | dict[str, str] | None = None) -> tuple[str, int] | None:
    env = os.environ if env is None else env
    value = env.get("https_proxy") or env.get("HTTPS_PROXY")
    return _url_target(value if "://" in (value or "") else f"http://{value}") if value else None


def replication_target(endpoint: dict[str, Any], instance: dict[str, Any], port_override: int | None = None) -> Target:
    """Where the recovery instance's replication agent listens: private or public IP per the failback
    replication configuration (usePrivateIP), port 1500 unless DRS says otherwise."""
    use_private = bool(endpoint.get("usePrivateIP"))
    host = endpoint.get("privateIP") if use_private else endpoint.get("publicIP")
    if not host:
        ips = [
            ip
            for nic in instance.get("recoveryInstanceProperties", {}).get("networkInterfaces", [])
            for ip in nic.get("ips", [])
        ]
        host = next((ip for ip in ips if _is_private(ip) == use_private), None)
    if not host:
        kind = "private" if use_private else "public"
        raise ClientError(
            f"Recovery instance {instance.get('recoveryInstanceID')} has no {kind} IP address: "
            + (
                "assign it a public IP or Elastic IP, or set usePrivateIP in its failback replication settings "
                "when a VPN/Direct Connect route exists"
                if not use_private
                else "check its network interface"
            ),
            exit_status=6,
        )
    kind = "private" if use_private else "public"
    port = port_override or int(endpoint.get("port") or REPLICATION_PORT)
    return Target(
        what=f"the recovery instance {instance.get('recoveryInstanceID')} ({kind} IP) on TCP {port}",
        host=host,
        port=port,
        fix=(
            f"Allow inbound TCP {port} in the recovery instance's security group"
            + (
                " and check the VPN/Direct Connect route to its private IP"
                if use_private
                else f" and outbound TCP {port} from this network"
            )
            + "; TLS-inspecting proxies break pairing"
        ),
    )


# Addresses reachable only over a private route (VPN/Direct Connect). Not ipaddress's is_private: that also
# counts documentation ranges (203.0.113.0/24...) which DRS examples use as public addresses.
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    )
)


def _is_private(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address.version == net.version and address in net for net in PRIVATE_NETWORKS)


def service_targets(
    drs_endpoint: str, region: str, s3_endpoint: str | None, env: dict[str, str] | None = None
) -> list[Target]:
    """The DRS endpoint and the regional S3 endpoint (through the HTTPS proxy when one is set)."""
    proxy = https_proxy(env)
    s3_url = s3_endpoint or f"https://s3.{region}.amazonaws.com"
    result = []
    for what, url, fix in (
        (
            "the DRS endpoint",
            drs_endpoint,
            "Allow outbound HTTPS (TCP 443) to it, check DNS and the default route, or set an HTTPS proxy",
        ),
        (
            "the regional S3 endpoint",
            s3_url,
            "Allow outbound HTTPS (TCP 443) to S3 (needed to download the replication software), or use a proxy",
        ),
    ):
        host, port = _url_target(url)
        if proxy:
            result.append(
                Target(
                    f"{what} {host}",
                    proxy[0],
                    proxy[1],
                    "Check the proxy address (https_proxy) and that it allows CONNECT to " + host,
                    via_proxy=True,
                )
            )
        else:
            result.append(Target(what, host, port, fix))
    return result


class StepReporter:
    """Keeps the initiation steps and reports all of them to DRS on each change."""

    def __init__(self, api: DrsApi, console: Console, client_id: str, recovery_instance_id: str) -> None:
        self.api = api
        self.console = console
        self.client_id = client_id
        self.recovery_instance_id = recovery_instance_id
        self.status = dict.fromkeys(INITIATION_STEPS, "NOT_STARTED")

    def set(self, name: str, status: str) -> None:
        self.status[name] = status
        shown = {"SUCCEEDED": self.console.ok, "FAILED": self.console.error}.get(status, self.console.info)
        shown(f"{name}: {status}")
        steps = [{"name": n, "status": s} for n, s in self.status.items()]
        try:
            self.api.report_steps(self.client_id, self.recovery_instance_id, steps)
        except ClientError as e:
            # Reporting is bookkeeping for the console's progress view; the checks themselves stand.
            self.console.warn(f"Could not report {name} to DRS: {e}")
