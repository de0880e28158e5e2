"""Command line of the failback client (user guide, "Failback Client Program Arguments")."""

from __future__ import annotations

import os
import sys

from failback_client import __version__
from failback_client.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ClientError

# Only what the summary line needs is imported here (not even logging or argparse: 10 ms natively,
# ~0.5 s under emulation): on the LiveCD console that line is printed first, and the other modules
# (seconds of loading under emulation or from a slow CD) are imported after it. Not typing either
# (it imports re, enum, functools...: ~8 ms natively): TYPE_CHECKING is its constant's value.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import logging

    from failback_client.console import Console
    from failback_client.seed import Seed
    from failback_client.settings import Settings


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("failback_client")


DESCRIPTION = """\
Fails a server back from AWS Elastic Disaster Recovery (DRS): copies the
disks of a recovery instance in AWS onto THIS machine's disks. A run:

 1. checks this machine (memory, boot mode, Secure Boot, clock) and asks for
    what is not given: AWS credentials, Region, DRS endpoint;
 2. finds the recovery instance (by this machine's MAC addresses or system
    UUID, or from a list);
 3. maps each recovery volume to a local disk (automatic on the original
    server, else asked); disks in use (mounted, swap, LVM, RAID, encrypted,
    the boot medium) are refused;
 4. checks the connections (TCP 1500 to the recovery instance, DRS, S3);
 5. shows what each chosen disk holds now and asks you to type OVERWRITE:
    THE MAPPED LOCAL DISKS ARE OVERWRITTEN; all data on them is lost;
 6. downloads the replication software, pairs it with the recovery instance
    and replicates until you press Failback in the DRS console
    (StopFailback there stops it without harm);
 7. converts the restored system to boot here (drivers, disk names, network,
    boot loader; --no-convert skips it), reports completion, ejects the CD
    and REBOOTS (--no-reboot).

Every argument is optional: what is missing is asked for at the console
(with --no-prompt it is an error naming the argument and its variable)."""

EPILOG = """\
example (unattended; an explicit mapping is consent to overwrite /dev/sda):
  export AWS_SECRET_KEY=...   # not an argument: arguments show in ps
  failback-client --aws-access-key-id AKIA... --region us-east-1 \\
    --recovery-instance-id i-0123456789abcdef0 \\
    --device-mapping /dev/xvda=/dev/sda --no-prompt

credentials: an IAM user or role with the AWS managed policy
  AWSElasticDisasterRecoveryFailbackInstallationPolicy
  (temporary STS credentials also need --aws-session-token)

environment variables (arguments win over them; then the LiveCD's seed:
a stick labelled FBSEED or failback.* kernel arguments; the prompt last):
  AWS_ACCESS_KEY, AWS_ACCESS_KEY_ID            --aws-access-key-id
  AWS_SECRET_KEY, AWS_SECRET_ACCESS_KEY        --aws-secret-access-key
  AWS_SESSION_TOKEN                            --aws-session-token
  AWS_REGION, AWS_DEFAULT_REGION               --region
  AWS_DRS_ENDPOINT                             --endpoint (empty: default)
  RECOVERY_INSTANCE_ID                         --recovery-instance-id
  DEVICE_MAPPING                               --device-mapping
  NO_PROMPT=1                                  --no-prompt
  REBOOT=0                                     --no-reboot
  CONVERT=0                                    --no-convert
  https_proxy                                  HTTPS proxy for DRS and S3

exit status:
  0 failback completed (or StopFailback, or --check-only done)
  2 bad or missing argument       3 credentials, Region, endpoint or clock
  4 no recovery instance          5 no valid mapping, or OVERWRITE not typed
  6 connectivity or linking       7 DRS refused a call
  8 replication software failed   9 conversion failed (disks as replicated)
  10 a Windows server's boot mode differs from this machine's (nothing written)
  130 interrupted

log: /var/log/failback-client.log (or --log-file); it never holds secrets.
"""


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from failback_client.logs import add_log_file_argument
    from failback_client.settings import DM_VALUE_FORMATS

    p = argparse.ArgumentParser(
        prog="failback-client",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--aws-access-key-id",
        metavar="AWS_ACCESS_KEY_ID",
        dest="access_key_id",
        help="AWS access key ID of the failback installation credentials",
    )
    p.add_argument(
        "--aws-secret-access-key",
        metavar="AWS_SECRET_ACCESS_KEY",
        dest="secret_access_key",
        help="AWS secret access key (prefer the prompt or AWS_SECRET_KEY: arguments are visible in ps)",
    )
    p.add_argument(
        "--aws-session-token",
        metavar="AWS_SESSION_TOKEN",
        dest="session_token",
        help="AWS session token of temporary (STS) credentials",
    )
    p.add_argument("--region", metavar="REGION", help="AWS Region of the recovery instance, e.g. us-east-1")
    p.add_argument("--endpoint", metavar="ENDPOINT", help="custom DRS endpoint URL, e.g. a VPC endpoint (PrivateLink)")
    p.add_argument(
        "--default-endpoint", action="store_true", help="use https://drs.REGION.amazonaws.com without asking"
    )
    p.add_argument(
        "--recovery-instance-id",
        metavar="RECOVERY_INSTANCE_ID",
        help="recovery instance to fail back from (skips automatic identification)",
    )
    p.add_argument(
        "--dm-value-format",
        choices=DM_VALUE_FORMATS,
        default="dev-name",
        metavar="FORMAT",
        help="how local devices are named in --device-mapping and at the mapping prompts: "
        f"{', '.join(DM_VALUE_FORMATS)} (default dev-name, e.g. /dev/sda; all-strict accepts "
        "every form)",
    )
    p.add_argument(
        "--device-mapping",
        metavar="DEVICE_MAPPING",
        help='volume mapping: CSV "rec1=local1,rec2:local2,rec3=EXCLUDE", a JSON object '
        'or the JSON list [{"recoveryInstanceDeviceName": …, "failbackClientDeviceName": …}]',
    )
    p.add_argument(
        "--no-prompt",
        action="store_true",
        help="never ask: anything missing is an error naming its argument and variable",
    )
    p.add_argument("--log-console", action="store_true", help="also write the log to the console (stderr)")
    p.add_argument(
        "--no-reboot",
        action="store_true",
        help="after a completed failback, do not eject the medium and reboot (also REBOOT=0)",
    )
    p.add_argument(
        "--no-convert",
        action="store_true",
        help="after the final sync, leave the restored volumes as replicated: do not adapt the restored "
        "system to this machine's drivers, disks and network (also CONVERT=0)",
    )
    p.add_argument(
        "--check-only",
        action="store_true",
        help="stop after the connectivity checks (step 4 above): download, pair and write nothing",
    )
    add_log_file_argument(p)
    p.add_argument("--version", action="version", version=f"failback-client {__version__}")
    return p


def early_summary() -> bool:
    """On a LiveCD console (the launcher sets FAILBACK_CONSOLE) print the summary line before anything else
    loads; the workflow then does not repeat it. Elsewhere the workflow prints it as its first line."""
    if not os.environ.get("FAILBACK_CONSOLE"):
        return False
    from failback_client.machine import ENV_SYSROOT, summary

    sys.stdout.write(summary(os.environ.get(ENV_SYSROOT) or "/") + "\n")
    sys.stdout.flush()
    return True


# Subcommands that run on their own instead of the failback workflow (`failback-client NAME --help`):
# NAME -> module whose main(argv) takes the remaining arguments. Without one, the workflow runs.
SUBCOMMANDS: dict[str, str] = {
    "convert": "failback_client.convert_cli",  # the conversion on its own (after exit 9, or for other hardware)
    "credentials": "failback_client.credentials_helper",  # temporary installation credentials (admin workstation)
}


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in and args_in[0] in SUBCOMMANDS:
        import importlib

        return int(importlib.import_module(SUBCOMMANDS[args_in[0]]).main(args_in[1:]))
    shown = early_summary()
    # The unit starts the client before the boot is done; what the workflow needs is waited for in
    # the background while the rest of the client loads (bootwait.py).
    from failback_client.bootwait import start_from_env

    boot = start_from_env()
    from failback_client.console import Console, ConsoleReleased, size_serial_console
    from failback_client.logs import REDACTOR, install_excepthook, setup_logging
    from failback_client.settings import from_arguments_and_seed

    size_serial_console(sys.stdout, os.environ.get("FAILBACK_CONSOLE"))
    install_excepthook()
    args = build_parser().parse_args(argv)
    # Secrets given as arguments or variables are redacted from the very first line of output.
    REDACTOR.add(args.secret_access_key, args.session_token)
    booted = boot.wait() if boot is not None else None
    try:
        settings = from_arguments_and_seed(args, load_seed())
        REDACTOR.add(*settings.secrets())
        log_path = setup_logging(log_file=settings.log_file, log_console=settings.log_console)
        if booted is not None:
            (_log().info if booted[0] else _log().warning)("%s", booted[1])
        console = Console(plain=True if settings.plain else None, lock_path=settings.console_lock)
        console.summary_shown = shown
    except ClientError as e:
        _report(None, str(e))
        return e.exit_status
    except OSError as e:
        _report(None, f"cannot open {e.filename or 'a file'}: {e.strerror or e}")
        return EXIT_USAGE
    _log().info("failback-client %s starting; settings %s; log %s", __version__, settings, log_path)
    try:
        status = _run(settings, console)
        if console.lock is not None and status != EXIT_INTERRUPTED:
            console.hold(log_path)
    except ConsoleReleased:
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


def load_seed() -> Seed:
    """The seed from the kernel command line and a FBSEED volume (client/SEED.md); FAILBACK_NO_SEED=1 skips it."""
    from failback_client.seed import Seed, load_local
    from failback_client.settings import ENV_SYSROOT, env_flag

    if env_flag(os.environ, "FAILBACK_NO_SEED"):
        return Seed()
    return load_local(os.environ.get(ENV_SYSROOT) or "/")


def _run(settings: Settings, console: Console) -> int:
    """The workflow, with every expected failure turned into its message and exit status."""
    from failback_client.console import ConsoleReleased
    from failback_client.mapping import MappingError
    from failback_client.workflow import run

    try:
        return run(settings, console)
    except (ClientError, MappingError) as e:
        status = getattr(e, "exit_status", EXIT_USAGE)
        _report(console, str(e))
        _log().info("exit %s", status)
        return status
    except EOFError:
        _report(
            console,
            "The console input ended before all answers were given; "
            "use --no-prompt with arguments or variables to run without a console",
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        _report(console, "Interrupted.")
        return EXIT_INTERRUPTED
    except OSError as e:
        _report(console, f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))
        return 1
    except ConsoleReleased:
        raise


def _report(console: Console | None, message: str) -> None:
    from failback_client.logs import REDACTOR

    message = REDACTOR(message)
    _log().error("%s", message)
    if console is not None:
        console.error(message)
    else:
        sys.stderr.write(f"failback-client: error: {message}\n")
