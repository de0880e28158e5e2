"""image/stages/overlay.py: *.j2 rendered strictly, other files copied with their modes, symlinks kept."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from image.core.paths import REPO
from image.stages.config import DEFAULT_CONFIG, load_config
from image.stages.overlay import RenderError, overlay_key, render_overlay

VALUES = {
    "hostname": "drs-failback",
    "network": {"dhcp_timeout": 30},
    "client": {"venv": "/opt/failback-client"},
    "iso": {"volume_label": "DRSFAILBACK"},
    "boot": {"entries": [{"id": "a"}]},
}


def make_tree(root: Path, files: dict[str, tuple[str, int]]) -> Path:
    for rel, (text, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chmod(path, mode)
    return root


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_renders_templates_and_copies_files_with_modes(tmp_path: Path) -> None:
    src = make_tree(
        tmp_path / "overlay",
        {
            "etc/hostname.j2": ("{{ hostname }}\n", 0o644),
            "usr/lib/x/launch.j2": ("#!/bin/sh\nexec {{ client.venv }}/bin/c --t {{ network.dhcp_timeout }}\n", 0o755),
            "etc/secret.conf": ("k=v\n", 0o600),
            "etc/group-read.conf": ("x\n", 0o640),
            "usr/bin/start.sh": ("#!/bin/sh\necho {{ not rendered }}\n", 0o755),
        },
    )
    os.chmod(src / "usr/lib/x", 0o750)
    (src / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (src / "etc/wants").mkdir()
    (src / "etc/wants/a.service").symlink_to("/lib/systemd/system/a.service")
    out = tmp_path / "out"

    written = render_overlay(src, out, VALUES)

    assert (out / "etc/hostname").read_text() == "drs-failback\n"  # trailing newline kept
    assert not (out / "etc/hostname.j2").exists()
    assert (out / "usr/lib/x/launch").read_text().splitlines()[1] == "exec /opt/failback-client/bin/c --t 30"
    assert mode(out / "usr/lib/x/launch") == 0o755
    assert mode(out / "etc/hostname") == 0o644
    assert mode(out / "etc/secret.conf") == 0o600
    assert mode(out / "etc/group-read.conf") == 0o640
    assert mode(out / "usr/lib/x") == 0o750
    # Only *.j2 are templates: other files are copied byte for byte.
    assert (out / "usr/bin/start.sh").read_text() == "#!/bin/sh\necho {{ not rendered }}\n"
    assert os.readlink(out / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    assert os.readlink(out / "etc/wants/a.service") == "/lib/systemd/system/a.service"
    assert Path("etc/hostname") in written and Path("usr/lib/x/launch") in written


@pytest.mark.root
def test_output_is_owned_by_root(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "overlay", {"etc/a.j2": ("{{ hostname }}\n", 0o644), "etc/b": ("b\n", 0o644)})
    for p in [src / "etc", src / "etc/a.j2", src / "etc/b"]:
        os.chown(p, 1234, 1234)
    out = tmp_path / "out"
    render_overlay(src, out, VALUES)
    for p in [out / "etc", out / "etc/a", out / "etc/b"]:
        assert (p.stat().st_uid, p.stat().st_gid) == (0, 0), p


@pytest.mark.parametrize(
    ("template", "variable", "line"),
    [
        ("line one\n{{ hostnme }}\n", "hostnme", 2),
        ("{% if true %}\n\n{{ network.dhcp_timout }}\n{% endif %}\n", "network.dhcp_timout", 3),
        ("{{ client.venv }}\n{{ iso.volume }}\n", "iso.volume", 2),
        ("{{ boot.entries[0].label }}\n", "boot.entries[0].label", 1),
        ("{{ missing.deeper }}\n", "missing", 1),
    ],
)
def test_undefined_variable_names_template_line_and_variable(
    tmp_path: Path, template: str, variable: str, line: int
) -> None:
    src = make_tree(tmp_path / "overlay", {"etc/systemd/x.conf.j2": (template, 0o644)})
    with pytest.raises(RenderError) as err:
        render_overlay(src, tmp_path / "out", VALUES)
    message = str(err.value)
    assert f"overlay/etc/systemd/x.conf.j2:{line}:" in message, message
    assert f"undefined variable '{variable}'" in message, message
    assert not (tmp_path / "out").exists(), "a failed render must not leave a half-written tree"


def test_undefined_in_filter_use_is_an_error_too(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "overlay", {"a.j2": ("{{ nope | upper }}\n", 0o644)})
    with pytest.raises(RenderError, match=r"overlay/a\.j2:1: undefined variable 'nope'"):
        render_overlay(src, tmp_path / "out", VALUES)


def test_syntax_error_names_template_and_line(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "overlay", {"etc/issue.j2": ("ok\n{% if %}\n", 0o644)})
    with pytest.raises(RenderError, match=r"overlay/etc/issue\.j2:2: template syntax error"):
        render_overlay(src, tmp_path / "out", VALUES)


def test_template_and_plain_file_of_the_same_name_conflict(tmp_path: Path) -> None:
    src = make_tree(
        tmp_path / "overlay", {"etc/hostname.j2": ("{{ hostname }}\n", 0o644), "etc/hostname": ("other\n", 0o644)}
    )
    with pytest.raises(RenderError, match=r"both hostname\.j2 and hostname exist"):
        render_overlay(src, tmp_path / "out", VALUES)


def test_missing_overlay_directory(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="does not exist"):
        render_overlay(tmp_path / "nope", tmp_path / "out", VALUES)


def test_rerender_replaces_stale_files(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "overlay", {"a": ("1\n", 0o644), "b": ("2\n", 0o644)})
    out = tmp_path / "out"
    render_overlay(src, out, VALUES)
    (src / "b").unlink()
    render_overlay(src, out, VALUES)
    assert sorted(p.name for p in out.iterdir()) == ["a"]


def test_the_project_overlay_renders_with_the_default_definition(tmp_path: Path) -> None:
    cfg = load_config(DEFAULT_CONFIG)
    out = tmp_path / "out"
    written = render_overlay(REPO / "overlay", out, cfg.template_vars())
    assert written, "overlay/ is empty"
    assert not list(out.rglob("*.j2"))
    for template in (REPO / "overlay").rglob("*.j2"):
        rel = template.relative_to(REPO / "overlay").with_suffix("")
        assert mode(out / rel) == mode(template), rel
    if (REPO / "overlay/etc/hostname.j2").exists():
        assert (out / "etc/hostname").read_text().strip() == cfg.hostname


def test_overlay_key_follows_templates_and_values(tmp_path: Path) -> None:
    cfg = load_config(DEFAULT_CONFIG)
    src = make_tree(tmp_path / "overlay", {"etc/hostname.j2": ("{{ hostname }}\n", 0o644)})
    key = overlay_key(cfg, src)
    assert overlay_key(cfg, src) == key
    (src / "etc/hostname.j2").write_text("{{ hostname }} \n")
    edited = overlay_key(cfg, src)
    assert edited != key
    os.chmod(src / "etc/hostname.j2", 0o755)
    assert overlay_key(cfg, src) != edited, "a mode change must rebuild too"
    from dataclasses import replace

    assert overlay_key(replace(cfg, hostname="other"), src) != overlay_key(cfg, src)
