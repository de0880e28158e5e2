"""`inv seed` (image/release/seedimage.py): FAT and ISO seed volumes, checked keys, private files, read back by
the client."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest
from failback_client import seed as seedmod

from image.release.seedimage import SeedImageError, build_seed_image, seed_text

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SETS = [
    "AWS_REGION=eu-west-1",
    "AWS_ACCESS_KEY=AKIAIOSFODNN7EXAMPLE",
    f"AWS_SECRET_KEY={SECRET}",
    "RECOVERY_INSTANCE_ID=i-0123456789abcdef0",
    'DEVICE_MAPPING={"/dev/xvda": "/dev/vda"}',
    "NO_PROMPT=1",
]


def blkid(path: Path) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_fat_image_label_mode_and_content(tmp_path: Path) -> None:
    out = tmp_path / "seed.img"
    result = build_seed_image(out, sets=SETS)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert blkid(out)["LABEL"] == "FBSEED" and blkid(out)["TYPE"] == "vfat"
    text = subprocess.run(
        ["mtype", "-i", str(out), "::/failback-seed.env"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    ).stdout
    seed = seedmod.parse_env(text, "read back")
    assert seed.get("AWS_SECRET_KEY") == SECRET
    assert seed.get("DEVICE_MAPPING") == '{"/dev/xvda": "/dev/vda"}'
    assert SECRET not in result.describe() and "AWS_SECRET_KEY=****" in result.describe()


def test_iso_image_label_and_rock_ridge_name(tmp_path: Path) -> None:
    import pycdlib

    out = tmp_path / "seed.iso"
    build_seed_image(out, sets=SETS[:1], kind="iso")
    assert blkid(out)["LABEL"] == "FBSEED" and blkid(out)["TYPE"] == "iso9660"
    iso = pycdlib.PyCdlib()
    iso.open(str(out))
    try:
        buf = io.BytesIO()
        iso.get_file_from_iso_fp(buf, rr_path="/failback-seed.env")
    finally:
        iso.close()
    assert seedmod.parse_env(buf.getvalue().decode(), "iso").env() == {"AWS_REGION": "eu-west-1"}


def test_file_then_set_overrides(tmp_path: Path) -> None:
    src = tmp_path / "in.yaml"
    src.write_text("AWS_REGION: eu-west-1\nDEVICE_MAPPING:\n  /dev/xvda: /dev/sda\nNO_PROMPT: true\n")
    out = tmp_path / "seed.img"
    result = build_seed_image(out, seed_file=src, sets=["AWS_REGION=us-east-1"])
    assert result.keys == ("AWS_REGION", "DEVICE_MAPPING", "NO_PROMPT")
    text = subprocess.run(
        ["mtype", "-i", str(out), "::/failback-seed.env"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    ).stdout
    assert seedmod.parse_env(text, "x").env() == {
        "AWS_REGION": "us-east-1",
        "DEVICE_MAPPING": '{"/dev/xvda": "/dev/sda"}',
        "NO_PROMPT": "1",
    }


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"sets": ["AWS_REGIO=eu-west-1"]}, "--set AWS_REGIO: unknown key"),
        ({"sets": ["AWS_REGION"]}, "--set 'AWS_REGION': write --set KEY=VALUE"),
        ({"sets": ["AWS_REGION=mars"]}, "--set AWS_REGION: 'mars' is not an AWS Region"),
        ({"sets": ["AWS_REGION=eu-west-1", "AWS_REGION=eu-west-2"]}, "--set AWS_REGION: given twice"),
        ({"sets": ["IPADDR=10.0.0.2"]}, "IPADDR given without NETMASK, GATEWAY, DNS"),
        ({"sets": [f"AWS_SECRET_KEY={SECRET} x"]}, "--set AWS_SECRET_KEY: an AWS Secret Access Key has no spaces"),
        ({"sets": []}, "the seed is empty"),
        ({"sets": ["AWS_REGION=eu-west-1"], "kind": "vhd"}, "--format 'vhd': use fat"),
    ],
)
def test_bad_input_names_the_bad_part(tmp_path: Path, kwargs: dict, expected: str) -> None:
    out = tmp_path / "seed.img"
    with pytest.raises(SeedImageError) as e:
        build_seed_image(out, **kwargs)
    assert expected in str(e.value)
    assert SECRET not in str(e.value)
    assert not out.exists()


def test_bad_seed_file_names_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "in.env"
    src.write_text("AWS_REGION=eu-west-1\nNO_PROMPT=perhaps\n")
    with pytest.raises(SeedImageError, match=rf"seed file {src} line 2: NO_PROMPT: 'perhaps' is not a yes/no"):
        build_seed_image(tmp_path / "o.img", seed_file=src)


def test_values_survive_quoting() -> None:
    values = {"AWS_SESSION_TOKEN": 'ab"c\\d$e`f', "DEVICE_MAPPING": "/dev/a=/dev/b, /dev/c=EXCLUDE"}
    assert seedmod.parse_env(seed_text(values), "t").env() == values


def test_inv_seed_task(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    inv = repo / ".venv/bin/inv"
    out = tmp_path / "s.img"
    ok = subprocess.run(
        [str(inv), "seed", "--out", str(out), "--set", "AWS_REGION=eu-west-1", "--set", f"AWS_SECRET_KEY={SECRET}"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "AWS_SECRET_KEY=****" in ok.stdout and SECRET not in ok.stdout + ok.stderr
    bad = subprocess.run(
        [str(inv), "seed", "--out", str(out), "--set", "NO_PROMPT=2"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "seed: --set NO_PROMPT: '2' is not a yes/no value" in bad.stderr


@pytest.mark.root
def test_client_mounts_the_built_volume(tmp_path: Path) -> None:
    """The client's reader mounts the FAT image read-only (real loop mount) and reads it back. Containers
    often lack vfat/iso9660 in the host kernel: then the QEMU seed test (test_network_boot.py) is the proof."""
    filesystems = Path("/proc/filesystems").read_text().split()
    if "vfat" not in filesystems or "iso9660" not in filesystems:
        pytest.skip("this kernel has no vfat/iso9660 (the QEMU seed boot test mounts the volume instead)")
    img = tmp_path / "seed.img"
    build_seed_image(img, sets=SETS)
    seed = seedmod.read_volume(str(img), mount_base=str(tmp_path / "run"))
    assert seed.get("RECOVERY_INSTANCE_ID") == "i-0123456789abcdef0"
    assert seed.values["AWS_REGION"].origin == "seed volume FBSEED:failback-seed.env line 2"
    assert list((tmp_path / "run").iterdir()) == []  # unmounted and removed
    iso = tmp_path / "seed.iso"
    build_seed_image(iso, sets=SETS[:1], kind="iso")
    assert seedmod.read_volume(str(iso), mount_base=str(tmp_path / "run")).get("AWS_REGION") == "eu-west-1"
