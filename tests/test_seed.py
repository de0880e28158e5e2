"""The seed (client/SEED.md): formats, sources, precedence, errors naming key and line, secrets never shown."""

from __future__ import annotations

import argparse
import http.server
import io
import logging
import os
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from failback_client import seed as seedmod
from failback_client.cli import build_parser
from failback_client.logs import REDACTOR, RedactingFormatter
from failback_client.seed import Seed, SeedError, parse_cmdline, parse_env, parse_yaml
from failback_client.settings import fill_from_seed, from_arguments_and_seed

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
COMPLETE_ENV = f"""\
# unattended failback
AWS_REGION=eu-west-1
AWS_ACCESS_KEY=AKIAIOSFODNN7EXAMPLE
export AWS_SECRET_KEY='{SECRET}'
AWS_DRS_ENDPOINT=           # set but empty: the default endpoint
RECOVERY_INSTANCE_ID=i-0123456789abcdef0
DEVICE_MAPPING="/dev/xvda=/dev/sda,/dev/xvdb=EXCLUDE"
NO_PROMPT=yes
REBOOT=0
"""


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# ---- formats ----------------------------------------------------------------------------------------------


def test_env_format_values_quotes_comments_and_lines() -> None:
    seed = parse_env(COMPLETE_ENV, "volume FBSEED:failback-seed.env")
    assert seed.get("AWS_REGION") == "eu-west-1"
    assert seed.get("AWS_SECRET_KEY") == SECRET
    assert seed.get("AWS_DRS_ENDPOINT") == ""
    assert seed.get("DEVICE_MAPPING") == "/dev/xvda=/dev/sda,/dev/xvdb=EXCLUDE"
    assert seed.values["RECOVERY_INSTANCE_ID"].line == 6
    assert seed.values["RECOVERY_INSTANCE_ID"].origin == "seed volume FBSEED:failback-seed.env line 6"
    assert SECRET not in repr(seed) and SECRET not in seed.describe()


def test_env_double_quotes_unescape_and_are_not_expanded() -> None:
    seed = parse_env('AWS_SESSION_TOKEN="a\\"b\\\\c$HOME"\n', "f")
    assert seed.get("AWS_SESSION_TOKEN") == 'a"b\\c$HOME'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("AWS_REGION=eu-west-1\nRECOVERY_INSTANCE_ID=x-12\n", "seed f line 2: RECOVERY_INSTANCE_ID: 'x-12' is not"),
        ("AWS_REGION=eu-west-1\nAWS_REGION=eu-west-2\n", "seed f line 2: AWS_REGION is given twice (first on line 1)"),
        ("aws_region=eu-west-1\n", "seed f line 1: unknown key 'aws_region': keys are upper case, did you mean AWS_"),
        ("AWS_REGIO=eu-west-1\n", "seed f line 1: unknown key 'AWS_REGIO'"),
        ("AWS_REGION = eu-west-1\n", "seed f line 1: AWS_REGION: expected KEY=value with no space"),
        ("just words\n", "seed f line 1: the line: expected KEY=value"),
        ('\n\nDNS="10.0.0.1\n', "seed f line 3: DNS: the value's \" quote is not closed"),
        ("DEVICE_MAPPING=a b\n", "seed f line 1: DEVICE_MAPPING: the value has spaces; quote it"),
        ("NO_PROMPT=maybe\n", "seed f line 1: NO_PROMPT: 'maybe' is not a yes/no value"),
        ("FAILBACK_AGENT_PORT=70000\n", "seed f line 1: FAILBACK_AGENT_PORT: '70000' is not a TCP port"),
        ("AWS_DRS_ENDPOINT=ftp://x\n", "seed f line 1: AWS_DRS_ENDPOINT: endpoint 'ftp://x' must start with https://"),
        ("IPADDR=10.0.0.300\n", "seed f line 1: IPADDR: '10.0.0.300' is not an IPv4 address"),
        ("IPADDR=10.0.0.5\nNETMASK=24\n", "seed f: IPADDR, NETMASK given without GATEWAY, DNS"),
        (
            "IPADDR=10.0.0.5\nNETMASK=24\nGATEWAY=10.0.1.1\nDNS=10.0.0.1\n",
            "seed f: GATEWAY: gateway 10.0.1.1 is not in",
        ),
        ("DEVICE_MAPPING={bad\n", "seed f line 1: DEVICE_MAPPING: not a device mapping"),
    ],
)
def test_env_errors_name_line_and_key(text: str, expected: str) -> None:
    with pytest.raises(SeedError) as e:
        parse_env(text, "f")
    assert str(e.value).startswith(expected), str(e.value)


def test_secret_values_never_in_errors() -> None:
    bad_secret = "abc def/ghi"
    with pytest.raises(SeedError) as e:
        parse_env(f'AWS_SECRET_KEY="{bad_secret}"\n', "f")
    assert "AWS_SECRET_KEY" in str(e.value) and "line 1" in str(e.value)
    assert bad_secret not in str(e.value)
    with pytest.raises(SeedError) as e:
        parse_env("HTTPS_PROXY=http://user:hunter2pass@proxy\n", "f")  # no port
    assert "hunter2pass" not in str(e.value) and "needs a port" in str(e.value)


def test_yaml_format_types_mapping_and_lines() -> None:
    seed = parse_yaml(
        "AWS_REGION: eu-west-1\nNO_PROMPT: true\nREBOOT: off\nAWS_DRS_ENDPOINT:\nFAILBACK_AGENT_PORT: 1501\n"
        "DEVICE_MAPPING:\n  /dev/xvda: /dev/sda\n  /dev/xvdb: EXCLUDE\n",
        "u",
    )
    assert seed.env() == {
        "AWS_REGION": "eu-west-1",
        "NO_PROMPT": "1",
        "REBOOT": "0",
        "AWS_DRS_ENDPOINT": "",
        "FAILBACK_AGENT_PORT": "1501",
        "DEVICE_MAPPING": '{"/dev/xvda": "/dev/sda", "/dev/xvdb": "EXCLUDE"}',
    }
    assert seed.values["DEVICE_MAPPING"].line == 6


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("AWS_REGION: eu-west-1\nRECOVERY_INSTANCE_ID: nope\n", "seed u line 2: RECOVERY_INSTANCE_ID:"),
        ("AWS_REGION: [a, b]\n", "seed u line 1: AWS_REGION: the value must be a single value"),
        ("- AWS_REGION\n", "seed u line 1: the seed must be a mapping"),
        ("AWS_REGION: eu-west-1\n  bad: indent: x\n", "seed u line 2:"),
        ("AWS_REGION: eu-west-1\nAWS_REGION: eu-west-2\n", "seed u line 2: AWS_REGION is given twice"),
    ],
)
def test_yaml_errors_name_line_and_key(text: str, expected: str) -> None:
    with pytest.raises(SeedError) as e:
        parse_yaml(text, "u")
    assert str(e.value).startswith(expected), str(e.value)


# ---- the kernel command line -------------------------------------------------------------------------------


def test_cmdline_inline_keys_any_case_quotes_and_url() -> None:
    seed = parse_cmdline(
        "BOOT_IMAGE=/live/vmlinuz boot=live quiet failback.aws_region=eu-west-1 "
        'failback.NO_PROMPT=1 failback.DEVICE_MAPPING="/dev/xvda=/dev/sda, /dev/xvdb=EXCLUDE" '
        "failback.seed=http://10.0.2.2:8080/s.yaml\n"
    )
    assert seed.env() == {
        "AWS_REGION": "eu-west-1",
        "NO_PROMPT": "1",
        "DEVICE_MAPPING": "/dev/xvda=/dev/sda, /dev/xvdb=EXCLUDE",
    }
    assert seed.url == "http://10.0.2.2:8080/s.yaml"
    assert seed.values["AWS_REGION"].origin == "seed kernel command line"


def test_cmdline_without_failback_args_is_empty() -> None:
    seed = parse_cmdline("BOOT_IMAGE=/live/vmlinuz boot=live ip=dhcp\n")
    assert seed.values == {} and seed.sources == [] and seed.url is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("failback.seed=ftp://x/y", "failback.seed: give an http:// or https:// URL"),
        ("failback.colour=blue", "failback.colour: unknown key COLOUR"),
        ("failback.AWS_REGION", "failback.AWS_REGION: give a value"),
        ("failback.AWS_REGION=mars-1", "AWS_REGION: 'mars-1' is not an AWS Region"),
    ],
)
def test_cmdline_errors(line: str, expected: str) -> None:
    with pytest.raises(SeedError, match="seed kernel command line") as e:
        parse_cmdline(line)
    assert expected in str(e.value)


# ---- the volume (recorded tree) and load_local ---------------------------------------------------------------


def sysroot(tmp_path: Path, cmdline: str = "boot=live\n", files: dict[str, str] | None = None) -> Path:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text(cmdline)
    if files is not None:
        vol = tmp_path / "dev/disk/by-label/FBSEED"
        vol.mkdir(parents=True)
        for name, text in files.items():
            (vol / name).write_text(text)
    return tmp_path


def test_load_local_volume_and_cmdline_precedence(tmp_path: Path) -> None:
    root = sysroot(
        tmp_path,
        "quiet failback.AWS_REGION=us-east-1\n",
        {"failback-seed.env": COMPLETE_ENV, "failback-seed.yaml": "AWS_REGION: ap-south-1\n"},
    )
    seed = seedmod.load_local(str(root))
    assert seed.get("AWS_REGION") == "us-east-1"  # the kernel argument beats the volume
    assert seed.values["AWS_REGION"].source == "kernel command line"
    assert seed.values["RECOVERY_INSTANCE_ID"].source == "volume FBSEED:failback-seed.env"
    assert any("read failback-seed.env only" in w for w in seed.warnings)


def test_volume_yaml_only(tmp_path: Path) -> None:
    root = sysroot(tmp_path, files={"failback-seed.yml": "AWS_REGION: ap-south-1\n"})
    assert seedmod.load_local(str(root)).values["AWS_REGION"].origin == "seed volume FBSEED:failback-seed.yml line 1"


def test_volume_without_seed_file_is_an_error(tmp_path: Path) -> None:
    root = sysroot(tmp_path, files={"README.txt": "hello"})
    with pytest.raises(SeedError, match=r"holds none of failback-seed\.env"):
        seedmod.load_local(str(root))


def test_no_volume_no_args_is_an_empty_seed(tmp_path: Path) -> None:
    seed = seedmod.load_local(str(sysroot(tmp_path)))
    assert seed.values == {} and seed.url is None


def test_mount_failure_names_device(tmp_path: Path) -> None:
    import subprocess

    calls: list[list[str]] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 32, "", "mount: wrong fs type, bad option, bad superblock")

    with pytest.raises(SeedError, match=r"cannot mount /dev/sdz1 read-only \(mount: wrong fs type"):
        seedmod.read_volume("/dev/sdz1", runner, mount_base=str(tmp_path))
    assert calls[0][:3] == ["mount", "-o", "ro,nodev,nosuid,noexec"]
    assert list(tmp_path.iterdir()) == []  # the mount point is removed again


# ---- the URL (real HTTP on loopback) ------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[str, bytes]]] = {}
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        if self.path not in self.routes:
            self.send_error(404)
            return
        ctype, body = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def http_server():
    _Handler.routes = {}
    _Handler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler
    server.shutdown()
    server.server_close()


def test_url_seed_yaml_by_content_type_and_network_keys_ignored(http_server) -> None:
    base, handler = http_server
    handler.routes["/seeds/s1"] = (
        "application/yaml",
        b"AWS_REGION: eu-west-2\nIPADDR: 10.1.1.1\nNETMASK: 24\nGATEWAY: 10.1.1.254\nDNS: 10.1.1.2\n",
    )
    seed = seedmod.fetch_url(f"{base}/seeds/s1")
    assert seed.env() == {"AWS_REGION": "eu-west-2"}
    assert any("IPADDR ignored" in w for w in seed.warnings)
    assert seed.values["AWS_REGION"].origin == f"seed URL {base}/seeds/s1 line 1"


def test_url_seed_fills_below_cmdline_and_volume(http_server, tmp_path: Path) -> None:
    base, handler = http_server
    handler.routes["/s.env"] = ("text/plain", b"AWS_REGION=ap-south-1\nRECOVERY_INSTANCE_ID=i-00000000000000aa\n")
    root = sysroot(
        tmp_path, f"failback.seed={base}/s.env failback.NO_PROMPT=0\n", {"failback-seed.env": "AWS_REGION=eu-west-1\n"}
    )
    seed = seedmod.load_local(str(root))
    assert seed.url == f"{base}/s.env" and handler.seen == []  # not fetched before the network is up
    seedmod.add_url_seed(seed)
    assert seed.get("AWS_REGION") == "eu-west-1" and seed.get("RECOVERY_INSTANCE_ID") == "i-00000000000000aa"


def test_url_errors(http_server) -> None:
    base, _ = http_server
    with pytest.raises(SeedError, match=r"seed URL .*/missing: the server answered 404"):
        seedmod.fetch_url(f"{base}/missing")
    with pytest.raises(SeedError, match=r"cannot fetch it through the HTTPS proxy http://127.0.0.1:9: "):
        seedmod.fetch_url("https://seed.example.invalid/s.env", proxy="127.0.0.1:9", timeout=5)


# ---- settings: arguments > environment > seed > prompt -------------------------------------------------------


def test_precedence_arguments_environment_seed() -> None:
    seed = parse_env(COMPLETE_ENV, "volume FBSEED:failback-seed.env")
    env = {"AWS_REGION": "us-west-2"}
    s = from_arguments_and_seed(args("--recovery-instance-id", "i-0000000000000bbb"), seed, env)
    assert s.recovery_instance_id == "i-0000000000000bbb" and s.origin["recovery_instance_id"].startswith("argument")
    assert s.region == "us-west-2" and s.origin["region"] == "variable AWS_REGION"
    assert s.secret_access_key == SECRET
    assert s.origin["secret_access_key"] == "seed volume FBSEED:failback-seed.env line 4"
    assert s.default_endpoint and s.origin["endpoint"].startswith("seed volume FBSEED:failback-seed.env line 5")
    assert s.no_prompt and s.device_mapping == "/dev/xvda=/dev/sda,/dev/xvdb=EXCLUDE"
    assert s.seed is seed
    assert SECRET not in repr(s)
    if hasattr(s, "reboot"):
        assert s.reboot is False  # REBOOT=0 from the seed


def test_environment_beats_seed_for_flags_and_ports() -> None:
    seed = parse_env("FAILBACK_AGENT_PORT=1501\nFAILBACK_S3_ENDPOINT=http://10.0.2.2:9000\n", "f")
    s = from_arguments_and_seed(args(), seed, {"FAILBACK_AGENT_PORT": "1600"})
    assert s.agent_port == 1600 and s.s3_endpoint == "http://10.0.2.2:9000"


def test_fill_from_later_seed_only_fills_gaps() -> None:
    s = from_arguments_and_seed(args(), parse_env("AWS_REGION=eu-west-1\n", "volume"), {})
    later = parse_env("AWS_REGION=us-east-1\nRECOVERY_INSTANCE_ID=i-0123456789abcdef0\nNO_PROMPT=1\n", "URL u")
    filled = fill_from_seed(s, later)
    assert s.region == "eu-west-1"
    assert s.recovery_instance_id == "i-0123456789abcdef0" and s.origin["recovery_instance_id"] == "seed URL u line 2"
    assert s.no_prompt and set(filled) == {"recovery_instance_id", "no_prompt"}


def test_cli_reports_malformed_seed_on_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from failback_client.cli import main

    root = sysroot(tmp_path, files={"failback-seed.env": f"AWS_SECRET_KEY={SECRET}\nRECOVERY_INSTANCE_ID=i-zz\n"})
    monkeypatch.setenv("FAILBACK_SYSROOT", str(root))
    monkeypatch.delenv("FAILBACK_NO_SEED", raising=False)
    status = main(["--log-file", str(tmp_path / "client.log")])
    err = capsys.readouterr().err
    assert status == 2
    assert (
        "failback-client: error: seed volume FBSEED:failback-seed.env line 2: RECOVERY_INSTANCE_ID: 'i-zz' "
        "is not a recovery instance ID"
    ) in err
    assert SECRET not in err


def test_seed_secrets_are_redacted_from_logs() -> None:
    parse_env(f"AWS_SECRET_KEY={SECRET}\nHTTPS_PROXY=http://u:proxy-pass-123@10.0.0.9:3128\n", "f")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    logger = logging.getLogger("test_seed_redaction")
    logger.addHandler(handler)
    try:
        logger.warning("values %s and %s", SECRET, "proxy-pass-123")
    finally:
        logger.removeHandler(handler)
    assert SECRET not in stream.getvalue() and "proxy-pass-123" not in stream.getvalue()
    assert REDACTOR(SECRET) != SECRET


def test_seed_describe_masks_secrets() -> None:
    seed = Seed()
    seed.merge_below(parse_env(f"AWS_SECRET_KEY={SECRET}\nAWS_REGION=eu-west-1\n", "f"))
    assert seed.describe() == "seed from f: AWS_SECRET_KEY=****, AWS_REGION"
    assert os.environ.get("AWS_SECRET_KEY") != SECRET  # reading a seed does not export it
