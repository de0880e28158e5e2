"""image/stages/clientenv.py: the lock, the keys, the chroot script; the built venv runs (slow)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from image.core.paths import REPO
from image.stages import clientenv


def test_lock_pins_every_runtime_dependency_with_a_hash() -> None:
    text = clientenv.LOCK.read_text()
    entries = re.findall(r"^([a-z0-9-]+)==(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", text, re.M)
    names = {name for name, _, _ in entries}
    assert {
        "boto3",
        "botocore",
        "s3transfer",
        "jmespath",
        "python-dateutil",
        "six",
        "urllib3",
        "rich",
        "markdown-it-py",
        "mdurl",
        "pygments",
        "pyyaml",
    } <= names
    requirement_lines = [line for line in text.splitlines() if "==" in line]
    assert len(requirement_lines) == len(entries), "every requirement carries exactly one hash"
    # The ISO runs what the tests run: the pins shared with requirements-dev.txt agree.
    dev = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "requirements-dev.txt").read_text(), re.M))
    dev = {k.lower(): v for k, v in dev.items()}
    for name, version, _ in entries:
        if name in dev:
            assert dev[name] == version, f"{name}: lock {version} != requirements-dev.txt {dev[name]}"


def copy_client(tmp_path: Path) -> Path:
    src = tmp_path / "client"
    shutil.copytree(clientenv.CLIENT_SRC, src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    return src


def test_client_key_follows_code_not_leftovers(tmp_path: Path) -> None:
    src = copy_client(tmp_path)
    lock = src / "requirements.lock"
    key = clientenv.client_key("rootfs", "/opt/failback-client", 1, lock=lock, src=src)
    assert clientenv.client_key("rootfs", "/opt/failback-client", 1, lock=lock, src=src) == key
    # Build and editable-install leftovers do not count...
    (src / "failback_client.egg-info").mkdir()
    (src / "failback_client.egg-info/PKG-INFO").write_text("x")
    (src / "failback_client/__pycache__").mkdir(exist_ok=True)
    (src / "failback_client/__pycache__/x.cpython-311.pyc").write_bytes(b"x")
    assert clientenv.client_key("rootfs", "/opt/failback-client", 1, lock=lock, src=src) == key
    # ...touching the code, the lock, the base, the venv path or the epoch does.
    init = src / "failback_client/__init__.py"
    init.write_text(init.read_text() + "\n# touched\n")
    touched = clientenv.client_key("rootfs", "/opt/failback-client", 1, lock=lock, src=src)
    assert touched != key
    lock.write_text(lock.read_text() + "\n")
    assert clientenv.client_key("rootfs", "/opt/failback-client", 1, lock=lock, src=src) != touched
    assert clientenv.client_key("rootfs2", "/opt/failback-client", 1, lock=lock, src=src) != touched
    assert clientenv.client_key("rootfs", "/opt/other", 1, lock=lock, src=src) != touched
    assert clientenv.client_key("rootfs", "/opt/failback-client", 2, lock=lock, src=src) != touched


def test_deps_key_ignores_client_code(tmp_path: Path) -> None:
    src = copy_client(tmp_path)
    lock = src / "requirements.lock"
    before = clientenv.deps_key("rootfs", "/opt/failback-client", lock)
    (src / "failback_client/__init__.py").write_text("# changed\n")
    assert clientenv.deps_key("rootfs", "/opt/failback-client", lock) == before


def test_client_projects(tmp_path: Path) -> None:
    projects = clientenv.client_projects()
    assert projects[0] == clientenv.CLIENT_SRC
    assert all((p / "pyproject.toml").is_file() for p in projects)
    assert clientenv.CLIENT_SRC / "replicator" not in projects, "the replication software is downloaded, not baked in"
    with pytest.raises(clientenv.ClientBuildError, match="not an installable project"):
        clientenv.client_projects(tmp_path)


def test_wheel_top_levels(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in ("pkg/__init__.py", "pkg/a.py", "single.py", "x-1.0.dist-info/RECORD", "x-1.0.data/scripts/s"):
            z.writestr(name, "")
    assert clientenv.wheel_top_levels(wheel) == ["pkg", "single.py"]


def test_missing_lock_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(clientenv.ClientBuildError, match="inv client --update-lock"):
        clientenv.lock_digest(tmp_path / "requirements.lock")


def test_chroot_script_protects_the_base(tmp_path: Path) -> None:
    cmd = clientenv.chroot_script(
        tmp_path / "root fs",
        "/opt/failback-client",
        tmp_path / "staging",
        tmp_path / "wheels",
        [["python3", "-V"]],
        1700000000,
    )
    assert cmd[:4] == ["unshare", "--mount", "--pid", "--fork"]
    script = cmd[-1]
    root = "'" + str(tmp_path / "root fs") + "'"
    assert f"mount -o remount,bind,ro {root}" in script
    # The venv directory and the wheelhouse are mounts on tmpfs, not directories made in the base.
    assert script.index(f"mount -t tmpfs tmpfs {root}/opt") < script.index(f"mkdir -p {root}/opt/failback-client")
    assert f"chroot {root} env -i " in script and "SOURCE_DATE_EPOCH=1700000000" in script
    assert script.rstrip().endswith("python3 -V")


def _venv(tree: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tree / "opt/fc" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tree


def test_split_keeps_only_what_the_client_added(tmp_path: Path) -> None:
    common = {"pyvenv.cfg": "home = /usr/bin\n", "lib/python3.11/site-packages/boto3/__init__.py": "b\n"}
    deps = _venv(tmp_path / "deps", common)
    full = _venv(
        tmp_path / "full",
        common
        | {
            "lib/python3.11/site-packages/failback_client/__init__.py": "c\n",
            "bin/failback-client": "#!/opt/fc/bin/python\n",
        },
    )
    (deps / "opt/fc/bin").mkdir()
    for tree in (deps, full):
        (tree / "opt/fc/bin/python3").symlink_to("/usr/bin/python3")
    n = clientenv.split_client_files("/opt/fc", deps, full, tmp_path / "own")
    got = sorted(str(p.relative_to(tmp_path / "own")) for p in (tmp_path / "own").rglob("*") if not p.is_dir())
    assert n == 2
    assert got == ["opt/fc/bin/failback-client", "opt/fc/lib/python3.11/site-packages/failback_client/__init__.py"]
    # The client must only add: a changed dependency file would be hidden by the top layer.
    (full / "opt/fc/lib/python3.11/site-packages/boto3/__init__.py").write_text("changed\n")
    with pytest.raises(clientenv.ClientBuildError, match=r"changed /opt/fc/lib/python3\.11/site-packages/boto3"):
        clientenv.split_client_files("/opt/fc", deps, full, tmp_path / "own")


@pytest.mark.slow
@pytest.mark.root
def test_built_client_venv_runs_in_the_rootfs(built_pipeline) -> None:
    p = built_pipeline.paths
    venv = built_pipeline.cfg.client.venv
    out = clientenv.check_client(p.rootfs, venv, p.client_full, built_pipeline.epoch)
    assert "imports ok" in out
    assert "usage" in out.lower(), "failback-client --help printed its usage"
    # The split: the top layer holds only the client, the deps layer everything else.
    own, deps = p.client / venv.lstrip("/"), p.client_deps / venv.lstrip("/")
    assert list(own.glob("lib/python3*/site-packages/failback_client/__init__.py"))
    assert not list(own.glob("lib/python3*/site-packages/boto3"))
    assert list(deps.glob("lib/python3*/site-packages/boto3/__init__.py"))
    assert not list(deps.glob("lib/python3*/site-packages/failback_client"))
    tree = p.client_full / venv.lstrip("/")
    assert not list(tree.glob("lib/python3*/site-packages/failback_replicator")), "it is downloaded, not baked in"
    assert (tree / "bin/failback-client").read_text().startswith(f"#!{venv}/bin/python")
    assert not (tree / "bin/pip").exists(), "no pip in the live venv"
    assert not (p.rootfs / venv.lstrip("/")).exists(), "the cached base must stay untouched"
    pycs = list(tree.rglob("failback_client/__pycache__/*.pyc"))
    assert pycs, "bytecode is compiled at build time"
    # unchecked-hash pycs: flags field (bytes 4-8) = 0b01 (hash-based, not checked), so no source mtime.
    assert all(pyc.read_bytes()[4:8] == b"\x01\x00\x00\x00" for pyc in pycs)
    site = subprocess.run(
        ["chroot", str(p.rootfs), "python3", "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert site.strip() == "(3, 11)"
