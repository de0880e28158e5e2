"""The seed: unattended settings from a FBSEED volume, a URL on the kernel command line, or inline
`failback.KEY=value` kernel arguments (client/SEED.md is the specification).

Precedence is arguments > environment > seed > prompt (settings.from_arguments applies it); between seed
sources, inline kernel arguments > volume > URL (the URL is fetched once the network is up and only fills
what is still missing). Values of secret keys never appear in an error message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import yaml

from failback_client import network_values as nv
from failback_client.errors import UsageError
from failback_client.machine import _under

log = logging.getLogger(__name__)

SEED_LABEL = "FBSEED"
SEED_FILES = ("failback-seed.env", "failback-seed.yaml", "failback-seed.yml")
MAX_SEED_BYTES = 64 * 1024
URL_TIMEOUT_S = 30.0
CMDLINE_PREFIX = "failback."
CMDLINE_URL_KEY = "failback.seed"

CLIENT_KEYS: tuple[str, ...] = (
    "AWS_REGION",
    "AWS_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DRS_ENDPOINT",
    "RECOVERY_INSTANCE_ID",
    "DEVICE_MAPPING",
    "NO_PROMPT",
    "FAILBACK_S3_ENDPOINT",
    "FAILBACK_AGENT_PORT",
)
NETWORK_KEYS: tuple[str, ...] = ("IPADDR", "NETMASK", "GATEWAY", "DNS", "NIC", "HTTPS_PROXY")
STATIC_KEYS: tuple[str, ...] = ("IPADDR", "NETMASK", "GATEWAY", "DNS")
KEYS: tuple[str, ...] = (*CLIENT_KEYS, *NETWORK_KEYS, "REBOOT", "CONVERT")
SECRET_KEYS: frozenset[str] = frozenset({"AWS_SECRET_KEY", "AWS_SESSION_TOKEN"})
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SeedError(UsageError):
    """A seed that cannot be read or is malformed; the message names source, line and key (never a secret)."""


# ---- values -----------------------------------------------------------------------------------------------


def yes_no(value: str) -> bool | None:
    v = value.strip().lower()
    return True if v in _TRUE else False if v in _FALSE else None


def _url_problem(value: str) -> str | None:
    from failback_client.settings import endpoint_problem, normalize_endpoint

    return endpoint_problem(normalize_endpoint(value))


def value_problem(key: str, value: str) -> str | None:
    """None when `value` is acceptable for `key`, else the reason (secret values are never quoted)."""
    from failback_client.mapping import MappingError, parse_device_mapping
    from failback_client.prompts import access_key_problem, secret_problem
    from failback_client.regions import region_problem
    from failback_client.settings import RECOVERY_INSTANCE_ID_RE

    v = value.strip()
    if key == "AWS_REGION":
        return region_problem(v)
    if key == "AWS_ACCESS_KEY":
        return access_key_problem(v)
    if key == "AWS_SECRET_KEY":
        return secret_problem(value)
    if key == "AWS_SESSION_TOKEN":
        return "the session token has no spaces" if any(c.isspace() for c in v) else None
    if key == "AWS_DRS_ENDPOINT":
        return None if v == "" else _url_problem(v)  # empty: the default endpoint
    if key == "FAILBACK_S3_ENDPOINT":
        return _url_problem(v)
    if key == "RECOVERY_INSTANCE_ID":
        return (
            None
            if RECOVERY_INSTANCE_ID_RE.match(v)
            else f"{v!r} is not a recovery instance ID (i- followed by hex digits, e.g. i-0123456789abcdef0)"
        )
    if key == "DEVICE_MAPPING":
        try:
            parse_device_mapping(v)
        except MappingError as e:
            return f"not a device mapping: {e.reason}"
        return None
    if key in ("NO_PROMPT", "REBOOT", "CONVERT"):
        return None if yes_no(v) is not None else f"{v!r} is not a yes/no value; use 1 or 0"
    if key == "FAILBACK_AGENT_PORT":
        return None if v.isdigit() and 0 < int(v) < 65536 else f"{v!r} is not a TCP port number (1-65535)"
    if key in ("IPADDR", "GATEWAY"):
        return nv.ipv4_problem(v)
    if key == "NETMASK":
        return nv.netmask_problem(v)
    if key == "DNS":
        return nv.dns_problem(v)
    if key == "NIC":
        return nv.nic_problem(v)
    if key == "HTTPS_PROXY":
        return nv.proxy_problem(v)
    raise KeyError(key)


def key_problem(key: str) -> str | None:
    if key in KEYS:
        return None
    if key.upper() in KEYS:
        return f"unknown key {key!r}: keys are upper case, did you mean {key.upper()}?"
    return f"unknown key {key!r}; known keys: {', '.join(KEYS)}"


def secrets_of(key: str, value: str) -> list[str]:
    """The parts of a value that must never be shown."""
    if key in SECRET_KEYS:
        return [value, value.strip()]
    if key == "HTTPS_PROXY":
        password = nv.proxy_password(value)
        return [password] if password else []
    return []


@dataclass(frozen=True)
class SeedValue:
    key: str
    value: str = field(repr=False)
    source: str  # "volume FBSEED:failback-seed.env", "kernel command line", "URL http://..."
    line: int | None = None

    @property
    def origin(self) -> str:
        return f"seed {self.source}" + (f" line {self.line}" if self.line else "")


@dataclass
class Seed:
    """Seed values by key (highest-precedence source already chosen) and the sources that were read."""

    values: dict[str, SeedValue] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    url: str | None = None  # failback.seed=<url>, fetched once the network is up
    warnings: list[str] = field(default_factory=list)

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def get(self, key: str) -> str | None:
        item = self.values.get(key)
        return None if item is None else item.value

    def env(self) -> dict[str, str]:
        return {k: v.value for k, v in self.values.items()}

    def secrets(self) -> list[str]:
        return [s for v in self.values.values() for s in secrets_of(v.key, v.value) if s]

    def merge_below(self, other: Seed) -> None:
        """Add `other`'s values where this seed has none (this seed has the higher precedence)."""
        for key, value in other.values.items():
            self.values.setdefault(key, value)
        self.sources.extend(other.sources)
        self.warnings.extend(other.warnings)

    def describe(self) -> str:
        keys = ", ".join(f"{k}=****" if k in SECRET_KEYS else k for k in self.values)
        return f"seed from {' + '.join(self.sources) or 'nowhere'}: {keys or 'no keys'}"


def _check(items: Iterable[tuple[str, str, int | None]], source: str) -> Seed:
    """Validate (key, value, line) triples from one source into a Seed; SeedError on the first problem."""
    from failback_client.logs import REDACTOR

    seed = Seed(sources=[source])
    for key, value, line in items:
        where = f"seed {source}" + (f" line {line}" if line else "")
        problem = key_problem(key)
        if problem:
            raise SeedError(f"{where}: {problem}")
        REDACTOR.add(*secrets_of(key, value))  # before anything can print it
        if key in seed.values:
            first = seed.values[key].line
            raise SeedError(f"{where}: {key} is given twice" + (f" (first on line {first})" if first else ""))
        problem = value_problem(key, value)
        if problem:
            raise SeedError(f"{where}: {key}: {problem}")
        seed.values[key] = SeedValue(key, value.strip() if key not in SECRET_KEYS else value, source, line)
    present = [k for k in STATIC_KEYS if k in seed.values]
    if present and len(present) != len(STATIC_KEYS):
        missing = [k for k in STATIC_KEYS if k not in seed.values]
        raise SeedError(
            f"seed {source}: {', '.join(present)} given without {', '.join(missing)}: a static "
            "address needs IPADDR, NETMASK, GATEWAY and DNS together"
        )
    if len(present) == len(STATIC_KEYS):
        try:
            nv.static_config(seed.env())
        except ValueError as e:
            raise SeedError(f"seed {source}: {e}") from None
    return seed


# ---- formats ----------------------------------------------------------------------------------------------


def _env_value(raw: str, where: str) -> str:
    """The value part of KEY=value: quoted '...' / "..." or a bare word, then optionally ` # comment`."""
    if raw[:1] in ("'", '"'):
        quote = raw[0]
        out: list[str] = []
        i = 1
        while i < len(raw):
            ch = raw[i]
            if quote == '"' and ch == "\\" and i + 1 < len(raw) and raw[i + 1] in '"\\$`':
                out.append(raw[i + 1])
                i += 2
                continue
            if ch == quote:
                rest = raw[i + 1 :].strip()
                if rest and not rest.startswith("#"):
                    raise SeedError(f"{where}: text after the closing quote; put a comment after ' #'")
                return "".join(out)
            out.append(ch)
            i += 1
        raise SeedError(f"{where}: the value's {quote} quote is not closed (values are one line)")
    value = raw.partition(" #")[0]
    value = value.split("\t#")[0].rstrip()
    if any(c.isspace() for c in value):
        raise SeedError(f'{where}: the value has spaces; quote it, e.g. KEY="a b"')
    if value.startswith("#"):
        return ""
    return value


def parse_env(text: str, source: str) -> Seed:
    """The env format: KEY=value lines (see SEED.md). Parsed, never run by a shell."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[7:].lstrip()
        key, eq, raw = stripped.partition("=")
        key = key.rstrip()
        where = f"seed {source} line {number}"
        if not eq or not _KEY_RE.match(key) or key != stripped.partition("=")[0]:
            name = key if _KEY_RE.match(key) else "the line"
            raise SeedError(f"{where}: {name}: expected KEY=value with no space around '=' (e.g. AWS_REGION=eu-west-1)")
        items.append((key, _env_value(raw, f"{where}: {key}"), number))
    return _check(items, source)


def _yaml_scalar(node: yaml.Node, key: str, where: str) -> str:
    if isinstance(node, yaml.ScalarNode):
        if node.tag == "tag:yaml.org,2002:null":
            return ""
        if node.tag == "tag:yaml.org,2002:bool":
            return "1" if yaml.safe_load(node.value) else "0"
        return str(node.value)
    if key == "DEVICE_MAPPING" and isinstance(node, yaml.MappingNode):
        pairs = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or not isinstance(v, yaml.ScalarNode):
                raise SeedError(f"{where}: DEVICE_MAPPING: each entry is 'recovery device: local device or EXCLUDE'")
            pairs[str(k.value)] = str(v.value)
        return json.dumps(pairs)
    raise SeedError(f"{where}: {key}: the value must be a single value, not a list or mapping")


def parse_yaml(text: str, source: str) -> Seed:
    """The YAML format: one mapping of the same keys; line numbers come from the YAML nodes."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise SeedError(f"seed {source}{line}: {problem}") from None
    if root is None:
        return _check([], source)
    if not isinstance(root, yaml.MappingNode):
        raise SeedError(f"seed {source} line {root.start_mark.line + 1}: the seed must be a mapping of KEY: value")
    items = []
    for k, v in root.value:
        line = k.start_mark.line + 1
        where = f"seed {source} line {line}"
        if not isinstance(k, yaml.ScalarNode):
            raise SeedError(f"{where}: keys must be names such as AWS_REGION")
        items.append((str(k.value), _yaml_scalar(v, str(k.value), where), line))
    return _check(items, source)


def parse(text: str, source: str, *, yaml_format: bool) -> Seed:
    return parse_yaml(text, source) if yaml_format else parse_env(text, source)


def _decode(data: bytes, source: str) -> str:
    if len(data) > MAX_SEED_BYTES:
        raise SeedError(f"seed {source}: larger than {MAX_SEED_BYTES // 1024} KiB; a seed is a few lines")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SeedError(f"seed {source} line {line}: not UTF-8 text") from None


# ---- the kernel command line ------------------------------------------------------------------------------


def cmdline_args(text: str) -> list[str]:
    """Kernel command line words; the kernel lets a value be double-quoted (key="a b")."""
    try:
        return [w for w in shlex.split(text, posix=True)]
    except ValueError:
        return text.split()


def parse_cmdline(text: str) -> Seed:
    """Inline `failback.KEY=value` arguments (keys in any case) and `failback.seed=<url>`."""
    source = "kernel command line"
    items = []
    url = None
    for word in cmdline_args(text):
        if not word.lower().startswith(CMDLINE_PREFIX):
            continue
        name, eq, value = word.partition("=")
        if name.lower() == CMDLINE_URL_KEY:
            if not re.match(r"^https?://[^\s]+$", value):
                raise SeedError(
                    f"seed {source}: {CMDLINE_URL_KEY}: give an http:// or https:// URL, "
                    f"e.g. {CMDLINE_URL_KEY}=http://10.0.0.5/seeds/server1.env"
                )
            url = value
            continue
        key = name[len(CMDLINE_PREFIX) :].upper()
        if not eq:
            raise SeedError(f"seed {source}: {name}: give a value, e.g. {name}=...")
        if key not in KEYS:
            raise SeedError(f"seed {source}: {name}: unknown key {key}; known keys: {', '.join(KEYS)}")
        items.append((key, value, None))
    seed = _check(items, source)
    seed.url = url
    if not items:
        seed.sources = []
    return seed


# ---- the FBSEED volume ------------------------------------------------------------------------------------


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def find_volume(sysroot: str = "/", runner: Runner = _run) -> str | None:
    """The FBSEED device (or, under a recorded sysroot, a directory standing for its contents)."""
    link = _under(sysroot, f"/dev/disk/by-label/{SEED_LABEL}")
    if os.path.isdir(link) and sysroot not in ("", "/"):
        return link
    if os.path.exists(link):
        return os.path.realpath(link)
    if sysroot not in ("", "/") or not shutil.which("blkid"):
        return None
    # udev may not have made the by-label link yet (or at all, in a container): ask blkid itself.
    proc = runner(["blkid", "-L", SEED_LABEL])
    device = proc.stdout.strip()
    return device if proc.returncode == 0 and device else None


def _read_dir(directory: str, source_prefix: str) -> Seed:
    present = [name for name in SEED_FILES if os.path.isfile(os.path.join(directory, name))]
    if not present:
        raise SeedError(
            f"seed {source_prefix}: the volume holds none of {', '.join(SEED_FILES)}; put the settings "
            "in failback-seed.env (see `inv seed`)"
        )
    name = present[0]
    source = f"{source_prefix}:{name}"
    with open(os.path.join(directory, name), "rb") as f:
        data = f.read(MAX_SEED_BYTES + 1)
    seed = parse(_decode(data, source), source, yaml_format=not name.endswith(".env"))
    if len(present) > 1:
        seed.warnings.append(f"the {SEED_LABEL} volume holds {' and '.join(present)}: read {name} only")
    return seed


def read_volume(device: str, runner: Runner = _run, mount_base: str = "/run") -> Seed:
    """Mount the seed volume read-only on a private directory, read the seed, unmount."""
    source = f"volume {SEED_LABEL}"
    if os.path.isdir(device):
        return _read_dir(device, source)
    os.makedirs(mount_base, exist_ok=True)
    target = tempfile.mkdtemp(prefix="failback-seed-", dir=mount_base)
    try:
        proc = runner(["mount", "-o", "ro,nodev,nosuid,noexec", device, target])
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            why = detail[0].strip() if detail else "mount failed"
            raise SeedError(
                f"seed {source}: cannot mount {device} read-only ({why}); check the volume "
                f"(mkfs.vfat -n {SEED_LABEL}, or `inv seed`)"
            )
        try:
            return _read_dir(target, source)
        finally:
            runner(["umount", target])
    finally:
        try:
            os.rmdir(target)
        except OSError:
            log.warning("could not remove the seed mount point %s", target)


# ---- the URL ----------------------------------------------------------------------------------------------


def fetch_url(url: str, *, proxy: str | None = None, timeout: float = URL_TIMEOUT_S) -> Seed:
    """GET the seed over HTTP(S); an HTTPS URL goes through `proxy` (the HTTPS proxy) when one is set."""
    shown = re.sub(r"//[^/@]*@", "//", url)  # never show user:password of the URL
    source = f"URL {shown}"
    proxies = {"https": nv.proxy_url(proxy)} if proxy else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    try:
        with opener.open(
            urllib.request.Request(url, headers={"User-Agent": "failback-client-seed"}), timeout=timeout
        ) as response:
            data = response.read(MAX_SEED_BYTES + 1)
            ctype = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raise SeedError(f"seed {source}: the server answered {e.code} {e.reason}; check the URL") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        via = f" through the HTTPS proxy {nv.proxy_display(proxy)}" if proxy and url.startswith("https:") else ""
        raise SeedError(
            f"seed {source}: cannot fetch it{via}: {reason}; check the URL, the network and the proxy"
        ) from None
    path = urllib.parse.urlsplit(url).path
    yaml_format = path.endswith((".yaml", ".yml")) or "yaml" in ctype
    seed = parse(_decode(data, source), source, yaml_format=yaml_format)
    for key in [k for k in seed.values if k in NETWORK_KEYS and k != "HTTPS_PROXY"]:
        seed.values.pop(key)
        seed.warnings.append(f"seed {source}: {key} ignored: the network is already up when a URL seed is read")
    return seed


# ---- everything local -------------------------------------------------------------------------------------


def read_cmdline(sysroot: str = "/") -> str:
    try:
        with open(_under(sysroot, "/proc/cmdline"), encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def load_local(sysroot: str = "/", runner: Runner = _run, mount_base: str = "/run") -> Seed:
    """The seed from the kernel command line and the FBSEED volume (no network needed). The URL, if any,
    is in `.url` for fetch_url() once the network is up."""
    seed = parse_cmdline(read_cmdline(sysroot))
    device = find_volume(sysroot, runner)
    if device:
        seed.merge_below(read_volume(device, runner, mount_base))
    log.info("%s", seed.describe())
    return seed


def add_url_seed(seed: Seed, proxy: str | None = None) -> Seed:
    """Fetch `seed.url` (if any) and add its values below the kernel arguments' and the volume's."""
    if not seed.url:
        return seed
    seed.merge_below(fetch_url(seed.url, proxy=proxy))
    log.info("%s", seed.describe())
    return seed


def env_with_seed(env: Mapping[str, str], seed: Seed) -> dict[str, str]:
    """Environment for code that reads variables only (the environment wins over the seed)."""
    return {**seed.env(), **env}
