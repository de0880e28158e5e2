"""Program arguments, launcher variables and prompts (guide steps 6-7 and "Program Arguments")."""

from __future__ import annotations

import io

import pytest
from failback_client.cli import build_parser
from failback_client.console import Console
from failback_client.errors import UsageError
from failback_client.prompts import complete_settings
from failback_client.regions import DRS_REGIONS, region_problem
from failback_client.settings import from_arguments

KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def settings_for(argv: list[str], env: dict[str, str]):
    return from_arguments(build_parser().parse_args(argv), env)


def test_every_argument_of_the_guide_is_accepted() -> None:
    argv = [
        "--aws-access-key-id",
        KEY,
        "--aws-secret-access-key",
        SECRET,
        "--aws-session-token",
        "Tq9sessionvalue",
        "--region",
        "eu-west-1",
        "--endpoint",
        "https://vpce-0abc-1234.drs.eu-west-1.vpce.amazonaws.com",
        "--recovery-instance-id",
        "i-0123456789abcdef0",
        "--dm-value-format",
        "by-path",
        "--device-mapping",
        "/dev/xvda=pci-0000:00:10.0-scsi-0:0:0:0",
        "--no-prompt",
        "--log-console",
        "--log-file",
        "/tmp/x.log",
    ]
    s = settings_for(argv, {})
    assert (s.access_key_id, s.secret_access_key, s.region) == (KEY, SECRET, "eu-west-1")
    assert s.session_token == "Tq9sessionvalue"
    assert s.endpoint_url == "https://vpce-0abc-1234.drs.eu-west-1.vpce.amazonaws.com"
    assert s.recovery_instance_id == "i-0123456789abcdef0" and s.dm_value_format == "by-path"
    assert s.no_prompt and s.log_console and s.log_file == "/tmp/x.log"
    assert SECRET not in repr(s) and "Tq9sessionvalue" not in repr(s)
    for fmt in ("dev-name", "by-path", "by-id", "by-uuid", "all-strict"):
        assert settings_for(["--dm-value-format", fmt], {}).dm_value_format == fmt
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--dm-value-format", "by-label"])


def test_launcher_variables_and_precedence() -> None:
    env = {
        "AWS_ACCESS_KEY": KEY,
        "AWS_ACCESS_KEY_ID": "AKIAOTHEROTHEROTHER1",
        "AWS_SECRET_KEY": SECRET,
        "AWS_SESSION_TOKEN": "tok",
        "AWS_REGION": "us-west-2",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_DRS_ENDPOINT": "",
        "RECOVERY_INSTANCE_ID": "i-0123456789abcdef0",
        "DEVICE_MAPPING": "a=b",
        "NO_PROMPT": "1",
    }
    s = settings_for([], env)
    assert s.access_key_id == KEY and s.region == "us-west-2" and s.no_prompt
    assert s.default_endpoint and s.endpoint_url == "https://drs.us-west-2.amazonaws.com"
    assert s.recovery_instance_id == "i-0123456789abcdef0" and s.device_mapping == "a=b"
    assert s.origin["endpoint"].startswith("variable AWS_DRS_ENDPOINT")
    s = settings_for(["--region", "ca-central-1", "--aws-access-key-id", "AKIAFROMARGUMENTXXXX"], env)
    assert s.region == "ca-central-1" and s.access_key_id == "AKIAFROMARGUMENTXXXX"
    std = settings_for(
        [], {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "eu-west-1"}
    )
    assert (std.access_key_id, std.secret_access_key, std.region) == (KEY, SECRET, "eu-west-1")
    assert not std.endpoint_known  # not given: asked for
    assert settings_for(["--endpoint", "drs.example.test:8443"], {}).endpoint == "https://drs.example.test:8443"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--region", "us-est-1"], {}, "did you mean us-east-1 or us-west-1"),
        ([], {"AWS_REGION": "mars-north-1"}, "variable AWS_REGION"),
        (["--endpoint", "ftp://drs.us-east-1.amazonaws.com"], {}, "must start with https://"),
        (["--endpoint", "https://drs.us-east-1.amazonaws.com/x"], {}, "must not have a path"),
        (["--endpoint", "https://bad_host!"], {}, "not a valid host name"),
        (["--endpoint", "https://a.b", "--default-endpoint"], {}, "not both"),
        ([], {"NO_PROMPT": "perhaps"}, "NO_PROMPT"),
    ],
)
def test_bad_values_are_named(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        settings_for(argv, env)


def test_regions() -> None:
    assert len(DRS_REGIONS) == 30 and "us-gov-west-1" in DRS_REGIONS and "il-central-1" in DRS_REGIONS
    assert region_problem("US-EAST-1") is not None and "lower case" in region_problem("US-EAST-1")
    assert "did you mean eu-central-2" in region_problem("eu-cental-2")


def console_with(answers: str) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(stdin=io.StringIO(answers), stdout=out, plain=True), out


def test_prompts_ask_for_what_is_missing_and_reask_with_the_reason() -> None:
    s = settings_for([], {})
    answers = "\n".join(["short", KEY, "", SECRET, "", "us-est-1", "us-east-1", "ftp://x", "", ""]) + "\n"
    console, out = console_with(answers)
    complete_settings(s, console)
    text = out.getvalue()
    assert s.access_key_id == KEY and s.secret_access_key == SECRET and s.session_token is None
    assert s.region == "us-east-1" and s.default_endpoint and s.endpoint_url == "https://drs.us-east-1.amazonaws.com"
    assert "16-128 letters and digits" in text and "cannot be empty" in text
    assert "did you mean us-east-1 or us-west-1" in text and "must start with https://" in text
    assert "press Enter for the default https://drs.us-east-1.amazonaws.com" in text
    assert SECRET not in text


def test_custom_endpoint_answer_and_temporary_key_needs_token() -> None:
    s = settings_for(
        [], {"AWS_ACCESS_KEY": "ASIAIOSFODNN7EXAMPLE", "AWS_SECRET_KEY": SECRET, "AWS_REGION": "us-east-1"}
    )
    console, _ = console_with("the-token\nvpce-01.drs.us-east-1.vpce.amazonaws.com\n")
    complete_settings(s, console)
    assert s.session_token == "the-token"
    assert s.endpoint_url == "https://vpce-01.drs.us-east-1.vpce.amazonaws.com"
    s = settings_for(
        ["--no-prompt"], {"AWS_ACCESS_KEY": "ASIAIOSFODNN7EXAMPLE", "AWS_SECRET_KEY": SECRET, "AWS_REGION": "us-east-1"}
    )
    with pytest.raises(UsageError, match="--aws-session-token or set AWS_SESSION_TOKEN"):
        complete_settings(s, console_with("")[0])


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, ("--aws-access-key-id", "AWS_ACCESS_KEY or AWS_ACCESS_KEY_ID")),
        ({"AWS_ACCESS_KEY": KEY}, ("--aws-secret-access-key", "AWS_SECRET_KEY or AWS_SECRET_ACCESS_KEY")),
        ({"AWS_ACCESS_KEY": KEY, "AWS_SECRET_KEY": SECRET}, ("--region", "AWS_REGION or AWS_DEFAULT_REGION")),
    ],
)
def test_no_prompt_errors_name_argument_and_variable(env: dict[str, str], names: tuple[str, str]) -> None:
    s = settings_for(["--no-prompt"], env)
    with pytest.raises(UsageError) as info:
        complete_settings(s, console_with("")[0])
    assert all(n in str(info.value) for n in names)


def test_no_prompt_uses_the_default_endpoint() -> None:
    s = settings_for(["--no-prompt"], {"AWS_ACCESS_KEY": KEY, "AWS_SECRET_KEY": SECRET, "AWS_REGION": "sa-east-1"})
    complete_settings(s, console_with("")[0])
    assert s.endpoint_url == "https://drs.sa-east-1.amazonaws.com"


def test_help_names_the_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in (
        "AWS_ACCESS_KEY",
        "AWS_SECRET_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DRS_ENDPOINT",
        "RECOVERY_INSTANCE_ID",
        "DEVICE_MAPPING",
        "NO_PROMPT",
        "REBOOT=0",
        "CONVERT=0",
        "exit status",
    ):
        assert name in text


def test_help_is_written_for_the_admin_at_the_console(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    # what a run does, start to end, with the irreversible parts plain to see
    for said in (
        "THE MAPPED LOCAL DISKS ARE OVERWRITTEN",
        "type OVERWRITE",
        "converts the restored system",
        "REBOOTS (--no-reboot)",
        "AWSElasticDisasterRecoveryFailbackInstallationPolicy",
        "example",
        "failback-client --aws-access-key-id AKIA... --region us-east-1",
    ):
        assert said in text, said
    # no internal references and no test hooks (they are in client/README.md, developer section)
    for internal in (
        "guide step",
        "SEED.md",
        "FAILBACK_SYSROOT",
        "FAILBACK_INCLUDE_LOOP",
        "FAILBACK_S3_ENDPOINT",
        "FAILBACK_",
        "test and development",
    ):
        assert internal not in text, internal
    assert max(len(line) for line in text.splitlines()) < 80  # an 80-column serial console
