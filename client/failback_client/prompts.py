"""Ask for whatever the arguments and variables did not give (guide steps 6-7); re-ask with the reason."""

from __future__ import annotations

from collections.abc import Callable

from failback_client.console import Console
from failback_client.logs import REDACTOR
from failback_client.regions import default_endpoint, region_problem
from failback_client.settings import Settings, endpoint_problem, missing_error, normalize_endpoint

ACCESS_KEY_PREFIXES = ("AKIA", "ASIA", "AIDA", "AROA", "AGPA", "ANPA", "ANVA", "AIPA", "ABIA", "ACCA")


def access_key_problem(value: str) -> str | None:
    value = value.strip()
    if not value:
        return "the AWS Access Key ID cannot be empty"
    if not value.isalnum() or not 16 <= len(value) <= 128:
        return "an AWS Access Key ID has 16-128 letters and digits (e.g. AKIA… or ASIA…)"
    return None


def secret_problem(value: str) -> str | None:
    if not value.strip():
        return "the AWS Secret Access Key cannot be empty"
    if any(ch.isspace() for ch in value.strip()):
        return "an AWS Secret Access Key has no spaces"
    return None


def _ask_until(console: Console, prompt: str, check: Callable[[str], str | None], *, secret: bool = False) -> str:
    while True:
        answer = console.ask(prompt, secret=secret)
        problem = check(answer)
        if problem is None:
            return answer.strip()
        console.error(f"{problem}. Please try again.")


def complete_settings(settings: Settings, console: Console) -> None:
    """Fill in credentials, region and endpoint by prompting (or fail naming what is missing with --no-prompt)."""
    REDACTOR.add(*settings.secrets())
    asked_credentials = False
    if not settings.access_key_id:
        if settings.no_prompt:
            raise missing_error("access_key_id", "the AWS Access Key ID")
        settings.access_key_id = _ask_until(console, "AWS Access Key ID: ", access_key_problem)
        settings.origin["access_key_id"] = "prompt"
        asked_credentials = True
    if not settings.secret_access_key:
        if settings.no_prompt:
            raise missing_error("secret_access_key", "the AWS Secret Access Key")
        settings.secret_access_key = _ask_until(
            console, "AWS Secret Access Key (not shown): ", secret_problem, secret=True
        )
        settings.origin["secret_access_key"] = "prompt"
        REDACTOR.add(settings.secret_access_key)
        asked_credentials = True
    temporary = settings.access_key_id.strip().startswith("ASIA")
    if settings.session_token is None:
        if settings.no_prompt:
            if temporary:
                raise missing_error("session_token", "the AWS Session Token (the key ASIA… is temporary)")
        elif asked_credentials or temporary:
            # Blank is fine for long-term keys (guide step 6); not echoed: it is a credential.
            token = console.ask(
                "AWS Session Token (leave blank if not using temporary credentials; not shown): ", secret=True
            ).strip()
            settings.session_token = token or None
            settings.origin["session_token"] = "prompt"
            REDACTOR.add(token)
    if not settings.region:
        if settings.no_prompt:
            raise missing_error("region", "the AWS Region")
        settings.region = _ask_until(console, "AWS Region (e.g. us-east-1): ", region_problem)
        settings.origin["region"] = "prompt"
    if not settings.endpoint_known:
        if settings.no_prompt:
            # Enter at the prompt means the default endpoint: without prompting, that is what we use.
            settings.default_endpoint = True
            settings.origin["endpoint"] = "default (--no-prompt)"
        else:
            default = default_endpoint(settings.region)
            answer = _ask_until(
                console,
                f"Custom endpoint, e.g. a VPC endpoint (press Enter for the default {default}): ",
                lambda a: None if not a.strip() else endpoint_problem(normalize_endpoint(a)),
            )
            if answer:
                settings.endpoint = normalize_endpoint(answer)
            else:
                settings.default_endpoint = True
            settings.origin["endpoint"] = "prompt"
