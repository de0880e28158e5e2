"""Mounts under a private directory, always undone in reverse order (also after a failure)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from failback_client.convert.runner import CommandFailed, run

log = logging.getLogger(__name__)


class MountStack(contextlib.AbstractContextManager["MountStack"]):
    def __init__(self) -> None:
        self._mounted: list[Path] = []

    def mount(self, source: str, where: Path, *, options: str = "", fstype: str = "") -> Path:
        where.mkdir(parents=True, exist_ok=True)
        cmd = ["mount"]
        if fstype:
            cmd += ["-t", fstype]
        if options:
            cmd += ["-o", options]
        run([*cmd, source, os.fspath(where)])
        self._mounted.append(where)
        return where

    def bind(self, source: str, where: Path) -> Path:
        """A recursive, one-way bind (mounts made under it inside do not propagate back)."""
        where.mkdir(parents=True, exist_ok=True)
        run(["mount", "--rbind", source, os.fspath(where)])
        self._mounted.append(where)
        run(["mount", "--make-rslave", os.fspath(where)])
        return where

    def unmount_all(self) -> None:
        errors = []
        while self._mounted:
            where = self._mounted.pop()
            try:
                run(["umount", "--recursive", os.fspath(where)])
            except CommandFailed as exc:
                # Something still holds it (a daemon started by a maintainer script): detach it lazily so
                # the disk is released once that ends, and say so.
                log.warning("umount %s failed, detaching lazily: %s", where, exc)
                run(["umount", "--recursive", "--lazy", os.fspath(where)], check=False)
                errors.append(str(where))
        if errors:
            log.warning("lazily unmounted: %s", ", ".join(errors))

    def __exit__(self, *exc: object) -> None:
        self.unmount_all()
