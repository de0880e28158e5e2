"""The client's settings: program arguments first, then the launcher's environment variables.

The real LiveCD launcher passes AWS_REGION, AWS_ACCESS_KEY, AWS_SECRET_KEY, AWS_SESSION_TOKEN,
AWS_DRS_ENDPOINT (set but empty = --default-endpoint), RECOVERY_INSTANCE_ID, DEVICE_MAPPING and
NO_PROMPT; the standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION work too.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from failback_client.errors import UsageError
from failback_client.machine import ENV_SYSROOT
from failback_client.regions import default_endpoint

DM_VALUE_FORMATS: tuple[str, ...] = ("dev-name", "by-path", "by-id", "by-uuid", "all-strict")

# setting name -> (argument, environment variables in precedence order)
SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "access_key_id": ("--aws-access-key-id", ("AWS_ACCESS_KEY", "AWS_ACCESS_KEY_ID")),
    "secret_access_key": ("--aws-secret-access-key", ("AWS_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")),
    "session_token": ("--aws-session-token", ("AWS_SESSION_TOKEN",)),
    "region": ("--region", ("AWS_REGION", "AWS_DEFAULT_REGION")),
    "endpoint": ("--endpoint", ("AWS_DRS_ENDPOINT",)),
    "recovery_instance_id": ("--recovery-instance-id", ("RECOVERY_INSTANCE_ID",)),
    "device_mapping": ("--device-mapping", ("DEVICE_MAPPING",)),
}

# Test and development hooks (documented in --help); harmless on the LiveCD where they are unset.
ENV_S3_ENDPOINT = "FAILBACK_S3_ENDPOINT"  # S3 endpoint URL checked in step 12 instead of s3.{region}.amazonaws.com
ENV_CONSOLE_LOCK = "FAILBACK_CONSOLE_LOCK"  # set by the LiveCD units on tty1 and ttyS0: console arbitration
ENV_INCLUDE_LOOP = "FAILBACK_INCLUDE_LOOP"  # offer loop devices as local disks (tests on real loop devices)
ENV_PLAIN = "FAILBACK_PLAIN"  # force plain line output (no rich)
ENV_AGENT_PORT = "FAILBACK_AGENT_PORT"  # TCP port checked on the recovery instance instead of DRS's (1500)
ENV_FIX_CLOCK = "FAILBACK_FIX_CLOCK"  # 1: correct a skewed clock even off the LiveCD; 0: never correct it
ENV_REBOOT = "REBOOT"  # 0: after a completed failback, do not eject the medium and reboot (seed key too)
ENV_WORK_DIR = "FAILBACK_WORK_DIR"  # where the replication software is unpacked and runs (default /var/lib/failback)
ENV_CONVERT = "CONVERT"  # 0: leave the restored volumes as replicated (no conversion after the final sync)
ENV_CHECK_ONLY = "FAILBACK_CHECK_ONLY"  # 1: stop after the connectivity checks (guide step 12), write nothing

RECOVERY_INSTANCE_ID_RE = re.compile(r"^i-[0-9a-fA-F]{8,}$")
_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"", "0", "false", "no", "off", "n"}


def env_flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    if name not in env:
        return default
    value = env[name].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"environment variable {name}={env[name]!r} is not a yes/no value; use 1 or 0")


@dataclass
class Settings:
    """Everything the workflow needs from the admin. Secrets are kept out of repr()."""

    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    endpoint: str | None = None  # a custom endpoint URL, when one was given
    default_endpoint: bool = False  # --default-endpoint / AWS_DRS_ENDPOINT="" / Enter at the prompt
    recovery_instance_id: str | None = None
    dm_value_format: str = "dev-name"
    device_mapping: str | None = None
    no_prompt: bool = False
    log_console: bool = False
    log_file: str | None = None
    sysroot: str = "/"
    s3_endpoint: str | None = None
    console_lock: str | None = None
    include_loop: bool = False
    plain: bool = False
    fix_clock: bool | None = None  # None: only on the LiveCD
    agent_port: int | None = None
    reboot: bool = True  # eject the medium and reboot after a completed failback (LiveCD only)
    work_dir: str | None = None  # None: /var/lib/failback
    check_only: bool = False
    convert: bool = True  # adapt the restored system to this machine after the final sync (guide step 18)
    origin: dict[str, str] = field(default_factory=dict)  # setting -> "argument --x" / "variable X" / "prompt"
    seed: Any = field(default=None, repr=False)  # failback_client.seed.Seed read at start (client/SEED.md)

    @property
    def endpoint_known(self) -> bool:
        return self.default_endpoint or bool(self.endpoint)

    @property
    def endpoint_url(self) -> str:
        """The DRS endpoint to call (the regional default unless a custom one was given)."""
        if self.endpoint:
            return self.endpoint
        if not self.region:
            raise UsageError("the region must be known before the endpoint")
        return default_endpoint(self.region)

    def secrets(self) -> list[str]:
        """Values no output may show (the log redactor and the excepthook use them)."""
        return [s for s in (self.secret_access_key, self.session_token) if s]


def endpoint_problem(url: str) -> str | None:
    """None when `url` is a usable DRS endpoint (https, or http for a local control plane), else why not."""
    if not url or any(ch.isspace() for ch in url):
        return f"endpoint {url!r} must be a URL without spaces, e.g. https://drs.us-east-1.amazonaws.com"
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        return f"endpoint {url!r} must start with https:// (e.g. https://vpce-0abc.drs.us-east-1.vpce.amazonaws.com)"
    try:
        port = parts.port
    except ValueError:
        return f"endpoint {url!r} has an invalid port"
    host = parts.hostname or ""
    if not host:
        return f"endpoint {url!r} has no host name"
    if not _host_ok(host):
        return f"endpoint {url!r}: {host!r} is not a valid host name or IP address"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"endpoint {url!r} must not have a path, query or fragment; give only scheme, host and port"
    if parts.username or parts.password:
        return f"endpoint {url!r} must not contain a user name or password"
    del port
    return None


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels)


def normalize_endpoint(text: str) -> str:
    """Accept `host[:port]` as https://host[:port]; strip a trailing slash."""
    text = text.strip()
    if text and "://" not in text:
        text = "https://" + text
    return text.rstrip("/")


def from_arguments(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Combine parsed arguments and environment variables (arguments win). Validates what was given."""
    env = os.environ if env is None else env
    s = Settings()
    for name, (argument, variables) in SOURCES.items():
        value = getattr(args, name, None)
        if value is not None:
            setattr(s, name, value)
            s.origin[name] = f"argument {argument}"
            continue
        for var in variables:
            if var in env:
                if name == "endpoint" and env[var].strip() == "":
                    # The launcher's convention: AWS_DRS_ENDPOINT set but empty means --default-endpoint.
                    s.default_endpoint = True
                    s.origin[name] = f"variable {var} (empty: default endpoint)"
                    break
                if env[var] == "" and name != "session_token":
                    continue  # an empty variable does not supply a value
                setattr(s, name, env[var])
                s.origin[name] = f"variable {var}"
                break
    if args.default_endpoint:
        if args.endpoint is not None:
            raise UsageError("give either --endpoint or --default-endpoint, not both")
        s.endpoint = None
        s.default_endpoint = True
        s.origin["endpoint"] = "argument --default-endpoint"
    if s.endpoint is not None:
        s.endpoint = normalize_endpoint(s.endpoint)
        problem = endpoint_problem(s.endpoint)
        if problem:
            raise UsageError(f"{problem} (from {s.origin['endpoint']})")
    if s.region is not None:
        s.region = s.region.strip()
        from failback_client.regions import region_problem

        problem = region_problem(s.region)
        if problem:
            raise UsageError(f"{problem} (from {s.origin['region']})")
    if s.recovery_instance_id is not None:
        s.recovery_instance_id = s.recovery_instance_id.strip()
    s.dm_value_format = args.dm_value_format or "dev-name"
    s.no_prompt = bool(args.no_prompt) or env_flag(env, "NO_PROMPT")
    s.log_console = bool(args.log_console)
    s.log_file = args.log_file
    s.sysroot = env.get(ENV_SYSROOT) or "/"
    s.s3_endpoint = env.get(ENV_S3_ENDPOINT) or None
    s.console_lock = env.get(ENV_CONSOLE_LOCK) or None
    s.include_loop = env_flag(env, ENV_INCLUDE_LOOP)
    s.plain = env_flag(env, ENV_PLAIN)
    port = env.get(ENV_AGENT_PORT, "").strip()
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"environment variable {ENV_AGENT_PORT}={port!r} is not a TCP port number")
    s.agent_port = int(port) if port else None
    s.fix_clock = env_flag(env, ENV_FIX_CLOCK) if ENV_FIX_CLOCK in env else None
    s.reboot = not getattr(args, "no_reboot", False) and env_flag(env, ENV_REBOOT, default=True)
    s.work_dir = env.get(ENV_WORK_DIR) or None
    s.check_only = bool(getattr(args, "check_only", False)) or env_flag(env, ENV_CHECK_ONLY)
    s.convert = not getattr(args, "no_convert", False) and env_flag(env, ENV_CONVERT, default=True)
    return s


def missing_error(name: str, what: str) -> UsageError:
    """The --no-prompt error: names the argument and the variable(s) that would supply the value."""
    argument, variables = SOURCES[name]
    return UsageError(
        f"{what} is missing and --no-prompt forbids asking: give {argument} or set {' or '.join(variables)}"
    )


# ---- the seed (client/SEED.md): arguments > environment > seed > prompt --------------------------------------


def from_arguments_and_seed(args: argparse.Namespace, seed: Any, env: Mapping[str, str] | None = None) -> Settings:
    """from_arguments() with the seed's values below the environment's; origins name the seed and its line."""
    env = os.environ if env is None else env
    s = from_arguments(args, {**seed.env(), **env})
    _seed_origins(s, seed, env)
    s.seed = seed
    return s


def _seed_origins(s: Settings, seed: Any, env: Mapping[str, str]) -> None:
    for name, (_argument, variables) in SOURCES.items():
        origin = s.origin.get(name, "")
        for var in variables:
            if origin.startswith(f"variable {var}") and var not in env and var in seed:
                s.origin[name] = seed.values[var].origin + origin[len(f"variable {var}") :]


def fill_from_seed(s: Settings, seed: Any) -> list[str]:
    """Fill the settings still unset (no argument, variable or earlier seed gave them) from a later seed
    (the URL's, fetched once the network is up). Returns the names it filled."""
    later = from_arguments(
        argparse.Namespace(
            default_endpoint=False,
            endpoint=None,
            dm_value_format=None,
            no_prompt=False,
            log_console=False,
            log_file=None,
        ),
        seed.env(),
    )
    _seed_origins(later, seed, {})
    filled = []
    for name in SOURCES:
        if name not in s.origin and name in later.origin:
            setattr(s, name, getattr(later, name))
            s.origin[name] = later.origin[name]
            if name == "endpoint":
                s.default_endpoint = later.default_endpoint
            filled.append(name)
    if s.s3_endpoint is None and later.s3_endpoint:
        s.s3_endpoint = later.s3_endpoint
        filled.append("s3_endpoint")
    if s.agent_port is None and later.agent_port:
        s.agent_port = later.agent_port
        filled.append("agent_port")
    if not s.no_prompt and later.no_prompt:
        s.no_prompt = True
        filled.append("no_prompt")
    earlier = s.seed.values if s.seed is not None else {}
    if "REBOOT" in seed and "REBOOT" not in os.environ and "REBOOT" not in earlier and hasattr(later, "reboot"):
        s.reboot = later.reboot
        filled.append("reboot")
    if "CONVERT" in seed and "CONVERT" not in os.environ and "CONVERT" not in earlier:
        s.convert = later.convert
        filled.append("convert")
    return filled
