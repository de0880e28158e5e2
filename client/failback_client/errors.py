"""Errors the client reports as one clear sentence, and the exit status each one gives."""

from __future__ import annotations

# Every exit status of the client, here only (shown by `failback-client --help`, listed in client/README.md
# "Exit status"; tests/test_client_exit_statuses.py keeps the three the same).
EXIT_OK = 0  # workflow done up to the last stage this version implements
EXIT_USAGE = 2  # bad or missing argument/variable (argparse also uses 2)
EXIT_CREDENTIALS = 3  # credentials, region or endpoint refused / unreachable
EXIT_IDENTIFY = 4  # no recovery instance could be chosen
EXIT_MAPPING = 5  # no valid volume mapping
EXIT_CONNECTIVITY = 6  # TCP 1500 / DRS / S3 connectivity or association failed
EXIT_SERVICE = 7  # the DRS service refused a later call
EXIT_REPLICATION = 8  # downloading, configuring, pairing or running the replication software failed
EXIT_CONVERT = 9  # the conversion after the final sync failed (disks as replicated); also `failback-client convert`
EXIT_BOOT_MODE = 10  # a Windows server's boot mode differs from this machine's (nothing written)
EXIT_INTERRUPTED = 130  # Ctrl-C


class ClientError(Exception):
    """A failure the admin can act on: `str()` is the sentence shown, `exit_status` the process status."""

    exit_status = 1

    def __init__(self, message: str, *, exit_status: int | None = None) -> None:
        super().__init__(message)
        if exit_status is not None:
            self.exit_status = exit_status


class UsageError(ClientError):
    exit_status = EXIT_USAGE


class CredentialsError(ClientError):
    exit_status = EXIT_CREDENTIALS


class ClockError(ClientError):
    """The clock is too far off for request signing; new credentials would not help."""

    exit_status = EXIT_CREDENTIALS


class IdentifyError(ClientError):
    exit_status = EXIT_IDENTIFY


class ConnectivityError(ClientError):
    exit_status = EXIT_CONNECTIVITY


class ServiceError(ClientError):
    exit_status = EXIT_SERVICE
