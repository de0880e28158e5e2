"""Publishing one region's plan to S3 with boto3/s3transfer: idempotent, verified, in plan order.

For every planned object: HEAD it; if the bucket already holds our bytes (size, `sha512`
metadata and the S3 SHA256 checksum all match the local digests) it is left alone, otherwise it
is written (multipart upload, server-side copy or one PUT, always with ChecksumAlgorithm=SHA256
so S3 checks what it receives) and HEADed again to check what the bucket now holds. Only then
does the next object start, so a publish killed anywhere leaves only verified objects behind,
and a re-run continues where it stopped.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from image.core.errors import ImageError
from image.release.publish.plan import PHASES, PlannedObject, RegionPlan, composite_for_part_size
from image.release.publish.progress import RegionResult, Reporter

CHECKSUM_ALGORITHM = "SHA256"
StepHook = Callable[[str, str, str], None]  # (region, phase, key) after an object is in place


class RegionFailure(ImageError, RuntimeError):
    """A region could not be published; the message names the bucket/key and what to do."""


# One CopyObject copies up to 5 GiB atomically inside S3; only larger objects need part copies.
COPY_SINGLE_LIMIT = 5 * 1024**3


@dataclass
class S3Settings:
    session: boto3.Session
    transfer: TransferConfig
    endpoint_url: str | None = None
    expected_owner: str | None = None
    acl: str | None = None
    seed_copy: bool = True
    # Large-object writes (uploads and server-side copies) in flight at once across ALL regions.
    # Without it 28 regions start 28 copies of the ISO at once: on an S3 server with few CPUs
    # (moto, MinIO on the build host) each then takes minutes, past botocore's 60 s read timeout,
    # and the retries redo the work; it also bounds our upload threads and buffers.
    budget: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(8))


@dataclass(frozen=True)
class SeedObject:
    bucket: str
    key: str
    etag: str
    region: str


class SeedBoard:
    """Per partition, where the first region's verified artifacts are, so that the other regions
    copy them server-side instead of uploading the same bytes again from this host."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._objects: dict[str, dict[str, SeedObject]] = {}

    def _event(self, partition: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(partition, threading.Event())

    def publish(self, partition: str, objects: dict[str, SeedObject]) -> None:
        """Called once by the seed region, with {} when it failed (others then upload themselves)."""
        self._objects[partition] = objects
        self._event(partition).set()

    def wait(self, partition: str) -> dict[str, SeedObject]:
        self._event(partition).wait()
        return self._objects.get(partition, {})


def public_read_policy(bucket: str) -> str:
    """The bucket policy of DRS's regional buckets: anyone may read an object (the LiveCD downloads unsigned)."""
    statement = {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def make_client(settings: S3Settings, region: str) -> Any:
    pool = max(10, settings.transfer.max_request_concurrency * 2 + 2)
    cfg = Config(
        region_name=region,
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=pool,
        # Path-style for custom endpoints (moto, MinIO on an IP); AWS picks its own.
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
    )
    return settings.session.client("s3", region_name=region, endpoint_url=settings.endpoint_url, config=cfg)


def describe_error(exc: BaseException, what: str, region: str) -> str:
    """A one-line, secret-free explanation of why an S3 call failed, with the fix."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        is_bucket = "/" not in what.removeprefix("s3://")  # HeadBucket answers a bare 404
        if code == "NoSuchBucket" or (code == "404" and is_bucket):
            return f"{what}: no such bucket (create it in {region}, or check --bucket-prefix)"
        if code in {"AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            return (
                f"{what}: access denied ({code}); check the credentials' policy, the bucket policy and --expected-owner"
            )
        if code in {"PermanentRedirect", "301", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}:
            actual = headers.get("x-amz-bucket-region") or err.get("Region") or "another region"
            return f"{what}: wrong region, the bucket is in {actual}, not {region}"
        return f"{what}: {code or 'error'}: {err.get('Message') or exc}"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found (environment, ~/.aws/credentials, SSO or instance role)"
    if isinstance(exc, EndpointConnectionError):
        return f"{what}: cannot reach the S3 endpoint ({exc})"
    if isinstance(exc, BotoCoreError):
        return f"{what}: {exc}"
    return f"{what}: {type(exc).__name__}: {exc}"


class RegionPublisher:
    """Publishes one RegionPlan; `run()` never raises, it returns a RegionResult."""

    def __init__(
        self,
        plan: RegionPlan,
        settings: S3Settings,
        reporter: Reporter,
        seeds: SeedBoard,
        is_seed: bool,
        on_step: StepHook | None = None,
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.reporter = reporter
        self.seeds = seeds
        self.is_seed = is_seed
        self.on_step = on_step
        self.result = RegionResult(plan.region, planned=len(plan.objects))
        self._etags: dict[tuple[str, str], str] = {}
        self._client: Any = None
        self._seed_objects: dict[str, SeedObject] | None = None
        self._bytes_lock = threading.Lock()

    # -- S3 calls with the owner header and clear errors -------------------------------------
    def _owner(self, extra: dict[str, Any]) -> dict[str, Any]:
        if self.settings.expected_owner:
            extra["ExpectedBucketOwner"] = self.settings.expected_owner
        return extra

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise RegionFailure(describe_error(exc, what, self.plan.region)) from None

    def _head(self, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            return self._client.head_object(**self._owner({"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise RegionFailure(describe_error(exc, f"s3://{bucket}/{key}", self.plan.region)) from None
        except BotoCoreError as exc:
            raise RegionFailure(describe_error(exc, f"s3://{bucket}/{key}", self.plan.region)) from None

    def _checksum_ok(self, obj: PlannedObject, head: dict[str, Any]) -> bool:
        reported = head.get("ChecksumSHA256")
        if obj.s3.accepts(reported):
            return True
        if not reported or obj.artifact is None:
            return False
        # Composite of another part size (an earlier run used another --multipart-chunksize-mib):
        # learn the part size from part 1 and compute that composite from the local file.
        try:
            part = self._client.head_object(**self._owner({"Bucket": obj.bucket, "Key": obj.key, "PartNumber": 1}))
        except ClientError:
            return False
        parts, part_size = part.get("PartsCount") or 0, part.get("ContentLength") or 0
        if parts < 2 or part_size <= 0:
            return False
        return composite_for_part_size(obj.artifact.path, part_size) == reported.split("-", 1)[0]

    def _mismatch(self, obj: PlannedObject, head: dict[str, Any] | None) -> str | None:
        """Why the bucket's object is not ours (None: it is, byte for byte)."""
        if head is None:
            return "missing"
        if head.get("ContentLength") != obj.size:
            return f"size {head.get('ContentLength')} != {obj.size}"
        if head.get("Metadata", {}).get("sha512") != obj.sha512:
            return "sha512 metadata differs"
        if not self._checksum_ok(obj, head):
            return f"S3 SHA256 checksum {head.get('ChecksumSHA256')!r} does not match the local file"
        return None

    # -- the steps ------------------------------------------------------------------------------
    def _preflight(self) -> None:
        """Both buckets exist, are ours and are in this region, before anything is written."""
        for bucket in (self.plan.release_bucket, self.plan.hashes_bucket):
            resp = self._call(f"s3://{bucket}", self._client.head_bucket, **self._owner({"Bucket": bucket}))
            actual = resp.get("BucketRegion") or resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
                "x-amz-bucket-region"
            )
            if actual and actual != self.plan.region:
                raise RegionFailure(f"s3://{bucket}: wrong region, the bucket is in {actual}, not {self.plan.region}")

    def _abort_stale_uploads(self) -> None:
        """Multipart uploads left by a killed run are invisible but billed: abort ours."""
        keys = {o.key for o in self.plan.objects if o.is_large}
        bucket = self.plan.release_bucket
        resp = self._call(f"s3://{bucket}", self._client.list_multipart_uploads, **self._owner({"Bucket": bucket}))
        for up in resp.get("Uploads", []) or []:
            if up.get("Key") in keys:
                self._call(
                    f"s3://{bucket}/{up['Key']}",
                    self._client.abort_multipart_upload,
                    **self._owner({"Bucket": bucket, "Key": up["Key"], "UploadId": up["UploadId"]}),
                )
                self.result.notes.append(f"aborted a stale multipart upload of {up['Key']}")

    def _extra_args(self, obj: PlannedObject) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "ChecksumAlgorithm": CHECKSUM_ALGORITHM,
            "ContentType": obj.content_type,
            "Metadata": {"sha512": obj.sha512},
        }
        if self.settings.acl:
            extra["ACL"] = self.settings.acl
        return self._owner(extra)

    def _progress(self, nbytes: int) -> None:
        with self._bytes_lock:  # s3transfer calls back from its worker threads
            self.result.bytes += nbytes
        self.reporter.advance(self.plan.region, nbytes)

    def _sent(self, nbytes: int) -> None:
        """Progress of bytes that leave this host (uploads), as opposed to server-side copies."""
        with self._bytes_lock:
            self.result.bytes += nbytes
            self.result.sent_bytes += nbytes
        self.reporter.advance(self.plan.region, nbytes)

    def _copy(self, obj: PlannedObject, source: SeedObject) -> None:
        """Server-side copy: no byte of the object passes through this host."""
        what = f"copy s3://{source.bucket}/{source.key} -> s3://{obj.bucket}/{obj.key}"
        extra = self._extra_args(obj)
        # The copy must be of the object we verified, not of whatever replaced it since.
        extra.update(MetadataDirective="REPLACE", CopySourceIfMatch=source.etag)
        if obj.size <= COPY_SINGLE_LIMIT:
            if self.settings.expected_owner:
                extra["ExpectedSourceBucketOwner"] = self.settings.expected_owner
            # One CopyObject: atomic in S3, no HEAD of the source, no transfer threads.
            self._call(
                what,
                self._client.copy_object,
                Bucket=obj.bucket,
                Key=obj.key,
                CopySource={"Bucket": source.bucket, "Key": source.key},
                **extra,
            )
            self._progress(obj.size)
            return
        # Over 5 GiB S3 copies only by parts: s3transfer's managed copy (it takes no
        # ExpectedSourceBucketOwner; the source was HEADed with the owner check).
        t = self.settings.transfer
        config = TransferConfig(
            multipart_threshold=COPY_SINGLE_LIMIT,
            multipart_chunksize=t.multipart_chunksize,
            max_concurrency=t.max_request_concurrency,
            use_threads=True,
        )
        self._call(
            what,
            self._client.copy,
            CopySource={"Bucket": source.bucket, "Key": source.key},
            Bucket=obj.bucket,
            Key=obj.key,
            ExtraArgs=extra,
            Callback=self._progress,
            SourceClient=make_client(self.settings, source.region),
            Config=config,
        )

    def _write(self, obj: PlannedObject) -> str:
        """Write one object; returns the action done (for the progress lines)."""
        what = f"s3://{obj.bucket}/{obj.key}"
        if obj.data is not None:
            self._call(
                what, self._client.put_object, Bucket=obj.bucket, Key=obj.key, Body=obj.data, **self._extra_args(obj)
            )
            self._sent(obj.size)
            return "put"
        if obj.copy_from is not None:
            etag = self._etags[(obj.bucket, obj.copy_from)]
            with self.settings.budget:
                self._copy(obj, SeedObject(obj.bucket, obj.copy_from, etag, self.plan.region))
            return "copied"
        assert obj.artifact is not None
        seed = self._seed_for(obj)  # waits for the seed region: never while holding a budget slot
        if seed is not None:
            try:
                with self.settings.budget:
                    self._copy(obj, seed)
                return f"copied from {seed.region}"
            except RegionFailure as exc:
                # e.g. no read access to the seed bucket: uploading ourselves still works.
                self.result.notes.append(f"seed copy failed, uploaded instead: {exc}")
        with self.settings.budget:
            self._call(
                what,
                self._client.upload_file,
                Filename=str(obj.artifact.path),
                Bucket=obj.bucket,
                Key=obj.key,
                ExtraArgs=self._extra_args(obj),
                Callback=self._sent,
                Config=self.settings.transfer,
            )
        return "uploaded"

    def _seed_for(self, obj: PlannedObject) -> SeedObject | None:
        if self.is_seed or not self.settings.seed_copy:
            return None
        if self._seed_objects is None:
            self._seed_objects = self.seeds.wait(self.plan.partition)
        return self._seed_objects.get(obj.key)

    def _ensure(self, obj: PlannedObject) -> None:
        head = self._head(obj.bucket, obj.key)
        if (
            obj.immutable
            and head is not None
            and (head.get("Metadata", {}).get("sha512") != obj.sha512 or head.get("ContentLength") != obj.size)
        ):
            raise RegionFailure(
                f"s3://{obj.bucket}/{obj.key} already holds a different file (sha512 "
                f"{head.get('Metadata', {}).get('sha512', 'unknown')[:16]}…): a published version is never "
                "replaced; publish under a new --version"
            )
        if self._mismatch(obj, head) is None:
            action = "ok"
        else:
            action = self._write(obj)
            self.result.written += 1
            head = self._head(obj.bucket, obj.key)
            why = self._mismatch(obj, head)
            if why is not None:
                raise RegionFailure(f"s3://{obj.bucket}/{obj.key}: verification after write failed: {why}")
        assert head is not None
        self._etags[(obj.bucket, obj.key)] = head["ETag"]
        self.result.objects += 1
        self.reporter.object_done(self.plan.region, action, obj.bucket, obj.key, obj.size)
        if self.on_step is not None:
            self.on_step(self.plan.region, obj.phase, obj.key)

    def _delete_stale(self, bucket: str, key: str) -> None:
        if self._head(bucket, key) is not None:
            self._call(
                f"s3://{bucket}/{key}", self._client.delete_object, **self._owner({"Bucket": bucket, "Key": key})
            )
            self.reporter.object_done(self.plan.region, "deleted", bucket, key, 0)

    def _seed_objects_done(self) -> dict[str, SeedObject]:
        return {
            o.key: SeedObject(o.bucket, o.key, self._etags[(o.bucket, o.key)], self.plan.region)
            for o in self.plan.objects
            if o.phase == "artifact"
        }

    def run(self) -> RegionResult:
        start = time.monotonic()
        self.reporter.region_started(self.plan.region, self.plan.transfer_bytes)
        seed_announced = False
        try:
            self._client = make_client(self.settings, self.plan.region)
            self._preflight()
            self._abort_stale_uploads()
            for phase in PHASES:
                for ph, bucket, key in self.plan.deletions:
                    if ph == phase:
                        self._delete_stale(bucket, key)
                for obj in self.plan.objects:
                    if obj.phase == phase:
                        self._ensure(obj)
                if phase == "artifact" and self.is_seed:
                    self.seeds.publish(self.plan.partition, self._seed_objects_done())
                    seed_announced = True
            self.result.verified = self.result.objects == len(self.plan.objects)
        except RegionFailure as exc:
            self.result.error = str(exc)
        except Exception as exc:  # a bug or an unexpected library error: still report per region
            self.result.error = describe_error(exc, f"region {self.plan.region}", self.plan.region)
        finally:
            if self.is_seed and not seed_announced:
                self.seeds.publish(self.plan.partition, {})
            self.result.seconds = time.monotonic() - start
        self.reporter.region_finished(self.result)
        return self.result
