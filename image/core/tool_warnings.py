"""Warnings a tool prints while it still exits 0, and which of them are known to be harmless.

Team rule: a warning is an error until we know why it is harmless. mmdebstrap, for one, prints
`W: umount /proc failed` and exits 0 with the chroot's /proc still mounted in the tree it made;
`cp -a` then copied the live /proc into an image. So `image.core.run.run` fails a command of a tool listed
here when it prints a warning line that is not listed as harmless, with the line in the error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Harmless:
    pattern: re.Pattern[str]  # matched against the whole warning line
    why: str  # why it changes nothing in what the build makes


@dataclass(frozen=True)
class WarningRule:
    tool: str  # the program's name (argv[0]'s last part)
    warning: re.Pattern[str]  # which output lines are warnings
    harmless: tuple[Harmless, ...] = ()

    def offending(self, output: str) -> list[str]:
        """The warning lines in `output` not known to be harmless."""
        lines = [line.rstrip() for line in output.splitlines() if self.warning.search(line)]
        return [line for line in lines if not any(h.pattern.search(line) for h in self.harmless)]


# mmdebstrap prints its own warnings and apt's with "W: " at the start of a stderr line (apt's "E: " lines
# make it exit non-zero anyway). None showed in this project's builds so far; every one mmdebstrap 1.3.5 can
# print is in its source (`warning(` in /usr/bin/mmdebstrap): a mount it could not undo, a device node it
# skipped, a path given via --include missing, ... each of which may change the tree it made.
MMDEBSTRAP = WarningRule(
    "mmdebstrap",
    re.compile(r"^W: "),
    harmless=(
        Harmless(
            re.compile(
                r"^W: Download is performed unsandboxed as root as file .* couldn't be accessed by "
                r"user '_apt'"
            ),
            "apt downloads as root instead of as _apt when _apt cannot read the .deb cache: only the "
            "privilege separation of the download differs, the packages are checked against the signed "
            "Release file all the same",
        ),
    ),
)

RULES = {r.tool: r for r in (MMDEBSTRAP,)}


def rule_for(argv0: str) -> WarningRule | None:
    return RULES.get(argv0.rsplit("/", 1)[-1])
