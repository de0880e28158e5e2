"""Invoke tasks: `inv --list` shows them, `inv <task> --help` explains one.

Thin on purpose: every task calls library code in image/. The build is incremental: each stage
skips itself when its inputs have not changed since its last successful run.

Errors: an expected failure (any image.core.errors.ImageError, e.g. a command that failed, timed out or is
not installed, a bad image definition, a missing input file) prints ONE line on stderr, "<task>: what
failed; how to fix it" (a failed command's captured output tail above it), and exits 1. A traceback is
shown only in debug mode: `inv --debug <task>` or `FAILBACK_DEBUG=1 inv <task>`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import invoke
from invoke import Context, Exit

REPO = Path(__file__).resolve().parent

CONFIG_HELP = "image definition to use (default: image/image.yaml)"
BUILD_HELP = "build directory (default: build/)"
FORCE_HELP = "rebuild this stage even if its inputs did not change"
DEBUG_ENV = "FAILBACK_DEBUG"


def debug_mode(argv: list[str] | None = None) -> bool:
    """FAILBACK_DEBUG=1, or invoke's own `--debug`/`-d` before the task names (`inv --debug build`).
    Read from the command line, not from a logger's level: a library or a test may set the root logger
    to DEBUG too."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    argv = sys.argv if argv is None else argv
    if not argv or Path(argv[0]).name not in ("inv", "invoke"):
        return False
    for arg in argv[1:]:
        if arg in ("-d", "--debug"):
            return True
        if not arg.startswith("-") and _is_task(arg):  # the core options end at the first task
            return False
    return False


def _is_task(name: str) -> bool:
    try:
        ns[name]
    except (KeyError, ValueError):
        return False
    return True


@contextmanager
def failures(name: str) -> Iterator[None]:
    """The one handler: an expected failure becomes one line "<name>: ..." on stderr and exit status 1.

    Expected = image.core.errors.ImageError (all of image/'s errors, the run() ones included) and
    FileNotFoundError (a named input that is not there). In debug mode the exception propagates,
    traceback and all.
    """
    from image.core.errors import ImageError
    from image.core.run import CommandError

    try:
        yield
    except (ImageError, FileNotFoundError) as exc:
        if debug_mode():
            raise
        if isinstance(exc, CommandError) and exc.output_tail():
            print(exc.output_tail(), file=sys.stderr)  # the tool's own words (captured), above ours
        line = exc.summary() if isinstance(exc, ImageError) else str(exc)
        raise Exit(f"{name}: {line}", code=1) from None


def task(*args: Any, **kwargs: Any) -> Any:
    """invoke's @task (bare or with options), the body run inside `failures()` under the task's name."""
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return task()(args[0])

    def wrap(body: Callable[..., Any]) -> Any:
        name = kwargs.get("name") or body.__name__.replace("_", "-")

        @functools.wraps(body)
        def handled(*a: Any, **kw: Any) -> Any:
            with failures(name):
                return body(*a, **kw)

        return invoke.task(*args, **kwargs)(handled)

    return wrap


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
        )


def _stage(until: str, config: str | None, build_dir: str | None, force: bool) -> None:
    """Run the pipeline up to `until` (failures: the task's handler)."""
    _logging()
    from image.stages.pipeline import Pipeline

    pipe = Pipeline.from_files(Path(config) if config else None, Path(build_dir) if build_dir else None)
    pipe.build(until, force=until if force else None)
    print(f"\n{until}: stages\n{pipe.report.format()}")
    if until in ("iso", "hashes"):
        print(f"artifact: {pipe.artifact}")


@task(help={"config": CONFIG_HELP, "build-dir": BUILD_HELP, "force": FORCE_HELP})
def rootfs(c: Context, config: str | None = None, build_dir: str | None = None, force: bool = False) -> None:
    """Build the base root filesystem (mmdebstrap minbase), its package manifest, kernel and initrd."""
    _stage("rootfs", config, build_dir, force)


@task(help={"config": CONFIG_HELP, "build-dir": BUILD_HELP, "force": FORCE_HELP})
def overlay(c: Context, config: str | None = None, build_dir: str | None = None, force: bool = False) -> None:
    """Render overlay/ (*.j2 through Jinja2 with the image definition) into build/cache/overlay."""
    _stage("overlay", config, build_dir, force)


@task(
    help={
        "config": CONFIG_HELP,
        "build-dir": BUILD_HELP,
        "force": FORCE_HELP,
        "update-lock": "re-resolve client/requirements.lock (pinned, sha256-hashed wheels) and exit",
    }
)
def client(
    c: Context, config: str | None = None, build_dir: str | None = None, force: bool = False, update_lock: bool = False
) -> None:
    """Build the failback client's venv (wheel + locked dependencies) with the rootfs's python3."""
    if update_lock:
        _logging()
        from image.stages.clientenv import generate_lock

        generate_lock()
        return
    _stage("client", config, build_dir, force)


@task(help={"config": CONFIG_HELP, "build-dir": BUILD_HELP, "force": FORCE_HELP})
def squashfs(c: Context, config: str | None = None, build_dir: str | None = None, force: bool = False) -> None:
    """Make the squashfs layers: the cached base, and the overlay + client venv on top."""
    _stage("squashfs", config, build_dir, force)


@task(help={"config": CONFIG_HELP, "build-dir": BUILD_HELP, "force": FORCE_HELP})
def bootloader(c: Context, config: str | None = None, build_dir: str | None = None, force: bool = False) -> None:
    """Fetch Debian's signed shim, GRUB and MokManager from the image's mirror into the cache, with a manifest."""
    _stage("bootloader", config, build_dir, force)


@task(help={"config": CONFIG_HELP, "build-dir": BUILD_HELP, "force": FORCE_HELP})
def iso(c: Context, config: str | None = None, build_dir: str | None = None, force: bool = False) -> None:
    """Assemble the hybrid BIOS/UEFI ISO (pycdlib) in build/out, with the package manifests beside it."""
    _stage("iso", config, build_dir, force)


@task(help={"config": CONFIG_HELP, "build-dir": BUILD_HELP, "force": FORCE_HELP})
def hashes(c: Context, config: str | None = None, build_dir: str | None = None, force: bool = False) -> None:
    """Write <artifact>.sha512 (bare hex) and SHA512SUMS (sha512sum -c format) beside the ISO."""
    _stage("hashes", config, build_dir, force)


@task(default=True, help={"config": CONFIG_HELP, "build-dir": BUILD_HELP})
def build(c: Context, config: str | None = None, build_dir: str | None = None) -> None:
    """Build everything, incrementally (the default): rootfs, overlay, client, squashfs, bootloader, iso, hashes."""
    _stage("hashes", config, build_dir, False)


@task(
    help={
        "fast": "unit tests only (skip the tests marked slow, boot or e2e)",
        "k": "only tests matching this pytest -k expression",
        "args": 'extra arguments passed to pytest, e.g. "-x -vv"',
    }
)
def test(c: Context, fast: bool = False, k: str | None = None, args: str = "") -> None:
    """pytest: ALL tests (slow, boot, e2e included) unless --fast. Lint is `inv lint` (.ci/run runs it first)."""
    cmd = [f"{REPO}/.venv/bin/pytest", str(REPO / "tests")]
    if not fast:
        cmd.append("--run-slow")
    if k:
        cmd += ["-k", repr(k)]
    if args:
        cmd.append(args)
    c.run(" ".join(cmd), pty=False, env={"PYTHONPATH": str(REPO)})


def _shell_scripts() -> list[Path]:
    """The repository's plain shell scripts: install-deps.sh, .ci/run and every overlay file that starts with
    #!/bin/sh. (The rendered *.j2 scripts are shellchecked by tests/test_overlay_units.py and test_rootfs.py.)"""
    found = [REPO / "install-deps.sh", REPO / ".ci" / "run"]
    for path in sorted((REPO / "overlay").rglob("*")):
        if path.is_file() and not path.is_symlink() and path.suffix != ".j2":
            with path.open("rb") as f:
                if f.read(9) == b"#!/bin/sh":
                    found.append(path)
    return found


@task
def lint(c: Context) -> None:
    """ruff check, mypy (configured in pyproject.toml), ruff format --check and shellcheck: the static
    checks, in seconds. Runs them all, then fails naming each that failed."""
    venv = REPO / ".venv" / "bin"
    checks = [
        ("ruff check", f"{venv}/ruff check {REPO}"),
        ("mypy", f"{venv}/mypy --config-file {REPO}/pyproject.toml"),
        ("ruff format --check", f"{venv}/ruff format --check {REPO}"),
        ("shellcheck", "shellcheck " + " ".join(str(p.relative_to(REPO)) for p in _shell_scripts())),
    ]
    failed = []
    for name, command in checks:
        print(f"lint: {name}", flush=True)
        with c.cd(str(REPO)):
            result = c.run(command, pty=False, warn=True)
        if result is None or result.failed:
            failed.append(name)
    if failed:
        raise Exit(f"lint: failed: {', '.join(failed)} (details above)", code=1)
    print(f"lint: passed ({', '.join(name for name, _ in checks)})")


@task(
    help={
        "all": "also remove the caches (base rootfs, downloads, layers) and the reproducibility builds",
        "build-dir": BUILD_HELP,
    }
)
def clean(c: Context, all: bool = False, build_dir: str | None = None) -> None:
    """Remove the build outputs (build/out); --all removes the caches too."""
    from image.stages.pipeline import clean as do_clean

    for path in do_clean(Path(build_dir) if build_dir else None, everything=all):
        print(f"removed {path}")


@task(help={"config": CONFIG_HELP, "build-dir": "parent of repro-a/ and repro-b/ (default: build/)"})
def reproduce(c: Context, config: str | None = None, build_dir: str | None = None) -> None:
    """Build everything twice from cold (build/repro-a, build/repro-b) and compare the sha512 of the
    ISO, each layer, the manifest, kernel and initrd; fails naming the files that differ."""
    _logging()
    from image.stages.pipeline import ReproducibilityError
    from image.stages.pipeline import reproduce as do_reproduce

    try:
        sums = do_reproduce(Path(config) if config else None, Path(build_dir) if build_dir else None)
    except ReproducibilityError as exc:  # the verdict, not a failure to run: says so first
        raise ReproducibilityError(f"NOT reproducible: {exc}") from None
    print("reproduce: both cold builds are identical:")
    for name, digest in sums.items():
        print(f"  {digest[:32]}...  {name}")


# ---------------------------------------------------------------------------------------------
# Tasks of other parts are appended below this line, one marked section each:
#   smoke   (image.vm.smoke)    -- boot engineer
#   bench   (image.bench.boot)    -- boot engineer
#   docker  (Dockerfile)     -- boot engineer
#   publish (image.release.publish.cli)  -- publish engineer
# ---------------------------------------------------------------------------------------------


# --- smoke, bench, docker (boot engineer: image/vm/smoke.py, image/bench/boot.py, image/release/docker.py) ---

ISO_HELP = "ISO to boot (default: build/out/<iso.artifact> of image/image.yaml)"
TIMEOUT_HELP = "seconds to wait for the summary line, per boot (default 300)"


@task(
    iterable=["way"],
    help={
        "iso": ISO_HELP,
        "way": "boot only this way (repeatable): seabios-cd, seabios-disk, ovmf-cd, ovmf-disk, "
        "ovmf-secureboot-cd, ovmf-secureboot-disk (default: all six)",
        "parallel": "boots at a time, 1 or 2 (default 2)",
        "timeout": TIMEOUT_HELP,
    },
)
def smoke(
    c: Context, iso: str | None = None, way: list[str] | None = None, parallel: int = 2, timeout: int = 300
) -> None:
    """Boot the ISO under QEMU (TCG, 1 GiB) six ways: SeaBIOS / OVMF / OVMF + Secure Boot, each as CD
    and as disk (USB path); each passes when the serial console shows the client's summary line with
    the right boot mode and Secure Boot state. Serial logs: <build dir>/smoke/<way>/serial.log."""
    _logging()
    from image.vm import smoke as sm
    from image.vm.qemu import BOOT_WAYS, boot_way

    ways = [boot_way(w) for w in way] if way else list(BOOT_WAYS)
    iso_path = Path(iso) if iso else sm.default_iso()
    results = sm.run_matrix(iso_path, sm.workdir_for(iso_path), ways=ways, parallel=parallel, timeout=timeout)
    print("\n" + sm.report(results))
    failed = [r.way.name for r in results if not r.passed]
    if failed:
        raise Exit(f"smoke: FAILED: {', '.join(failed)} (serial logs under {sm.workdir_for(iso_path)})", code=1)
    print(f"smoke: all {len(results)} ways passed")


@task(
    auto_shortflags=False,
    iterable=["way"],
    help={
        "iso": ISO_HELP,
        "way": "time only this boot way (repeatable; default: all six, as inv smoke -w)",
        "cold": "also time a cold build from scratch in build/bench-cold/ (long: fresh rootfs and layers)",
        "rebuild": "time the incremental rebuilds after touching/changing a client file (default on; --no-rebuild)",
        "boot": "time the boots: bare-kernel baseline + the six ways (default on; --no-boot)",
        "chain": "also boot each way with the ISO stage's boot chain around a probe initramfs, to show what "
        "firmware + boot loaders cost (default on; --no-chain)",
        "parallel": "boots at a time (default 1, so the times compare with the baseline)",
        "timeout": TIMEOUT_HELP,
        "against": "another ISO (e.g. a copy of the previous build's) booted right after each way: before/after",
        "cpus": "vCPUs of every guest, baseline included (default 1, as inv smoke boots; at most the host's cores)",
        "firmware-baseline": "each UEFI way also next to the bare kernel loaded directly by its own firmware "
        "(default on; --no-firmware-baseline)",
    },
)
def bench(
    c: Context,
    iso: str | None = None,
    cold: bool = False,
    rebuild: bool = True,
    boot: bool = True,
    chain: bool = True,
    parallel: int = 1,
    timeout: int = 300,
    against: str | None = None,
    cpus: int = 1,
    firmware_baseline: bool = True,
    way: list[str] | None = None,
) -> None:
    """Print build times, ISO and layer sizes, and seconds to the summary line per boot way next to
    a bare kernel + tiny initramfs boot measured in the same run (ratios against the targets)."""
    _logging()
    from image.bench import boot as b
    from image.vm import smoke as sm
    from image.vm.qemu import BOOT_WAYS, boot_way

    if not 1 <= cpus <= (os.cpu_count() or 1):
        raise Exit(f"bench: --cpus must be between 1 and this machine's {os.cpu_count()} cores, got {cpus}", code=1)
    ways = [boot_way(w) for w in way] if way else list(BOOT_WAYS)
    inv = [str(REPO / ".venv" / "bin" / "inv")]
    cold_cmd = None
    cold_dir = REPO / "build" / "bench-cold"
    if cold:
        b.remove_build_dir(cold_dir)
        cold_cmd = [*inv, "build", "--build-dir", str(cold_dir)]
    try:
        report = b.run_bench(
            Path(iso) if iso else sm.default_iso(),
            REPO / "build" / "bench" / "boot",
            build_cmd=[*inv, "build"] if rebuild else None,
            cold_build_cmd=cold_cmd,
            ways=ways if boot else (),
            parallel=parallel,
            timeout=timeout,
            probe=chain,
            against=Path(against) if against else None,
            cpus=cpus,
            firmware_baseline=firmware_baseline,
        )
    finally:
        if cold:
            b.remove_build_dir(cold_dir)  # a full rootfs and layers nobody reuses
    print("\n" + report.format())


@task(
    help={
        "tag": "image name (default localhost/failback-livecd:latest)",
        "engine": "docker or buildah (default: docker when installed, else buildah --isolation chroot "
        "with a locally made debian:bookworm base in build/cache/docker)",
        "ca-bundle": "buildah only: CA bundle the build's pip must trust behind a TLS-inspecting proxy "
        "(default: $PIP_CERT / $REQUESTS_CA_BUNDLE / $SSL_CERT_FILE when set); not kept in the image",
    }
)
def docker(
    c: Context, tag: str = "localhost/failback-livecd:latest", engine: str | None = None, ca_bundle: str | None = None
) -> None:
    """Build the Dockerfile (the ISO build in a container; same install-deps.sh as the README)."""
    _logging()
    from image.release import docker as d

    how = d.build(tag, engine, ca_bundle=Path(ca_bundle) if ca_bundle else d.host_ca_bundle())
    print(f"docker: built {tag}; build the ISO with:\n  {how}")


# --- publish, bench-publish (publish engineer: image/release/publish/cli.py, image/bench/publish.py) ---


@task(
    help={
        "regions": "all (28 commercial DRS regions + us-gov-east-1, us-gov-west-1), commercial, govcloud, "
        "or a comma list such as us-east-1,eu-west-1",
        "version": "release version: the {version}/ prefix in the buckets and installerVersion of latest/manifest.json",
        "iso": "ISO to publish (default: build/out/<iso.artifact> of image/image.yaml)",
        "assets": "replication assets tarball, published as {version}/failback_assets/failback_assets.tar.gz "
        "(latest/manifest.json is only written with it)",
        "endpoint-url": "S3 endpoint (tests, S3-compatible stores; default: AWS, or $AWS_ENDPOINT_URL_S3)",
        "bucket-prefix": "bucket names are <prefix>-<region> and <prefix>-hashes-<region> "
        "(default aws-elastic-disaster-recovery)",
        "expected-owner": "account id sent as ExpectedBucketOwner on every request",
        "acl": "canned ACL for every object, e.g. public-read (default none: bucket-owner-enforced buckets "
        "refuse ACLs; make buckets public with a bucket policy)",
        "gpg-key": "sign SHA512SUMS with this GPG key (detached, armoured: SHA512SUMS.asc in the hashes bucket)",
        "dry-run": "print the plan (every object: bucket, key, size, sha512) and write nothing",
        "jobs": "regions published at once (default 30)",
        "transfer-jobs": "large objects (uploads, server-side copies) written at once across all regions "
        "(default 8; the CPU count for an S3 endpoint on loopback)",
        "seed-copy": "upload once per partition and copy server-side to the other regions (default on; --no-seed-copy)",
        "multipart-threshold-mib": "files from this size go multipart (default 64)",
        "multipart-chunksize-mib": "multipart part size, at least 5 (default 16)",
        "progress": "auto (bars on a terminal, lines otherwise), rich, plain or none",
        "profile": "AWS profile (default: the standard credential chain)",
    }
)
def publish(
    c: Context,
    regions: str,
    version: str,
    iso: str | None = None,
    assets: str | None = None,
    endpoint_url: str | None = None,
    bucket_prefix: str = "aws-elastic-disaster-recovery",
    expected_owner: str | None = None,
    acl: str | None = None,
    gpg_key: str | None = None,
    dry_run: bool = False,
    jobs: int = 30,
    transfer_jobs: int = 0,
    seed_copy: bool = True,
    multipart_threshold_mib: int = 64,
    multipart_chunksize_mib: int = 16,
    progress: str = "auto",
    profile: str | None = None,
) -> None:
    """Publish the ISO (and replication assets) to the DRS regions' S3 buckets: versioned objects first,
    verified, then their .sha512 hashes, then latest/ copies, then latest/manifest.json. Idempotent: a
    re-run finishes an interrupted publish and uploads nothing that is already there. Exit 1 if any region failed."""
    _logging()
    from image.release.publish.cli import publish_command

    code = publish_command(
        regions,
        version,
        iso=iso,
        assets=assets,
        endpoint_url=endpoint_url,
        bucket_prefix=bucket_prefix,
        expected_owner=expected_owner,
        acl=acl,
        gpg_key=gpg_key,
        dry_run=dry_run,
        jobs=jobs,
        transfer_jobs=transfer_jobs,
        seed_copy=seed_copy,
        multipart_threshold_mib=multipart_threshold_mib,
        multipart_chunksize_mib=multipart_chunksize_mib,
        progress=progress,
        profile=profile,
    )
    if code:
        raise Exit(code=code)


@task(
    name="bench-publish",
    help={
        "size-mib": "artifact size in MiB (default 200)",
        "regions": "regions of the second run (default 28)",
        "moto-buffer": "test S3 server's object storage: memory (default), disk "
        "(moto's default temp files) or both (side by side)",
    },
)
def bench_publish(c: Context, size_mib: int = 200, regions: int = 28, moto_buffer: str = "memory") -> None:
    """Time publishing one artifact to 1 region and to N regions (moto S3 on 127.0.0.1), side by side
    with the ratio (target: 28 regions <= 3x one region)."""
    from image.bench.publish import main

    code = main(size_mib, regions, moto_buffer=moto_buffer)
    if code:  # 2: bad option, already explained on stderr
        raise Exit("bench-publish: a publish did not verify" if code == 1 else None, code=code)


@task(
    name="bench-replication",
    help={
        "size-mib": "volume size in MiB (default 256)",
        "repeat": "runs; more than one also prints the spread of the ratios",
        "link-mbps": "also full vs delta on a throttled link of this speed (0: skip)",
        "volume": "random (worst case), filesystem (ext4 half full of files) or both",
    },
)
def bench_replication(
    c: Context, size_mib: int = 256, repeat: int = 1, link_mbps: int = 200, volume: str = "both"
) -> None:
    """Replication on loopback, side by side in one run: full sync vs a raw socket copy, delta (1 %)
    vs full sync, resume after a cut, the replicator's peak RSS (prints; asserts nothing about speed),
    on a volume of random bytes and on an ext4 volume half full of files."""
    from image.bench.replication import main

    main(["--size-mib", str(size_mib), "--repeat", str(repeat), "--link-mbps", str(link_mbps), "--volume", volume])


@task(help={"out": "output directory (default build/out/failback_assets)"})
def assets(c: Context, out: str | None = None) -> None:
    """Build the replication software bundle (failback_assets.tar.gz), its .sha512 and
    latest/manifest.json, reproducibly; `inv publish --assets` uploads it."""
    _logging()
    from image.release.assets import build_assets

    result = build_assets(Path(out) if out else None)
    print(f"{result.tarball}\nsha512 {result.sha512}\ninstallerVersion {result.version}")


@task(
    help={
        "iso": "ISO to boot (default build/out/aws-failback-livecd-64bit.iso: `inv build` first)",
        "work": "scratch directory (default build/e2e/run)",
        "timeout": "seconds for the whole run (default 2400)",
        "installation-ttl": "the admin's credentials expire this many seconds after pairing (0: never; default 60)",
        "client-credentials-ttl": "lifetime of the credentials DRS issues the installed client (default 30)",
    }
)
def e2e(
    c: Context,
    iso: str | None = None,
    work: str | None = None,
    timeout: float = 2400.0,
    installation_ttl: float = 60.0,
    client_credentials_ttl: float = 30.0,
) -> None:
    """The whole failback in QEMU: control plane + S3 + agent on the host, the ISO booted unattended from a
    seed volume, Failback pressed, digests compared; ends printing source and target sha512."""
    _logging()
    from image.core.paths import DEFAULT_BUILD
    from image.vm.e2e import E2EOptions, credential_lines, default_iso, run_e2e

    res = run_e2e(
        E2EOptions(
            iso=Path(iso) if iso else default_iso(),
            work=Path(work) if work else DEFAULT_BUILD / "e2e" / "run",
            timeout=timeout,
            installation_ttl=installation_ttl or None,
            client_credentials_ttl=client_credentials_ttl,
        )
    )
    print(
        f"job {res.job_status}, failback state {res.failback_state}, QEMU {res.boot_outcome}, ready after "
        f"{res.seconds_to_ready:.0f} s, total {res.seconds_total:.0f} s; serial console: {res.serial_log}"
    )
    for note in res.notes:
        print(note)
    for line in credential_lines(res):
        print(line)
    print(f"source sha512: {res.source_sha512}")
    print(f"target sha512: {res.target_sha512}")
    if not res.ok:
        converted = f" and a booted converted system (converted boot: {res.converted_boot})" if res.converted else ""
        raise Exit(f"e2e: the failback did not complete with equal digests{converted}", code=1)


@task(
    iterable=["set"],
    help={
        "out": "seed image to write (e.g. build/seed.img); mode 0600: it may hold credentials",
        "set": "KEY=VALUE (repeatable; keys as in client/SEED.md, e.g. AWS_REGION=eu-west-1); wins over --file",
        "file": "seed file to start from (failback-seed.env or .yaml format)",
        "format": "fat (USB stick / virtual disk, default) or iso (second CD drive)",
    },
)
def seed(c: Context, out: str, set: list[str] | None = None, file: str | None = None, format: str = "fat") -> None:
    """Build a seed volume (label FBSEED, holding failback-seed.env) for an unattended failback."""
    _logging()
    from image.release.seedimage import build_seed_image

    result = build_seed_image(Path(out), seed_file=Path(file) if file else None, sets=set or (), kind=format)  # type: ignore[arg-type]  # a str from the command line: checked there
    print(f"seed: {result.describe()}")


# --- namespaces ------------------------------------------------------------------------------------------------
# The tasks grouped where that helps (`inv bench.boot`, `inv bench.replication`, `inv publish.run`); each
# group's first task is its default, so `inv bench ...` and `inv publish ...` run as before, and the old
# flat names `bench-publish`, `bench-replication` stay as aliases (README, CI and the tests use them).

ns = invoke.Collection()
for _t in (
    build,
    rootfs,
    overlay,
    client,
    squashfs,
    bootloader,
    iso,
    hashes,
    lint,
    test,
    clean,
    reproduce,
    smoke,
    docker,
    assets,
    e2e,
    seed,
):
    ns.add_task(_t)
_bench = invoke.Collection("bench")
_bench.add_task(bench, name="boot", default=True)
_bench.add_task(bench_publish, name="publish")
_bench.add_task(bench_replication, name="replication")
ns.add_collection(_bench)
_publish = invoke.Collection("publish")
_publish.add_task(publish, name="run", default=True)
ns.add_collection(_publish)
ns.add_task(bench_publish, name="bench-publish")
ns.add_task(bench_replication, name="bench-replication")
