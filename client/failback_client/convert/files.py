"""Changing files in the target: each changed file is first copied next to itself as `<name>.failback-bak`
(kept from the first run, so it always holds the file as replicated) and every change is recorded for the
report. The content each file had before this run is also kept in memory, so a failed run can put every
file back (rollback) and leave the disk as it was."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from failback_client.convert.model import Change, ConversionReport

log = logging.getLogger(__name__)

BACKUP_SUFFIX = ".failback-bak"
_ABSENT = None


class Transaction:
    def __init__(self, root: Path, report: ConversionReport) -> None:
        self.root = root
        self.report = report
        # path inside the target -> its bytes (or link target) before this run, None when it did not exist
        self._before: dict[str, tuple[str, bytes | str, int] | None] = {}
        self._undo: list[tuple[str, Callable[[], None]]] = []  # other undo actions (boot sectors), newest last
        self._new_backups: list[Path] = []  # backups made by this run: a rollback removes them too
        self._in_place: set[str] = set()  # files a rollback writes back in place (backup_in_place)

    def host(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def read(self, rel: str) -> str | None:
        try:
            return self.host(rel).read_text(encoding="utf-8", errors="surrogateescape")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _remember(self, rel: str) -> None:
        if rel in self._before:
            return
        path = self.host(rel)
        if path.is_symlink():
            self._before[rel] = ("link", os.readlink(path), 0)
        elif path.is_file():
            self._before[rel] = ("file", path.read_bytes(), path.stat().st_mode & 0o7777)
        else:
            self._before[rel] = _ABSENT

    def _backup(self, rel: str) -> str:
        """Copy the file next to itself once; returns the backup's path inside the target ("" for none)."""
        path = self.host(rel)
        if not (path.is_file() or path.is_symlink()):
            return ""
        backup = path.with_name(path.name + BACKUP_SUFFIX)
        if not (backup.exists() or backup.is_symlink()):
            shutil.copy2(path, backup, follow_symlinks=False)
            self._new_backups.append(backup)
        return rel + BACKUP_SUFFIX

    def _record(self, rel: str, action: str, detail: str, backup: str) -> None:
        change = Change(rel, action, detail, backup)
        self.report.changes.append(change)
        log.info("conversion change: %s %s: %s%s", action, rel, detail, f" (backup {backup})" if backup else "")

    def write(self, rel: str, text: str, detail: str) -> bool:
        """Give `rel` the content `text`; False (and nothing done) when it already has it."""
        path = self.host(rel)
        old = self.read(rel)
        if old == text and not path.is_symlink():
            return False
        self._remember(rel)
        backup = self._backup(rel)
        mode = path.stat().st_mode & 0o7777 if path.exists() and not path.is_symlink() else 0o644
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".failback-tmp")
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
        os.chmod(tmp, mode)
        if path.is_symlink():
            path.unlink()
        os.replace(tmp, path)
        self._record(rel, "edited" if old is not None else "created", detail, backup)
        return True

    def remove(self, rel: str, detail: str) -> bool:
        """Take `rel` out of use; its backup keeps the content."""
        path = self.host(rel)
        if not (path.exists() or path.is_symlink()):
            return False
        self._remember(rel)
        backup = self._backup(rel)
        path.unlink()
        self._record(rel, "removed", detail, backup)
        return True

    def symlink(self, rel: str, target: str, action: str, detail: str) -> bool:
        path = self.host(rel)
        if path.is_symlink() and os.readlink(path) == target:
            return False
        self._remember(rel)
        backup = self._backup(rel) if path.exists() or path.is_symlink() else ""
        if path.exists() or path.is_symlink():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
        self._record(rel, action, detail, backup)
        return True

    def backup_binary(self, rel: str) -> str:
        """Before a tool rewrites `rel` (an initramfs, grub.cfg): keep the backup and this run's content."""
        self._remember(rel)
        return self._backup(rel)

    def backup_in_place(self, rel: str) -> str:
        """Before a library rewrites `rel` in its own file (a registry hive through hivex): keep the backup, and
        let a rollback write this run's bytes back into that same file (on NTFS the file keeps its security
        descriptor and attributes, which unlinking and re-creating would lose)."""
        if rel not in self._in_place:
            path = self.host(rel)
            before = path.read_bytes()

            def undo() -> None:
                with open(path, "r+b") as f:
                    f.write(before)
                    f.truncate()

            self._in_place.add(rel)
            self.on_rollback(rel, undo)
        return self._backup(rel)

    def record(self, rel: str, action: str, detail: str, backup: str = "") -> None:
        self._record(rel, action, detail, backup)

    def on_rollback(self, what: str, undo: Callable[[], None]) -> None:
        """Register how to undo a change that is not a file (e.g. boot code written to a disk)."""
        self._undo.append((what, undo))

    def rollback(self) -> list[str]:
        """Put every file this run touched back as it was when the run started. Returns their paths."""
        restored = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
                restored.append(what)
            except (OSError, RuntimeError) as exc:  # RuntimeError: a command (CommandFailed) of the undo
                log.error("rollback of %s failed: %s", what, exc)
        for rel, before in reversed(list(self._before.items())):
            path = self.host(rel)
            try:
                if path.exists() or path.is_symlink():
                    path.unlink()
                if before is not None:
                    kind, value, mode = before
                    if kind == "link":
                        os.symlink(value, path)
                    else:
                        assert isinstance(value, bytes)
                        path.write_bytes(value)
                        os.chmod(path, mode)
                restored.append(rel)
            except OSError as exc:
                log.error("rollback of %s failed: %s", rel, exc)
        self._before.clear()
        self._in_place.clear()
        for backup in self._new_backups:
            backup.unlink(missing_ok=True)
        self._new_backups.clear()
        return restored
