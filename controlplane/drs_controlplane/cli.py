"""`drs-controlplane`: serve the local DRS control plane, press "Failback", show recovery instances."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from drs_controlplane.seed import SeedError, load_seed

DEFAULT_REGION = "us-east-1"
EPILOG_CREDENTIALS = """
credentials (never on the command line):
  serve accepts one operator key pair (console actions + the failback installation policy):
  --access-key or DRS_CONTROLPLANE_ACCESS_KEY (else AWS_ACCESS_KEY_ID); the secret from --secret-key-file
  or DRS_CONTROLPLANE_SECRET_KEY (else AWS_SECRET_ACCESS_KEY); an optional session token from
  --session-token-file or DRS_CONTROLPLANE_SESSION_TOKEN. Or several keys, each with its policy
  (installation, failback, operator, admin), token and lifetime: --credentials FILE (YAML, see
  controlplane/README.md). failback/describe sign with the same variables (or AWS_SESSION_TOKEN).
"""


class UsageError(Exception):
    """A missing or wrong option; the message says which and how to supply it."""


def _read_secret_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if not value:
        raise UsageError(f"the {what} file {path} is empty")
    return value


def _credentials(args: argparse.Namespace) -> tuple[str, str, str | None]:
    env = os.environ
    access = args.access_key or env.get("DRS_CONTROLPLANE_ACCESS_KEY") or env.get("AWS_ACCESS_KEY_ID")
    secret = (
        _read_secret_file(args.secret_key_file, "secret key")
        or env.get("DRS_CONTROLPLANE_SECRET_KEY")
        or env.get("AWS_SECRET_ACCESS_KEY")
    )
    token = (
        _read_secret_file(args.session_token_file, "session token")
        or env.get("DRS_CONTROLPLANE_SESSION_TOKEN")
        or env.get("AWS_SESSION_TOKEN")
        or None
    )
    if not access:
        raise UsageError("no access key: pass --access-key or set DRS_CONTROLPLANE_ACCESS_KEY")
    if not secret:
        raise UsageError("no secret key: pass --secret-key-file FILE or set DRS_CONTROLPLANE_SECRET_KEY")
    return access, secret, token


def _add_credential_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--access-key", help="access key id (default: $DRS_CONTROLPLANE_ACCESS_KEY)")
    parser.add_argument("--secret-key-file", metavar="FILE", help="file holding the secret access key")
    parser.add_argument("--session-token-file", metavar="FILE", help="file holding a session token (optional)")
    parser.add_argument("--region", default=DEFAULT_REGION, help=f"region to sign for/serve (default {DEFAULT_REGION})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drs-controlplane",
        description="Local DRS-compatible control plane for failback tests and demos (loopback only).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_CREDENTIALS,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the control plane until interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_CREDENTIALS,
        description="Serve DRS (public failback operations + the failback client's) on "
        "127.0.0.1. Prints the URL on the first line of stdout.",
    )
    serve.add_argument("--seed", type=Path, help="YAML seed (used only when the state database is new)")
    serve.add_argument("--state", type=Path, required=True, help="SQLite state file (created if missing)")
    serve.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    serve.add_argument("--url-file", type=Path, help="also write the URL to this file once listening")
    serve.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="YAML list of keys with policy, optional session token and lifetime (instead of one "
        "operator key from --access-key / the environment)",
    )
    serve.add_argument(
        "--client-credentials-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="lifetime of the credentials DRS issues each installed failback client (default 3600)",
    )
    serve.add_argument(
        "--client-not-seen-after",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="a linked failback client silent this long gets FAILBACK_CLIENT_NOT_SEEN (default 300)",
    )
    _add_credential_options(serve)

    for name, text in (
        ("failback", "press 'Failback' (StartFailbackLaunch) for recovery instances, as the console"),
        ("stop-failback", "StopFailback for one recovery instance"),
        ("describe", "list recovery instances with failback state and replication progress"),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description=text[0].upper() + text[1:] + ".",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=EPILOG_CREDENTIALS,
        )
        p.add_argument("--url", required=True, help="control plane URL printed by `serve`")
        _add_credential_options(p)
        if name == "failback":
            p.add_argument("recovery_instance_ids", nargs="+", metavar="i-...", help="recovery instance IDs")
        elif name == "stop-failback":
            p.add_argument("recovery_instance_id", metavar="i-...", help="recovery instance ID")
    reports = sub.add_parser(
        "client-reports",
        help="show the logs and metrics failback clients sent (SendClientLogsForDrs, SendClientMetricsForDrs)",
        description="Show what failback clients sent, read from the state file (the control plane may be running).",
    )
    reports.add_argument("--state", type=Path, required=True, help="the SQLite state file `serve` uses")
    reports.add_argument("--instance", metavar="i-...", help="only this recovery instance")
    reports.add_argument("--tail", type=int, default=200, metavar="N", help="last N log events (default 200)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from failback_client.drs_model import drs_service_model

    from drs_controlplane.credentials_file import CredentialsFileError, load_credentials
    from drs_controlplane.policies import policy_named
    from drs_controlplane.server import ControlPlane
    from drs_controlplane.sigv4 import Credential

    if args.client_credentials_ttl < 10:
        raise UsageError("--client-credentials-ttl must be at least 10 seconds")
    if args.credentials:
        try:
            credentials = load_credentials(args.credentials, drs_service_model(), datetime.now(UTC))
        except CredentialsFileError as exc:
            raise UsageError(str(exc)) from None
    else:
        access, secret, token = _credentials(args)
        credentials = [
            Credential(
                access,
                secret,
                token,
                policy=policy_named("operator", drs_service_model()),
                principal="arn:aws:iam::123456789012:user/drs-operator",
            )
        ]
    if args.state.exists() and args.seed:
        logging.info("state %s exists: the seed is not applied again", args.state)
    seed = load_seed(args.seed) if args.seed else None
    args.state.parent.mkdir(parents=True, exist_ok=True)
    plane = ControlPlane(
        state_path=args.state,
        credentials=credentials,
        region=args.region,
        seed=seed,
        port=args.port,
        client_credentials_ttl=timedelta(seconds=args.client_credentials_ttl),
        client_not_seen_after=timedelta(seconds=args.client_not_seen_after),
    )
    url = plane.bind()
    print(url, flush=True)
    if args.url_file:
        args.url_file.write_text(url + "\n", encoding="utf-8")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        plane.serve_forever()
    except KeyboardInterrupt:
        logging.info("stopping")
    finally:
        plane.stop()
    return 0


def _client(args: argparse.Namespace) -> Any:
    from failback_client.drs_model import make_drs_client

    access, secret, token = _credentials(args)
    return make_drs_client(
        region=args.region,
        endpoint_url=args.url,
        access_key=access,
        secret_key=secret,
        session_token=token,
        max_attempts=3,
    )


def _failback(args: argparse.Namespace) -> int:
    job = _client(args).start_failback_launch(recoveryInstanceIDs=args.recovery_instance_ids)["job"]
    print(
        f"Failback launch job {job['jobID']} {job['status']} for "
        + ", ".join(s["recoveryInstanceID"] for s in job.get("participatingServers", []))
    )
    return 0


def _stop_failback(args: argparse.Namespace) -> int:
    _client(args).stop_failback(recoveryInstanceID=args.recovery_instance_id)
    print(f"Failback stopped for {args.recovery_instance_id}")
    return 0


def _progress(info: dict[str, Any]) -> str:
    disks = info.get("replicatedDisks") or []
    total = sum(d.get("totalStorageBytes", 0) for d in disks)
    done = sum(d.get("replicatedStorageBytes", 0) for d in disks)
    return f"{done * 100 // total}% of {total / 1024**3:.1f} GiB" if total else "-"


def describe_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    """The console's Recovery instances page as rows (header first)."""
    rows = [
        [
            "INSTANCE ID",
            "SOURCE SERVER",
            "HOSTNAME",
            "EC2",
            "FAILBACK STATE",
            "DATA REPLICATION",
            "PROGRESS",
            "VOLUMES",
            "FAILBACK CLIENT",
        ]
    ]
    for item in items:
        failback = item.get("failback") or {}
        info = item.get("dataReplicationInfo") or {}
        props = item.get("recoveryInstanceProperties") or {}
        volumes = ", ".join(f"{d['internalDeviceName']}:{d['bytes'] / 1024**3:g}G" for d in props.get("disks", []))
        error = (info.get("dataReplicationError") or {}).get("error")
        rows.append(
            [
                item["recoveryInstanceID"],
                item.get("sourceServerID", "-"),
                (props.get("identificationHints") or {}).get("hostname", "-"),
                item.get("ec2InstanceState", "-"),
                failback.get("state", "-"),
                info.get("dataReplicationState", "-") + (f" ({error})" if error else ""),
                _progress(info),
                volumes or "-",
                failback.get("failbackClientID") or "-",
            ]
        )
    return rows


def _describe(args: argparse.Namespace) -> int:
    paginator = _client(args).get_paginator("describe_recovery_instances")
    items = [item for page in paginator.paginate() for item in page["items"]]
    rows = describe_rows(items)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _client_reports(args: argparse.Namespace) -> int:
    from drs_controlplane.store import Store

    if not args.state.is_file():
        raise UsageError(f"no state file {args.state} (the --state that `serve` was given)")
    store = Store(args.state)
    try:
        with store.transaction():
            logs, metrics = store.logs(), store.metrics()
    finally:
        store.close()
    wanted = [r for r in logs if not args.instance or r["recoveryInstanceID"] == args.instance]
    metrics = [m for m in metrics if not args.instance or m["recoveryInstanceID"] == args.instance]
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for m in metrics:
        latest[(m["recoveryInstanceID"] or "-", m["failbackClientID"] or "-", m["name"])] = m
    print(f"Metrics ({len(metrics)} received; latest of each):")
    for (instance, client, name), m in sorted(latest.items()):
        print(f"  {instance} {client} {name} = {m['value']:g} {m.get('unit') or ''} at {m.get('timestamp') or '-'}")
    print(f"Logs ({len(wanted)} events; last {min(args.tail, len(wanted))}):")
    for e in wanted[-args.tail :] if args.tail > 0 else []:
        print(
            f"  {e['timestamp']} {e['recoveryInstanceID'] or '-'} {e['failbackClientID'] or '-'} {e['level']} "
            f"{e['message']}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    commands = {
        "serve": _serve,
        "failback": _failback,
        "stop-failback": _stop_failback,
        "describe": _describe,
        "client-reports": _client_reports,
    }
    try:
        return commands[args.command](args)
    except (UsageError, SeedError) as exc:
        print(f"drs-controlplane: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        error = exc.response.get("Error", {})
        print(f"drs-controlplane: {error.get('Code')}: {error.get('Message')}", file=sys.stderr)
        return 1
    except BotoCoreError as exc:
        print(f"drs-controlplane: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
