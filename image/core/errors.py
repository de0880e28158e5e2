"""The one error family of image/: every expected failure of the build, the release and the harnesses.

`ImageError` is the base the tasks' one handler (tasks.py) turns into a single line and exit status 1;
anything else is a bug and keeps its traceback. Each module's own error class derives from it (and, for
callers that caught the built-in before, from the built-in it used to be).
"""

from __future__ import annotations


class ImageError(Exception):
    """An expected failure: the message says what failed and how to fix it."""

    def summary(self) -> str:
        """The message on one line (a multi-line message's lines joined with '; ')."""
        lines = [line.strip() for line in str(self).splitlines() if line.strip()]
        return "; ".join(lines) or type(self).__name__
