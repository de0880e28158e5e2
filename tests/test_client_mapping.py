"""Volume mapping parser and validator (guide steps 10-11, --device-mapping, --dm-value-format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from failback_client.devices import LocalDisk, discover
from failback_client.mapping import (
    EXCLUDE,
    GIB,
    AmbiguousDeviceError,
    BootMediumError,
    DuplicateDeviceError,
    MappingError,
    MappingSyntaxError,
    MissingDeviceError,
    RecoveryDisk,
    UnknownDeviceError,
    VolumeTooSmallError,
    fit_problem,
    fits,
    parse_device_mapping,
    to_api,
    validate_mapping,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BIOS_ROOT = str(Path(__file__).parent / "data" / "client" / "sysroot-bios")


# ---- parser: the three formats of the guide ---------------------------------------------------------


def test_csv_with_equals_and_colons_and_by_path_values() -> None:
    text = (
        "/dev/nvme2n1=pci-0000:00:10.0-scsi-0:0:0:0,/dev/nvme0n1:pci-0000:00:10.0-scsi-0:0:1:0,"
        " /dev/nvme3n1 = exclude ,"
    )
    assert parse_device_mapping(text) == {
        "/dev/nvme2n1": "pci-0000:00:10.0-scsi-0:0:0:0",
        "/dev/nvme0n1": "pci-0000:00:10.0-scsi-0:0:1:0",
        "/dev/nvme3n1": EXCLUDE,
    }


def test_json_object_and_api_list_and_outer_quotes() -> None:
    assert parse_device_mapping('\'{"/dev/xvdb":"/dev/sdb","/dev/xvdc":"/dev/sdc"}\'') == {
        "/dev/xvdb": "/dev/sdb",
        "/dev/xvdc": "/dev/sdc",
    }
    text = json.dumps(
        [
            {"recoveryInstanceDeviceName": "/dev/xvda", "failbackClientDeviceName": "/dev/sda"},
            {"recoveryInstanceDeviceName": "/dev/xvdb", "failbackClientDeviceName": "EXCLUDE"},
        ]
    )
    assert parse_device_mapping(text) == {"/dev/xvda": "/dev/sda", "/dev/xvdb": EXCLUDE}


@pytest.mark.parametrize(
    ("text", "error", "token"),
    [
        ("", MappingSyntaxError, None),
        ("   ", MappingSyntaxError, None),
        ("/dev/xvda", MappingSyntaxError, "/dev/xvda"),
        ("/dev/xvda=/dev/sda,,/dev/xvdb=/dev/sdb", MappingSyntaxError, None),
        ("/dev/xvda=/dev/sda,/dev/xvda=/dev/sdb", DuplicateDeviceError, "/dev/xvda"),
        ('{"/dev/xvda":"/dev/sda","/dev/xvda":"/dev/sdb"}', DuplicateDeviceError, "/dev/xvda"),
        ('{"/dev/xvda": 3}', MappingSyntaxError, "3"),
        ('{"/dev/xvda": "/dev/sda"', MappingSyntaxError, None),
        ('[{"recoveryInstanceDeviceName": "/dev/xvda"}]', MappingSyntaxError, "failbackClientDeviceName"),
        ('[{"recoveryInstanceDeviceName": "a", "failbackClientDeviceName": "b", "x": 1}]', MappingSyntaxError, "x"),
        ("[]", MappingSyntaxError, None),
        ('"just a string"', MappingSyntaxError, None),
        ("=/dev/sda", MappingSyntaxError, None),
        ("/dev/xvda=", MappingSyntaxError, None),
        ("EXCLUDE=/dev/sda", MappingSyntaxError, EXCLUDE),
        ("/dev/xvda=/dev/s\x07da", MappingSyntaxError, "/dev/s\x07da"),
        ("[" * 100000, MappingSyntaxError, None),
    ],
)
def test_refusals_name_the_reason(text: str, error: type[MappingError], token: str | None) -> None:
    with pytest.raises(error) as info:
        parse_device_mapping(text)
    assert info.value.reason and str(info.value) == info.value.reason
    if token is not None:
        assert info.value.token == token
    assert isinstance(info.value, ValueError)


# ---- parser: generated inputs -----------------------------------------------------------------------

NAME_CHARS = st.characters(
    codec="utf-8", exclude_characters=",=:\"'{}[]", exclude_categories=("Cc", "Cf", "Cs", "Zs", "Zl", "Zp")
)
names = st.text(NAME_CHARS, min_size=1, max_size=12).map(lambda s: "/dev/" + s)
# local names may carry ':' (by-path) and must survive every format
local_names = st.one_of(
    names,
    st.from_regex(r"pci-0000:0[0-9]:[0-9a-f]{2}\.[0-7]-scsi-0:0:[0-9]:0", fullmatch=True),
    st.just(EXCLUDE),
)
mappings = st.dictionaries(names, local_names, min_size=1, max_size=8)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mapping=mappings, style=st.sampled_from(["csv=", "csv:", "json", "api", "csv-spaces"]))
def test_generated_mappings_round_trip_in_every_format(mapping: dict[str, str], style: str) -> None:
    if style == "csv=":
        text = ",".join(f"{k}={v}" for k, v in mapping.items())
    elif style == "csv:":
        text = ",".join(f"{k}:{v}" for k, v in mapping.items())
    elif style == "csv-spaces":
        text = " , ".join(f" {k} = {v.lower() if v == EXCLUDE else v} " for k, v in mapping.items()) + ","
    elif style == "json":
        text = json.dumps(mapping)
    else:
        text = json.dumps(
            [{"recoveryInstanceDeviceName": k, "failbackClientDeviceName": v} for k, v in mapping.items()]
        )
    assert parse_device_mapping(text) == {k.strip(): v.strip() for k, v in mapping.items()}


structural = st.text(
    st.sampled_from([*"=:,{}[]\"' \t\n\\/devsxEXCLUDEexclude0123:.-", "\x00", "é", "\u2028"]), max_size=60
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


def _parsed_or_named_refusal(text: str) -> None:
    try:
        result = parse_device_mapping(text)
    except MappingError as e:
        assert e.reason.strip(), f"refusal without a reason for {text!r}"
        return
    assert result and all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in result.items())
    assert EXCLUDE not in result


@settings(max_examples=2500, deadline=None)
@given(text=st.one_of(st.text(max_size=80), structural))
def test_any_text_is_parsed_or_refused_with_a_reason(text: str) -> None:
    _parsed_or_named_refusal(text)


@settings(max_examples=800, deadline=None)
@given(value=json_values)
def test_any_json_is_parsed_or_refused_with_a_reason(value: object) -> None:
    _parsed_or_named_refusal(json.dumps(value))


# ---- validator -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local() -> list[LocalDisk]:
    disks = discover(BIOS_ROOT)
    assert [(d.name, d.boot_medium) for d in disks] == [("sda", False), ("sdb", False), ("sdc", True)]
    return disks


REC = [RecoveryDisk("/dev/xvda", 20 * GIB), RecoveryDisk("/dev/xvdb", 10 * GIB)]


def test_valid_mapping_and_fractional_gib_case(local: list[LocalDisk]) -> None:
    # sdb is 9.75 GiB: the guide's special case accepts the 10 GiB recovery volume
    volumes = validate_mapping(parse_device_mapping("/dev/xvda=/dev/sda,/dev/xvdb=sdb"), REC, local)
    assert to_api(volumes) == [
        {"recoveryInstanceDeviceName": "/dev/xvda", "failbackClientDeviceName": "/dev/sda"},
        {"recoveryInstanceDeviceName": "/dev/xvdb", "failbackClientDeviceName": "/dev/sdb"},
    ]


def test_fits_rule() -> None:
    assert fits(10 * GIB, int(9.75 * GIB))
    assert fits(10 * GIB, 10 * GIB)
    assert not fits(10 * GIB, 9 * GIB)  # exactly 1 GiB less: not a rounding artefact
    assert not fits(11 * GIB, int(9.75 * GIB))
    assert fits(1, 1)


def test_too_small_names_token_and_sizes(local: list[LocalDisk]) -> None:
    rec = [RecoveryDisk("/dev/xvda", 20 * GIB), RecoveryDisk("/dev/xvdb", 11 * GIB)]
    with pytest.raises(VolumeTooSmallError, match=r"'/dev/sdb'.*9\.75 GiB.*/dev/xvdb \(11 GiB\)") as info:
        validate_mapping({"/dev/xvda": "/dev/sda", "/dev/xvdb": "/dev/sdb"}, rec, local)
    assert info.value.token == "/dev/sdb"


def test_by_path_and_persistent_formats(local: list[LocalDisk]) -> None:
    text = "/dev/xvda=pci-0000:00:10.0-scsi-0:0:0:0,/dev/xvdb:/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:1:0"
    volumes = validate_mapping(parse_device_mapping(text), REC, local, "by-path")
    assert [v.target for v in volumes] == ["/dev/sda", "/dev/sdb"]
    by_id = '{"/dev/xvda":"scsi-0QEMU_QEMU_HARDDISK_drive-scsi0","/dev/xvdb":"EXCLUDE"}'
    assert [v.target for v in validate_mapping(parse_device_mapping(by_id), REC, local, "by-id")] == [
        "/dev/sda",
        EXCLUDE,
    ]
    by_uuid = "/dev/xvda=0f2c7c4e-1d6b-4c43-9a58-2b6a1f0a7d11,/dev/xvdb=EXCLUDE"
    assert validate_mapping(parse_device_mapping(by_uuid), REC, local, "by-uuid")[0].target == "/dev/sda"
    mixed = "/dev/xvda=scsi-0QEMU_QEMU_HARDDISK_drive-scsi0,/dev/xvdb=pci-0000:00:10.0-scsi-0:0:1:0"
    assert [v.target for v in validate_mapping(parse_device_mapping(mixed), REC, local, "all-strict")] == [
        "/dev/sda",
        "/dev/sdb",
    ]


def test_wrong_format_hint(local: list[LocalDisk]) -> None:
    with pytest.raises(UnknownDeviceError, match="use --dm-value-format by-path") as info:
        validate_mapping(
            parse_device_mapping("/dev/xvda=pci-0000:00:10.0-scsi-0:0:0:0,/dev/xvdb=EXCLUDE"), REC, local, "dev-name"
        )
    assert info.value.token == "pci-0000:00:10.0-scsi-0:0:0:0"


def test_all_strict_ambiguity() -> None:
    a = LocalDisk("sda", 20 * GIB, by_id=["disk-x"])
    b = LocalDisk("sdb", 20 * GIB, by_path=["disk-x"])
    with pytest.raises(AmbiguousDeviceError, match=r"'disk-x'.*sda, sdb"):
        validate_mapping({"/dev/xvda": "disk-x", "/dev/xvdb": "EXCLUDE"}, REC, [a, b], "all-strict")


@pytest.mark.parametrize(
    ("text", "error", "token"),
    [
        ("/dev/xvda=/dev/sdc,/dev/xvdb=EXCLUDE", BootMediumError, "/dev/sdc"),
        ("/dev/xvda=/dev/sda,/dev/xvdb=/dev/sda", DuplicateDeviceError, "/dev/sda"),
        ("/dev/xvda=/dev/sda", MissingDeviceError, "/dev/xvdb"),
        ("/dev/xvda=/dev/sda,/dev/xvdb=EXCLUDE,/dev/xvdz=EXCLUDE", UnknownDeviceError, "/dev/xvdz"),
        ("/dev/xvda=/dev/sdq,/dev/xvdb=EXCLUDE", UnknownDeviceError, "/dev/sdq"),
        ("/dev/xvda=EXCLUDE,/dev/xvdb=EXCLUDE", MappingError, EXCLUDE),
        ("/dev/xvda=/dev/sda,xvda=/dev/sdb,/dev/xvdb=EXCLUDE", DuplicateDeviceError, "xvda"),
    ],
)
def test_validator_refusals(local: list[LocalDisk], text: str, error: type[MappingError], token: str) -> None:
    with pytest.raises(error) as info:
        validate_mapping(parse_device_mapping(text), REC, local)
    assert info.value.token == token and token in str(info.value)


@settings(max_examples=600, deadline=None)
@given(
    mapping=st.dictionaries(
        st.sampled_from(["/dev/xvda", "/dev/xvdb", "xvdb", "/dev/xvdq"]),
        st.sampled_from(["/dev/sda", "sdb", "/dev/sdc", "EXCLUDE", "/dev/sdz", "pci-0000:00:10.0-scsi-0:0:1:0"]),
        max_size=4,
    ),
    fmt=st.sampled_from(["dev-name", "by-path", "by-id", "by-uuid", "all-strict"]),
)
def test_validator_never_crashes(local: list[LocalDisk], mapping: dict[str, str], fmt: str) -> None:
    try:
        volumes = validate_mapping(mapping, REC, local, fmt)
    except MappingError as e:
        assert e.reason
        return
    assert [v.recovery for v in volumes] == REC
    targets = [v.local.name for v in volumes if v.local]
    assert len(targets) == len(set(targets)) and "sdc" not in targets


def test_fit_problem_count_and_size(local: list[LocalDisk]) -> None:
    assert fit_problem(REC, local) is None
    three = [*REC, RecoveryDisk("/dev/xvdc", GIB)]
    assert fit_problem(three, local) == "it has 3 volumes but this machine has only 2 disk(s)"
    big = [RecoveryDisk("/dev/xvda", 20 * GIB), RecoveryDisk("/dev/xvdb", 12 * GIB)]
    assert fit_problem(big, local) == "volume /dev/xvdb (12 GiB) is too large for disk /dev/sdb (9.75 GiB)"
