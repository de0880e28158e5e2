"""Logging with secrets removed: a redactor shared by every handler, the console and the excepthook."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import traceback
from types import TracebackType
from urllib.parse import quote

DEFAULT_LOG_FILE = "/var/log/failback-client.log"
MASK = "****"
LOGGER_NAME = "failback_client"
log = logging.getLogger(LOGGER_NAME)
# Before (or without) setup_logging, records go nowhere rather than to logging's stderr fallback.
log.addHandler(logging.NullHandler())


class Redactor:
    """Replaces every known secret (and its URL-encoded form) with ****. Secrets are added as they become known.

    It masks the secret, not words that happen to look like it: a value of 16 characters or more (every
    secret AWS issues: secret keys are 40, session tokens hundreds) is masked wherever it appears, even inside
    other text; a shorter one only as a whole token (not next to a letter or digit), and one shorter than 8
    characters is no secret AWS could issue, so it is not masked at all (a typed "wrong" must not turn
    "the clock is wrong" into "the clock is ****").
    """

    ANYWHERE = 16  # this long: masked even inside other text
    WHOLE = 8  # this long: masked as a whole token

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, *secrets: str | None) -> None:
        with self._lock:
            for secret in secrets:
                if secret and len(secret) >= self.WHOLE:
                    self._secrets.add(secret)
                    self._secrets.add(quote(secret, safe=""))
            self._pattern = self._compile()

    def clear(self) -> None:
        with self._lock:
            self._secrets.clear()
            self._pattern = None

    def _compile(self) -> re.Pattern[str] | None:
        if not self._secrets:
            return None
        parts = []
        for secret in sorted(self._secrets, key=len, reverse=True):  # longest first: no partial masks
            body = re.escape(secret)
            parts.append(body if len(secret) >= self.ANYWHERE else rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])")
        return re.compile("|".join(parts))

    def __call__(self, text: str) -> str:
        with self._lock:
            pattern = self._pattern
        return pattern.sub(MASK, text) if pattern is not None else text


REDACTOR = Redactor()
_OUR_HANDLERS: list[logging.Handler] = []  # replaced on each setup (tests call main() several times)


class RedactingFormatter(logging.Formatter):
    """Redacts the fully formatted record, traceback included."""

    def __init__(self, fmt: str, redactor: Redactor = REDACTOR) -> None:
        super().__init__(fmt)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor(super().format(record))


def open_private(path: str) -> int:
    """Open `path` for appending, created 0600; an existing file is tightened to 0600 too."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def default_log_file() -> str | None:
    """/var/log/failback-client.log when it can be written (the LiveCD runs as root), else no file."""
    directory = os.path.dirname(DEFAULT_LOG_FILE)
    if os.path.exists(DEFAULT_LOG_FILE):
        return DEFAULT_LOG_FILE if os.access(DEFAULT_LOG_FILE, os.W_OK) else None
    return DEFAULT_LOG_FILE if os.access(directory, os.W_OK) else None


def add_log_file_argument(parser: argparse.ArgumentParser) -> None:
    """--log-file, for the client and its subcommands alike (all log through setup_logging)."""
    parser.add_argument(
        "--log-file", metavar="LOG_FILE", help=f"log file (created mode 0600; default {DEFAULT_LOG_FILE} when writable)"
    )


def setup_logging(*, log_file: str | None, log_console: bool, use_default_file: bool = True) -> str | None:
    """Configure the client's loggers; returns the log file path in use (or None)."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for handler in _OUR_HANDLERS:
        root.removeHandler(handler)
        handler.close()
    _OUR_HANDLERS.clear()
    root.setLevel(logging.DEBUG)
    # botocore's DEBUG output repeats whole requests; INFO keeps retries and endpoint choices.
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO)
    path = log_file or (default_log_file() if use_default_file else None)
    if path:
        fd = open_private(path)
        handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8", buffering=1))
        handler.setFormatter(RedactingFormatter(fmt))
        handler.setLevel(logging.DEBUG)
        _OUR_HANDLERS.append(handler)
    if log_console:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(RedactingFormatter(fmt))
        console.setLevel(logging.DEBUG)
        _OUR_HANDLERS.append(console)
    for handler in _OUR_HANDLERS:
        root.addHandler(handler)
    return path


def redacted_excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """Last resort for unexpected errors: a redacted traceback on stderr and in the log."""
    text = REDACTOR("".join(traceback.format_exception(exc_type, exc, tb)))
    try:
        log.error("unexpected error:\n%s", text)
    finally:
        sys.stderr.write(text)
        sys.stderr.flush()


def _thread_hook(args: threading.ExceptHookArgs) -> None:
    redacted_excepthook(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)


def install_excepthook() -> None:
    sys.excepthook = redacted_excepthook
    threading.excepthook = _thread_hook
