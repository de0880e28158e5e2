"""The failback client's console workflow: preflight -> arguments/prompts -> identify -> map -> verify ->
download -> configure -> pair -> replicate -> finish (guide steps 5-19).

With --check-only (FAILBACK_CHECK_ONLY=1) it stops cleanly after the connectivity checks of step 12.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from failback_client import __version__
from failback_client.api import DrsApi
from failback_client.bootmode import before_replication
from failback_client.configure import ReplicationSetup, check_config, mapped_volumes, write_config
from failback_client.console import Console
from failback_client.devices import LocalDisk, discover
from failback_client.download import download_software
from failback_client.drs_credentials import switch_to_drs_credentials
from failback_client.errors import EXIT_OK, ClientError, ClockError, ConnectivityError, CredentialsError
from failback_client.finish import SUCCESS_MESSAGE, after_final_sync, finish, report_completion
from failback_client.identify import choose, local_identity, recovery_disks
from failback_client.last_look import confirm_overwrite
from failback_client.map_volumes import choose_mapping, show_mapping
from failback_client.mapping import MappedVolume, to_api
from failback_client.network import direct_note, prepare_network
from failback_client.newer_iso import NewerIsoCheck
from failback_client.pairing import create_key_and_csr, install_certificates, tls_paths
from failback_client.preflight import Preflight, correct_clock, gather, may_fix_clock, measure_skew
from failback_client.prompts import complete_settings
from failback_client.replicate import Outcome, Supervisor
from failback_client.replication_api import ReplicationApi
from failback_client.settings import Settings
from failback_client.verify import StepReporter, Target, replication_target, service_targets, tcp_problem

log = logging.getLogger(__name__)
_T = TypeVar("_T")

STOP_MESSAGE = (
    "--check-only: every check passed; the failback client stops here without downloading the "
    "replication software or writing to any disk."
)
DEFAULT_WORK_DIR = "/var/lib/failback"  # on the LiveCD: the RAM-backed root (nothing of it survives a reboot)


def run_preflight(settings: Settings, console: Console) -> Preflight:
    """Print the summary line first (before any prompt), then the preflight table and its warnings."""
    pre = gather(settings.sysroot, include_loop=settings.include_loop)
    if not console.summary_shown:
        console.raw(pre.summary_line())
    console.table(("Check", "Value", "Verdict"), pre.rows(), title="Preflight")
    if pre.memory_warning():
        console.warn(pre.memory_warning() or "")
    if pre.secure_boot:
        console.warn("Secure Boot is on: turn it off in the firmware settings before failing back.")
    if pre.hwclock_local:
        console.warn(
            f"The hardware clock keeps local time ({pre.hwclock_reason}); set it to UTC in the firmware "
            "or run `hwclock --systohc --utc` once the system clock is right."
        )
    return pre


def check_clock(settings: Settings, console: Console) -> None:
    skew = measure_skew(settings.endpoint_url)
    if skew is None:
        log.info("no Date header from %s: clock skew not measured", settings.endpoint_url)
        return
    log.info("clock skew against %s: %.1f s", settings.endpoint_url, skew.seconds)
    if not skew.too_large:
        if abs(skew.seconds) >= 30:
            console.warn(f"{skew.describe()}; within what AWS accepts, but check the time source.")
        return
    if may_fix_clock(settings.sysroot, settings.fix_clock):
        correct_clock(skew)
        console.ok(f"{skew.describe()}: corrected the system clock to the endpoint's time")
        return
    raise ClockError(f"{skew.describe()}. {skew.advice()}")


def local_disks_for_api(local: list[LocalDisk]) -> list[dict[str, Any]]:
    return [
        {"deviceName": d.path, "bytes": d.size_bytes, "persistentNames": [*d.by_path, *d.by_id, *d.by_uuid][:32]}
        for d in local
        if not d.boot_medium
    ]


PROMPTED_FIELDS = ("access_key_id", "secret_access_key", "session_token", "region", "endpoint")
MAX_CREDENTIAL_ATTEMPTS = 5


def connect(settings: Settings, console: Console) -> DrsApi:
    """Steps 6-7: complete the settings, then check the credentials at once with a real call. Answers that
    came from the prompt are asked again after a refusal; arguments and variables are not (exit instead)."""
    for attempt in range(1, MAX_CREDENTIAL_ATTEMPTS + 1):
        complete_settings(settings, console)
        console.claim_or_wait()
        console.info(f"Region {settings.region}, endpoint {settings.endpoint_url}")
        check_clock(settings, console)
        api = DrsApi(settings)
        console.info("Checking the credentials with Elastic Disaster Recovery…")
        try:
            api.check_credentials()
        except CredentialsError as e:
            prompted = [f for f in PROMPTED_FIELDS if settings.origin.get(f) == "prompt"]
            if settings.no_prompt or not prompted or attempt == MAX_CREDENTIAL_ATTEMPTS:
                raise
            console.error(f"{e}.")
            console.info("Please enter them again.")
            for field in prompted:
                setattr(settings, field, None)
                settings.origin.pop(field)
                if field == "endpoint":
                    settings.default_endpoint = False
            continue
        console.ok(f"Credentials accepted by Elastic Disaster Recovery in {settings.region}")
        return api
    raise AssertionError("unreachable")


def run(settings: Settings, console: Console) -> int:
    pre = run_preflight(settings, console)
    prepare_network(settings, console)
    # Read the disks again: the client starts while udev may still be naming them (by-id, by-path),
    # and the network step gave it time to finish.
    pre.disks = discover(settings.sysroot, include_loop=settings.include_loop)
    api = connect(settings, console)
    newer_iso = NewerIsoCheck.start(settings.region, settings.s3_endpoint)  # a notice in the background

    identity = local_identity(settings.sysroot)
    log.info("local identity: macs=%s uuid=%s", identity.macs, identity.system_uuid)
    choice = choose(
        api, console, identity, pre.disks, wanted_id=settings.recovery_instance_id, no_prompt=settings.no_prompt
    )
    console.ok(f"Recovery instance {choice.id}: {choice.reason}")
    if newer_iso is not None:
        newer_iso.report(console)

    local_api = local_disks_for_api(pre.disks)
    identification: dict[str, Any] = {
        "hostname": identity.hostname[:255] or "failback-client",
        "macAddresses": identity.macs[:64],
        "bootMode": pre.boot_mode,
        "secureBoot": bool(pre.secure_boot),
    }
    if identity.system_uuid:
        identification["vmWareUuid"] = identity.system_uuid
    if pre.memory_kb:
        identification["ramBytes"] = pre.memory_kb * 1024
    link = api.associate(choice.id, identification, local_api, __version__)
    client_id = link["failbackClientID"]
    steps = StepReporter(api, console, client_id, choice.id)
    steps.set("LINK_FAILBACK_CLIENT_WITH_RECOVERY_INSTANCE", "SUCCEEDED")

    steps.set("COMPLETE_VOLUME_MAPPING", "IN_PROGRESS")
    try:
        volumes = choose_mapping(
            api,
            console,
            client_id=client_id,
            recovery_instance_id=choice.id,
            recovery=recovery_disks(choice.instance),
            local=pre.disks,
            local_api=local_api,
            original_server=choice.original_server or bool(link.get("failbackToOriginalServer")),
            device_mapping=settings.device_mapping,
            value_format=settings.dm_value_format,
            no_prompt=settings.no_prompt,
        )
        show_mapping(console, volumes)
        api.update_mapping(client_id, choice.id, to_api(volumes))
    except BaseException:
        steps.set("COMPLETE_VOLUME_MAPPING", "FAILED")
        raise
    steps.set("COMPLETE_VOLUME_MAPPING", "SUCCEEDED")

    steps.set("ESTABLISH_RECOVERY_INSTANCE_COMMUNICATION", "IN_PROGRESS")
    problems = []
    replication = replication_target(link.get("replicationEndpoint", {}), choice.instance, settings.agent_port)
    problem = tcp_problem(replication)
    if problem:
        problems.append(problem)
        steps.set("ESTABLISH_RECOVERY_INSTANCE_COMMUNICATION", "FAILED")
    else:
        note = direct_note()
        console.ok(f"Reached {replication.what} at {replication.address}" + (f" ({note})" if note else ""))
        steps.set("ESTABLISH_RECOVERY_INSTANCE_COMMUNICATION", "SUCCEEDED")
    for target in service_targets(settings.endpoint_url, settings.region or "", settings.s3_endpoint, dict(os.environ)):
        problem = tcp_problem(target)
        if problem:
            problems.append(problem)
        else:
            console.ok(f"Reached {target.what} at {target.address}")
    if problems:
        for p in problems:
            console.error(p)
        raise ConnectivityError(f"{len(problems)} connectivity check(s) failed; fix them and start the client again")

    if settings.check_only:
        console.info(STOP_MESSAGE)
        return EXIT_OK
    confirm_overwrite(settings, console, volumes, choice.id)  # the last look: nothing is written before it
    rapi = ReplicationApi(api, client_id, choice.id, bandwidth_mbps=link.get("bandwidthThrottling"))
    original = bool(choice.original_server or link.get("failbackToOriginalServer"))
    return replicate(settings, console, api, rapi, steps, volumes, replication, original)


def _step(steps: StepReporter, rapi: ReplicationApi, name: str, error: str, action: Callable[[], _T]) -> _T:
    """Run one initiation step: IN_PROGRESS, then SUCCEEDED, or FAILED with the DRS error name reported."""
    steps.set(name, "IN_PROGRESS")
    try:
        result = action()
    except ClientError as e:
        steps.set(name, "FAILED")
        try:
            rapi.update_info(dataReplicationError={"error": error, "rawError": str(e)[:1000]})
        except ClientError as report_error:
            log.warning("could not report %s: %s", error, report_error)
        raise
    return result


def replicate(
    settings: Settings,
    console: Console,
    api: DrsApi,
    rapi: ReplicationApi,
    steps: StepReporter,
    volumes: list[MappedVolume],
    agent: Target,
    original_server: bool,
) -> int:
    """Steps 13-19: download, configure, pair, replicate until Failback (or StopFailback), finish."""
    work = Path(settings.work_dir or DEFAULT_WORK_DIR)
    run_dir, tls_dir = work / "run", work / "tls"

    console.info(f"Downloading the replication software for {settings.region}...")
    software = _step(
        steps,
        rapi,
        "DOWNLOAD_REPLICATION_SOFTWARE_TO_FAILBACK_CLIENT",
        "FAILED_TO_DOWNLOAD_REPLICATION_SOFTWARE_TO_FAILBACK_CLIENT",
        lambda: download_software(settings.region or "", settings.s3_endpoint, work / "software"),
    )
    steps.set("DOWNLOAD_REPLICATION_SOFTWARE_TO_FAILBACK_CLIENT", "SUCCEEDED")
    console.ok(f"Replication software {software.version} downloaded, sha512 verified ({software.sha512[:16]}...)")

    def configure() -> ReplicationSetup:
        bandwidth = rapi.bandwidth_mbps
        setup = ReplicationSetup(
            recovery_instance_id=rapi.ids["recoveryInstanceID"],
            client_id=rapi.ids["failbackClientID"],
            agent_host=agent.host,
            agent_port=agent.port,
            volumes=mapped_volumes(volumes),
            rescan=original_server,
            bandwidth_mbps=bandwidth or None,
            state_dir=work / "state",
            tls=tls_paths(tls_dir),
        )
        check_config(software, write_config(setup, run_dir / "replicator.json"))
        return setup

    setup = _step(steps, rapi, "CONFIGURE_REPLICATION_SOFTWARE", "FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE", configure)
    steps.set("CONFIGURE_REPLICATION_SOFTWARE", "SUCCEEDED")
    console.info(
        "Replication: "
        + (
            "rescan (original server: only blocks that differ are sent)"
            if setup.rescan
            else "full sync (another server: every block is sent)"
        )
        + (f", bandwidth limited to {setup.bandwidth_mbps} Mbps" if setup.bandwidth_mbps else "")
    )

    def pair() -> None:
        csr = create_key_and_csr(tls_dir, setup.client_id)
        issued = rapi.issue_certificate(csr)
        install_certificates(tls_dir, setup.client_id, issued["certificate"], issued["caCertificate"])
        # Installed: from here on, credentials DRS issues this client (the admin's may expire).
        switch_to_drs_credentials(api, console, setup.client_id, setup.recovery_instance_id, tls_paths(tls_dir).key)
        setup.agent_identity = issued["agentCommonName"]
        check_config(software, write_config(setup, run_dir / "replicator.json"))
        console.ok(
            f"Certificate issued for {setup.client_id}; pairing with agent {setup.agent_identity} at {agent.address}"
        )

    _step(steps, rapi, "PAIR_AGENT_WITH_REPLICATION_SOFTWARE", "FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE", pair)
    # PAIR_AGENT_WITH_REPLICATION_SOFTWARE succeeds when the replication software's TLS handshake does.
    before_replication(settings, console, api, setup)  # Windows: same boot mode as the source, before any write

    supervisor = Supervisor(software, setup, run_dir / "replicator.json", rapi, steps, console)
    try:
        outcome = supervisor.run()
        if outcome is Outcome.STOPPED:
            console.info(
                "Failback was stopped in Elastic Disaster Recovery (StopFailback): replication has stopped "
                "and nothing more is written. Start the failback client again to fail back later."
            )
            return EXIT_OK
        targets = [Path(target) for _, target in setup.volumes]
        after_final_sync(targets, console, settings)
        report_completion(rapi, console)
        supervisor.liveness.send_logs("completion")
    except BaseException as e:
        supervisor.liveness.send_logs(f"failure: {type(e).__name__}")  # DRS keeps the log of what went wrong
        raise
    finally:
        supervisor.liveness.close()
    console.ok(SUCCESS_MESSAGE)
    finish(settings, console)
    return EXIT_OK
