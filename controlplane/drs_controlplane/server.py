"""The HTTP front end: POST /<Operation>, SigV4, request/response validation against the merged model,
AWS error shapes, throttling injection, and a `Date` header from the control plane's (adjustable) clock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from botocore.model import OperationModel, ServiceModel
from failback_client.drs_model import drs_service_model

from drs_controlplane import errors, modelcheck
from drs_controlplane.certs import IssuedCertificate, agent_common_name, sign_csr
from drs_controlplane.client_credentials import DEFAULT_TTL, ClientCredentialIssuer
from drs_controlplane.documents import apply_seed
from drs_controlplane.errors import ApiError
from drs_controlplane.policies import request_resources
from drs_controlplane.seed import Seed
from drs_controlplane.service import DrsService
from drs_controlplane.sigv4 import Credential, verify
from drs_controlplane.store import Store

log = logging.getLogger("drs_controlplane")
MAX_BODY = 8 * 1024 * 1024


class ResponseShapeError(RuntimeError):
    """A handler produced a response that doesn't fit the model: a bug in the control plane."""


@dataclass(frozen=True)
class RequestRecord:
    """What the control plane saw, for tests (no bodies, no credentials)."""

    operation: str | None
    status: int
    error_code: str | None
    access_key: str | None
    principal: str | None = None


def validate_response(model: ServiceModel, operation: str, body: dict[str, Any]) -> None:
    """Raise ResponseShapeError if `body` doesn't fit the operation's output shape (or isn't empty without one)."""
    op = model.operation_model(operation)
    if op.output_shape is None:
        if body:
            raise ResponseShapeError(f"{operation} has no output shape but the response has {sorted(body)}")
        return
    problems = modelcheck.check_shape(op.output_shape, body)
    if problems:
        raise ResponseShapeError(
            f"{operation} response does not fit {op.output_shape.name}: " + modelcheck.summary(problems)
        )


class ControlPlane:
    """A running (or startable) control plane. Thread-safe knobs for tests: throttle_next(), clock_offset."""

    def __init__(
        self,
        *,
        state_path: Path | str,
        credentials: Iterable[Credential],
        region: str = "us-east-1",
        seed: Seed | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        client_credentials_ttl: timedelta = DEFAULT_TTL,
        client_not_seen_after: timedelta | None = None,
    ) -> None:
        self.model = drs_service_model()
        self.region = region
        self.store = Store(state_path)
        self.credentials = {c.access_key: c for c in credentials}
        self.clock_offset = timedelta(0)
        self.service = DrsService(self.store, region, self.now)
        if client_not_seen_after is not None:
            self.service.client_not_seen_after = client_not_seen_after
        # What DRS issues the installed failback client (GetFailbackClientCredentialsForDrs): unsigned calls.
        self.issuer = ClientCredentialIssuer(self.store, region, self.now, client_credentials_ttl, self.add_credential)
        self.service.handlers[self.issuer_operation] = self.issuer.handle
        self.requests: list[RequestRecord] = []
        # DRS answers every call with UninitializedAccountException until the account is initialized
        # in the Region: a likely first error for a client pointed at the wrong Region.
        self.account_initialized = True
        self._throttle_left = 0
        self._throttle_retry_after = 1
        self._knob_lock = threading.Lock()
        if seed is not None:
            apply_seed(self.store, seed, region, self.now())
        self._host, self._port = host, port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Handlers must return model-conformant bodies; tests can swap one to prove the check bites.
        self.response_hooks: dict[str, Any] = {}

    # knobs ------------------------------------------------------------------------------------
    def now(self) -> datetime:
        return datetime.now(UTC) + self.clock_offset

    def throttle_next(self, count: int, retry_after: int = 1) -> None:
        """The next `count` authenticated requests get 429 ThrottlingException with Retry-After."""
        with self._knob_lock:
            self._throttle_left, self._throttle_retry_after = count, retry_after

    issuer_operation = "GetFailbackClientCredentialsForDrs"

    def add_credential(self, credential: Credential) -> None:
        if credential.issued_to:  # DRS-issued: forget those expired over an hour ago (a client refreshes often)
            cutoff = self.now() - timedelta(hours=1)
            for key, old in list(self.credentials.items()):
                if old.issued_to and old.expires_at is not None and old.expires_at < cutoff:
                    del self.credentials[key]
        self.credentials[credential.access_key] = credential

    def set_credential_expiry(self, access_key: str, expires_at: datetime | None) -> None:
        """Make a known credential expire at `expires_at` (tests: installation credentials run out)."""
        self.credentials[access_key] = dataclasses.replace(self.credentials[access_key], expires_at=expires_at)

    def counts(self) -> dict[str, int]:
        """The request record in figures: issued client credentials, refreshes, denials, expired tokens."""
        issued = sum(1 for r in self.requests if r.operation == self.issuer_operation and r.status == 200)
        clients = {r.principal for r in self.requests if r.operation == self.issuer_operation and r.status == 200}
        return {
            "credentials issued": issued,
            "credential refreshes": max(0, issued - len(clients)),
            "access denied": sum(1 for r in self.requests if r.error_code == "AccessDeniedException"),
            "expired token": sum(1 for r in self.requests if r.error_code == "ExpiredTokenException"),
        }

    def _authorize(self, credential: Credential, operation: str, params: dict[str, Any]) -> None:
        """IAM's decision: the credential's policy must allow the action on every resource of the request,
        and a credential scoped to one recovery instance acts on no other."""
        account = self.store.get("account") or "123456789012"
        for resource in request_resources(params, self.region, account):
            allowed = credential.policy is None or credential.policy.allows(operation, resource)
            if allowed and credential.scope_instance and resource != "*":
                allowed = resource.endswith(f":recovery-instance/{credential.scope_instance}")
            if not allowed:
                raise errors.access_denied(
                    f"User: {credential.principal} is not authorized to perform: "
                    f"drs:{operation} on resource: {resource}"
                )

    def issue_agent_certificate(
        self, recovery_instance_id: str, csr_pem: str, extra_ips: tuple[str, ...] = ("127.0.0.1",)
    ) -> IssuedCertificate:
        """Sign the agent's CSR (CN = agent_common_name(id)) as a TLS server certificate for TCP 1500.

        The agent on a real recovery instance gets it through the service with its instance profile; here
        the agent side of a test asks the plane directly. SANs: the instance's IPs plus `extra_ips`.
        """
        with self.store.transaction():
            record = self.store.recovery_instance(recovery_instance_id)
        if record is None:
            raise KeyError(f"no recovery instance {recovery_instance_id}")
        ips = tuple(ip for ip in (record.internal.get("privateIP"), record.internal.get("publicIP")) if ip)
        return sign_csr(
            self.store,
            csr_pem,
            expected_cn=agent_common_name(recovery_instance_id),
            now=self.now(),
            server=True,
            ip_addresses=tuple(dict.fromkeys(ips + extra_ips)),
        )

    def _take_throttle(self) -> int | None:
        with self._knob_lock:
            if self._throttle_left > 0:
                self._throttle_left -= 1
                return self._throttle_retry_after
        return None

    # lifecycle --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("control plane is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def bind(self) -> str:
        """Open the listening socket (port 0 = a free port) and return the URL."""
        if self._httpd is None:
            handler = type("Handler", (_Handler,), {"plane": self})
            self._httpd = ThreadingHTTPServer((self._host, self._port), handler)
            self._httpd.daemon_threads = True
            log.info("DRS control plane listening on %s (region %s, state %s)", self.url, self.region, self.store.path)
        return self.url

    def start(self) -> ControlPlane:
        """Serve in a background thread (tests, fixtures)."""
        self.bind()
        assert self._httpd is not None
        # A short poll interval makes stop() quick (tests start and stop many planes).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="drs-controlplane", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until stop() from another thread or KeyboardInterrupt."""
        self.bind()
        assert self._httpd is not None
        self._httpd.serve_forever()

    def stop(self) -> None:
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = self._thread = None
        self.store.close()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # request handling -------------------------------------------------------------------------
    def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes, host_url: str
    ) -> tuple[int, dict[str, str], dict[str, Any], str | None, str | None, str | None]:
        """Process one request → (status, headers, JSON body, operation, access key, principal)."""
        operation: str | None = None
        access_key: str | None = None
        principal: str | None = None
        try:
            unsigned = path.split("?", 1)[0] == f"/{self.issuer_operation}"
            credential = None
            if not unsigned:
                credential = verify(
                    method=method,
                    host_url=host_url,
                    path_and_query=path,
                    headers=headers,
                    body=body,
                    region=self.region,
                    credentials=self.credentials,
                    now=self.now(),
                )
                access_key, principal = credential.access_key, credential.principal
            retry_after = self._take_throttle()
            if retry_after is not None:
                raise errors.throttling(retry_after)
            op = self._route(method, path)
            operation = op.name
            if not self.account_initialized:
                raise ApiError(400, "UninitializedAccountException", "Account not initialized")
            params = self._parse(op, body)
            if credential is not None:
                self._authorize(credential, op.name, params)
            handler = self.service.handlers.get(op.name)
            if handler is None:
                raise ApiError(501, "NotImplemented", f"{op.name} is not implemented by the local DRS control plane")
            with self.store.transaction():
                result = handler(params)
            hook = self.response_hooks.get(op.name)
            if hook is not None:
                result = hook(result)
            validate_response(self.model, op.name, result)
            if unsigned:
                principal = f"failback-client/{params['failbackClientID']}"
            return 200, {}, result, operation, access_key, principal
        except ApiError as exc:
            try:
                self._check_error(exc)
            except ResponseShapeError:
                log.exception("control plane bug: malformed %s", exc.code)
                exc = errors.internal()
            if exc.code == "AccessDeniedException":
                log.warning("denied: %s", exc.message)
            return (
                exc.status,
                {"x-amzn-ErrorType": exc.code, **exc.headers},
                exc.body(),
                operation,
                access_key,
                principal,
            )
        except Exception:
            log.exception("control plane bug while handling %s", operation or path)
            bug = errors.internal()
            return bug.status, {"x-amzn-ErrorType": bug.code}, bug.body(), operation, access_key, principal

    def _route(self, method: str, path: str) -> OperationModel:
        name = path.split("?", 1)[0].lstrip("/")
        if name in self.model.operation_names:
            op = self.model.operation_model(name)
            if op.http.get("method") == method and op.http.get("requestUri") == f"/{name}":
                return op
        raise ApiError(404, "UnknownOperationException", f"Unknown operation {method} {path.split('?', 1)[0]}")

    @staticmethod
    def _parse(op: OperationModel, body: bytes) -> dict[str, Any]:
        try:
            params = json.loads(body or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise errors.validation(f"Request body is not valid JSON: {exc}", reason="cannotParse") from None
        if not isinstance(params, dict):
            raise errors.validation("Request body must be a JSON object", reason="cannotParse")
        if op.input_shape is not None:
            problems = modelcheck.check_shape(op.input_shape, params)
            if problems:
                raise errors.validation(modelcheck.summary(problems), [(p.path, p.message) for p in problems])
        return params

    def _check_error(self, exc: ApiError) -> None:
        """Modeled errors must fit their shape too (unmodeled auth errors carry just a message)."""
        if exc.code in self.model.shape_names:
            problems = modelcheck.check_shape(self.model.shape_for(exc.code), exc.body())
            if problems:
                raise ResponseShapeError(f"{exc.code} does not fit its shape: {modelcheck.summary(problems)}")


class _Handler(BaseHTTPRequestHandler):
    plane: ControlPlane
    protocol_version = "HTTP/1.1"
    server_version = "DRSControlPlane/0.1"

    def date_time_string(self, timestamp: float | None = None) -> str:
        # The client measures its clock skew from this header: it follows the plane's clock.
        return format_datetime(self.plane.now(), usegmt=True)

    def log_message(self, format: str, *args: Any) -> None:  # request lines go through _log_request
        pass

    def _respond(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _handle(self) -> None:
        started = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True  # the unread body would be taken for the next request
            self._respond(
                413, {"x-amzn-ErrorType": "RequestEntityTooLargeException"}, {"message": "Request body too large"}
            )
            return
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        host_url = "http://" + headers.get("host", "")
        status, extra, payload, operation, key, principal = self.plane.handle(
            self.command, self.path, headers, body, host_url
        )
        code = extra.get("x-amzn-ErrorType")
        # Recorded before the answer goes out: a client that has its answer finds the request in the log.
        self.plane.requests.append(RequestRecord(operation, status, code, key, principal))
        self._respond(status, extra, payload)
        log.info(
            "%s %s -> %s%s (%.1f ms)",
            self.command,
            operation or self.path,
            status,
            f" {code}" if code else "",
            (time.monotonic() - started) * 1000,
        )

    def do_POST(self) -> None:
        self._handle()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST
