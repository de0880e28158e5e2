"""`drs-agent`: serve image files or block devices as a recovery instance's volumes.

Example: drs-agent --recovery-instance-id i-0123456789abcdef0 --volume /dev/xvda=disk.img \
    --ca ca.pem --cert agent.pem --key agent.key --paired-client fbc-0123456789abcdefg
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from failback_replicator.tlsconf import TlsFiles
from failback_replicator.wire import DIGEST_ALGORITHMS

from .server import AgentConfig, AgentServer
from .volume import VolumeSpec


def _volume(text: str) -> VolumeSpec:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--volume {text!r}: expected DEVICE_NAME=PATH, e.g. /dev/xvda=disk.img")
    return VolumeSpec(name=name, path=Path(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="drs-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recovery-instance-id", required=True)
    p.add_argument("--volume", action="append", type=_volume, required=True, help="DEVICE_NAME=PATH (repeat)")
    p.add_argument("--ca", type=Path, required=True, help="pairing CA certificate (PEM)")
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--paired-client", action="append", required=True, help="failback client ID allowed (repeat)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1500)
    p.add_argument("--watch-interval", type=float, default=5.0)
    p.add_argument(
        "--digests",
        default=None,
        help="block digests served, comma-separated (default: all available, blake3 then sha256)",
    )
    args = p.parse_args(argv)
    digests = tuple(d.strip() for d in args.digests.split(",") if d.strip()) if args.digests else None
    if digests is not None and (not digests or set(digests) - set(DIGEST_ALGORITHMS)):
        p.error(f"--digests {args.digests!r}: choose from {', '.join(DIGEST_ALGORITHMS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = AgentConfig(
        recovery_instance_id=args.recovery_instance_id,
        volumes=args.volume,
        tls=TlsFiles(ca=args.ca, cert=args.cert, key=args.key),
        paired_clients=set(args.paired_client),
        host=args.host,
        port=args.port,
        watch_interval=args.watch_interval,
        digests=digests,
    )
    server = AgentServer(cfg).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"drs-agent listening on {args.host}:{server.port}", flush=True)
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
