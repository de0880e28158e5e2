"""image/stages/config.py: the image definition loads into dataclasses; every bad value names file and key."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from image.stages.config import (
    DEFAULT_CONFIG,
    ConfigError,
    ImageConfig,
    load_config,
    resolve_base_epoch,
    resolve_source_date_epoch,
)

BASE: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG.read_text())


def write(tmp_path: Path, data: Any, name: str = "image.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def mutated(change) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    change(data)
    return data


def test_default_definition_loads() -> None:
    cfg = load_config(DEFAULT_CONFIG)
    assert isinstance(cfg, ImageConfig)
    assert cfg.iso.volume_label == "DRSFAILBACK"
    assert cfg.iso.artifact == "aws-failback-livecd-64bit.iso"
    assert cfg.debian.suite == "bookworm"
    assert "busybox" in cfg.packages and isinstance(cfg.packages, tuple)
    assert "boot=failback" in cfg.kernel_cmdline.split()
    assert cfg.boot.default in {e.id for e in cfg.boot.entries}
    assert [e for e in cfg.boot.entries if e.local_disk], "an entry that boots the first local disk"
    assert cfg.client.venv == "/opt/failback-client"
    assert cfg.squashfs.compression in ("zstd", "xz")
    assert cfg.path == DEFAULT_CONFIG


def test_template_vars_hold_the_whole_definition() -> None:
    values = load_config(DEFAULT_CONFIG).template_vars()
    assert values["hostname"] == "drs-failback"
    assert values["network"]["dhcp_timeout"] == BASE["network"]["dhcp_timeout"]
    assert values["client"]["venv"] == "/opt/failback-client"
    assert values["iso"]["volume_label"] == "DRSFAILBACK"
    assert values["boot"]["entries"][0]["id"] == BASE["boot"]["entries"][0]["id"]


def test_snapshot_mirror_is_accepted(tmp_path: Path) -> None:
    url = "http://snapshot.debian.org/archive/debian/20250520T000000Z"
    cfg = load_config(write(tmp_path, mutated(lambda d: d["debian"].__setitem__("mirror", url))))
    assert cfg.debian.mirror == url


def test_integer_epoch_and_optional_keys(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["source_date_epoch"] = 1700000000
        del d["squashfs"]["level"]
        del d["debian"]["security_mirror"]
        del d["exclude_paths"]

    cfg = load_config(write(tmp_path, mutated(change)))
    assert cfg.source_date_epoch == 1700000000
    assert cfg.squashfs.level is None
    assert cfg.debian.security_mirror == ""
    assert cfg.exclude_paths == ()
    assert resolve_source_date_epoch(cfg, tmp_path) == 1700000000
    assert resolve_base_epoch(cfg, tmp_path) == 1700000000


def _set(path: str, value: Any):
    """A change that sets a dotted/indexed key path (`boot.entries[2].label`)."""

    def change(d: dict[str, Any]) -> None:
        parts = path.replace("[", ".").replace("]", "").split(".")
        node: Any = d
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


def _del(path: str):
    def change(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[p]
        del node[last]

    return change


BAD_CASES = [
    # (change, key named in the message, words in the message)
    (_set("boot.entries[2].label", ""), "boot.entries[2].label", "non-empty string"),
    (_set("boot.entries[0].id", "bad id!"), "boot.entries[0].id", "invalid value"),
    (_set("boot.entries[1].id", "serial-and-screen"), "boot.entries[1].id", "duplicate"),
    (_set("boot.entries[0].local_disk", "yes"), "boot.entries[0].local_disk", "true or false"),
    (_set("boot.entries[3].cmdline", "quiet"), "boot.entries[3].cmdline", "local_disk"),
    (_set("boot.entries[0].colour", "red"), "boot.entries[0].colour", "unknown key"),
    (_set("boot.entries", []), "boot.entries", "non-empty list"),
    (_set("boot.default", "nope"), "boot.default", "not the id of an entry"),
    (_set("boot.default", "local-disk"), "boot.default", "boots the local disk"),
    (_set("boot.timeout", "5"), "boot.timeout", "must be an integer"),
    (_set("boot.timeout", True), "boot.timeout", "must be an integer"),
    (_set("boot.timeout", -1), "boot.timeout", "between 0 and 600"),
    (_set("iso.volume_label", "drs failback"), "iso.volume_label", "ISO 9660"),
    (_set("iso.volume_label", "A" * 33), "iso.volume_label", "ISO 9660"),
    (_set("iso.artifact", "../x.iso"), "iso.artifact", ".iso"),
    (_set("iso.artifact", "livecd.img"), "iso.artifact", ".iso"),
    (_set("source_date_epoch", "yesterday"), "source_date_epoch", '"git" or an integer'),
    (_set("source_date_epoch", -5), "source_date_epoch", "between"),
    (_set("squashfs.compression", "gzip"), "squashfs.compression", "zstd or xz"),
    (_set("squashfs.level", 40), "squashfs.level", "between 1 and 22"),
    (lambda d: d["squashfs"].update(compression="xz", level=9), "squashfs.level", "only meaningful for zstd"),
    (_set("network.dhcp_timeout", 0), "network.dhcp_timeout", "between 1"),
    (_set("network.dhcp_timeout", None), "network.dhcp_timeout", "nothing (null)"),
    (_set("client.venv", "opt/failback"), "client.venv", "absolute"),
    (_set("client.venv", "/opt"), "client.venv", "absolute directory of its own"),
    (_set("hostname", "-bad-"), "hostname", "invalid value"),
    (_set("hostname", 42), "hostname", "must be a string"),
    (_set("debian.mirror", "deb.debian.org/debian"), "debian.mirror", "URL"),
    (_set("debian.security_mirror", "ftp://x"), "debian.security_mirror", "URL"),
    (_set("debian.suite", "Bookworm"), "debian.suite", "invalid value"),
    (_set("debian.architecture", "arm64"), "debian.architecture", "amd64"),
    (_set("debian.components", []), "debian.components", "must not be empty"),
    (_set("debian.components", "main"), "debian.components", "must be a list"),
    (_del("debian.suite"), "debian.suite", "required but missing"),
    (_set("debian", "bookworm"), "debian", "must be a mapping"),
    (_set("packages", ["busybox", "python3", "python3-venv"]), "packages", "kernel"),
    (lambda d: d["packages"].remove("busybox"), "packages", "'busybox' for boot=failback"),
    (_set("kernel_cmdline", "boot=live quiet"), "packages", "'live-boot' for boot=live"),
    (_set("kernel_cmdline", "boot=failback boot=live"), "kernel_cmdline", "got boot=failback boot=live"),
    (_set("kernel_cmdline", "boot=local"), "kernel_cmdline", "one boot=failback"),
    (lambda d: d["packages"].append("Bad_Name"), f"packages[{len(BASE['packages'])}]", "Debian package name"),
    (lambda d: d["packages"].append("python3"), f"packages[{len(BASE['packages'])}]", "duplicate"),
    (lambda d: d["packages"].append("grub-efi-amd64-signed"), f"packages[{len(BASE['packages'])}]", "boot loaders"),
    (_set("exclude_paths", ["usr/share/doc/*"]), "exclude_paths[0]", "absolute"),
    (_set("kernel_cmdline", "quiet"), "kernel_cmdline", "got none"),
    (_del("kernel_cmdline"), "kernel_cmdline", "required but missing"),
    (_set("colour", "blue"), "colour", "unknown key"),
]


@pytest.mark.parametrize(("change", "key", "words"), BAD_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_CASES)])
def test_bad_values_name_the_file_and_key(tmp_path: Path, change, key: str, words: str) -> None:
    path = write(tmp_path, mutated(change))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message, message


def test_not_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "debian:\n  suite: [bookworm\n")
    with pytest.raises(ConfigError, match=r"image\.yaml: not valid YAML \(line \d+, column \d+\)"):
        load_config(path)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match=r"image\.yaml: \(top level\): must be a mapping, got a list"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_immutable() -> None:
    cfg = load_config(DEFAULT_CONFIG)
    with pytest.raises(AttributeError):
        cfg.hostname = "x"  # type: ignore[misc]


def _git(repo: Path, *args: str, date: int | None = None) -> None:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
        "PATH": "/usr/bin:/bin",
    }
    if date is not None:
        env |= {"GIT_AUTHOR_DATE": f"@{date} +0000", "GIT_COMMITTER_DATE": f"@{date} +0000"}
    subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)


def test_git_epochs_base_follows_only_the_definition(tmp_path: Path) -> None:
    """Base epoch = last commit touching the definition; others = last commit of the repo."""
    repo = tmp_path / "repo"
    (repo / "image").mkdir(parents=True)
    _git(repo, "init", "-q")
    cfg_path = write(repo / "image", BASE)
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "definition", date=1600000000)
    (repo / "other.txt").write_text("x")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "elsewhere", date=1650000000)
    cfg = load_config(cfg_path)
    assert cfg.source_date_epoch == "git"
    assert resolve_source_date_epoch(cfg, repo) == 1650000000
    assert resolve_base_epoch(cfg, repo) == 1600000000


def test_git_epoch_without_git_repo_is_a_config_error(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    with pytest.raises(ConfigError, match="source_date_epoch: git"):
        resolve_source_date_epoch(cfg, tmp_path)
