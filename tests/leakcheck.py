"""Session-end check: the test session fails when its tests left a mount, a loop device or a daemon behind.

A leftover mount or loop device broke every later run once (a conversion fixture's /proc): it must be seen
by the run that leaves it. Compared with a snapshot taken at session start, so what the machine had before
is not blamed. Blamed:
- mounts and loop devices new since the start whose mount point / image file is in this session's places
  (the checkout and pytest's base temp dir): other sessions on the same machine (CI, other checkouts) mount
  and attach in theirs at the same time, and a mount records no owner;
- processes still running below this pytest process (a child or grandchild);
- TCP sockets listening in this process tree (an in-process server thread never shut down, a daemon).
Loaded by tests/conftest.py (its hooks are re-exported there), or with `-p tests.leakcheck`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from image.core.mounts import loop_devices, mounts

REPO = Path(__file__).resolve().parent.parent
_START = pytest.StashKey["Snapshot"]()


@dataclass(frozen=True)
class Snapshot:
    mounts: frozenset[tuple[str, str, str]]  # (mount point, fstype, source)
    loops: frozenset[tuple[str, str]]  # (device, image file)
    processes: frozenset[tuple[int, str]]  # (pid, command line) below this process
    listeners: frozenset[tuple[str, int]]  # (address:port, pid)

    @classmethod
    def take(cls) -> Snapshot:
        tree = descendants(os.getpid())
        return cls(
            frozenset((str(m.target), m.fstype, m.source) for m in mounts()),
            frozenset((d.device, str(d.backing_file)) for d in loop_devices()),
            frozenset((pid, cmdline(pid)) for pid in tree),
            frozenset(listening_sockets({os.getpid(), *tree})),
        )


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of `pid`, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces
    return fields[0], int(fields[1])


def descendants(root: int) -> set[int]:
    """The live (not zombie) processes below `root`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[0] != "Z":
                children.setdefault(st[1], []).append(int(entry.name))
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _hex_address(text: str) -> str:
    addr, port = text.split(":")
    if len(addr) == 8:  # IPv4, little-endian
        ip = ".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
    else:
        words = [addr[i : i + 8] for i in range(0, 32, 8)]
        ip = ":".join("".join(w[j : j + 2] for j in (6, 4, 2, 0)) for w in words)
    return f"{ip}:{int(port, 16)}"


def listening_sockets(pids: set[int]) -> set[tuple[str, int]]:
    """(address:port, pid) of each listening TCP socket an fd of `pids` holds."""
    listening: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A":  # TCP_LISTEN
                listening[f[9]] = _hex_address(f[1])
    found = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                found.add((listening[target[8:-1]], pid))
    return found


# Processes known to be harmless, with why (a leftover is a leak until we know why it is not).
HARMLESS_PROCESSES = (
    (
        "from multiprocessing.resource_tracker import main",
        "Python's multiprocessing starts it once per process (a test using a Pool or shared memory) and it exits "
        "by itself when this pytest process exits: it reads a pipe only we hold",
    ),
)


def _harmless(cmd: str) -> bool:
    return any(marker in cmd for marker, _why in HARMLESS_PROCESSES)


def _ours(path: str, roots: tuple[Path, ...]) -> bool:
    p = Path(path)
    return any(p == r or r in p.parents for r in roots)


def leaks(start: Snapshot, end: Snapshot, roots: tuple[Path, ...]) -> list[str]:
    """What `end` has and `start` had not, as lines naming each thing and how to free it."""
    out = [
        f"mount {t} ({fs} {src}): unmount it in the test's teardown (umount -R {t})"
        for t, fs, src in sorted(end.mounts - start.mounts)
        if _ours(t, roots)
    ]
    out += [
        f"loop device {dev} on {img}: detach it in the test's teardown (losetup -d {dev})"
        for dev, img in sorted(end.loops - start.loops)
        if _ours(img, roots)
    ]
    out += [
        f"process {pid} still running: {cmd}"
        for pid, cmd in sorted(end.processes - start.processes)
        if not _harmless(cmd)
    ]
    out += [
        f"listening socket {addr} held by pid {pid} ({cmdline(pid)}): close the server in its teardown"
        for addr, pid in sorted(end.listeners - start.listeners)
    ]
    return out


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_START] = Snapshot.take()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    start = session.config.stash.get(_START, None)
    if start is None:
        return
    roots = [REPO.resolve(), Path(session.config.rootpath).resolve()]
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and factory._basetemp is not None:  # only when a test asked for tmp_path
        roots.append(factory._basetemp.resolve())
    found = leaks(start, Snapshot.take(), tuple(roots))
    if not found:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = "the tests left these behind (free them, then rerun):\n" + "\n".join(f"  {f}" for f in found)
    if reporter is not None:
        reporter.section("leak check", sep="=", red=True, bold=True)
        reporter.write_line(text)
    else:
        print(text)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
