"""The S3 object store: the only module that imports boto3/botocore.

What rpofs needs of a store is small: put an object only if it is absent,
read a byte range, its size, list a prefix, delete. `Bucket` does those and
turns every botocore failure into one rpofs error (rpofs.errors) that names
the store and says what to do, so nothing above knows the library.

Endpoint and credentials come the way every S3 tool takes them, through a
boto3 session: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE and the profiles in ~/.aws/config and ~/.aws/credentials
(endpoint_url included). A store is named `s3://BUCKET/PREFIX`.

Writes are single PUTs with `If-None-Match: *`, never multipart: Ceph 16's
RGW honours the condition on PUT (412 on an existing key, checked here) but
not on multipart completion, and a pack (~16 MiB) is small enough for one
PUT. Faults: botocore's "standard" retry mode retries 5xx, SlowDown,
throttling and connection errors with exponential backoff (a random delay
up to 1, 2, 4 s: at most 7 s of waiting over ATTEMPTS tries), every call has
connect and read timeouts, and then one StoreError says why. So an
unreachable store fails a call within ~7 s plus ATTEMPTS connect timeouts,
never hangs.

Checksums: botocore 1.36+ sends CRC32 trailers in aws-chunked bodies by
default, which RGW 16 does not take; they are asked only "when required"
(blake3 checks every record anyway, rpofs.store.chunks).
"""

import dataclasses
import threading
from typing import BinaryIO
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions

from ..errors import (PackMissing, RpofsError, StoreAuthError, StoreConflict, StoreError, StoreFull,
                      StoreUnreachable)

ATTEMPTS = 4            # tries of one call (the first and three retries)
CONNECT_TIMEOUT = 5     # s to open a connection
READ_TIMEOUT = 30       # s without a byte from an open connection (a 16 MiB PUT at 1 MiB/s still passes)
POOL = 16               # connections kept per client: the cache's fetchers and the uploads

_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
         "AuthorizationHeaderMalformed", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


@dataclasses.dataclass(frozen=True)
class StoreUrl:
    bucket: str
    prefix: str          # "" or "a/b" (no leading or trailing slash)

    @classmethod
    def parse(cls, url: str) -> "StoreUrl":
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise RpofsError(f"not a store URL: {url!r} (expected s3://BUCKET/PREFIX)")
        bucket = parts.netloc
        if not (3 <= len(bucket) <= 63) or not all(c.islower() or c.isdigit() or c in ".-" for c in bucket):
            raise RpofsError(f"not a bucket name: {bucket!r} (3-63 lower-case letters, digits, '.' and '-')")
        return cls(bucket, parts.path.strip("/"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


class Bucket:
    """One bucket of one store, as an S3 client with rpofs's errors.
    Thread-safe (a botocore client is; its connection pool has POOL slots)."""

    def __init__(self, url: StoreUrl, attempts: int = ATTEMPTS, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT):
        self.url = url
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=connect_timeout, read_timeout=read_timeout, max_pool_connections=POOL,
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        try:
            self._session = boto3.session.Session()
            self._client = self._session.client("s3", config=config)
        except botocore.exceptions.BotoCoreError as e:  # a profile that does not exist, a bad config file
            raise StoreError(f"{url}: {e}") from None
        self.endpoint = self._client.meta.endpoint_url
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return str(self.url)

    def close(self) -> None:
        """Close the connections (else the garbage collector does, with a ResourceWarning)."""
        self._client.close()

    def __enter__(self) -> "Bucket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the operations --------------------------------------------------------

    def ensure_bucket(self) -> None:
        """The bucket, created when it is missing."""
        try:
            self._call("checking the bucket", self._client.head_bucket, Bucket=self.url.bucket)
            return
        except StoreError as e:
            if not isinstance(e, _NoBucket):
                raise
        region = self._client.meta.region_name
        extra = {} if region in (None, "us-east-1", "aws-global") else \
            {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            self._call("creating the bucket", self._client.create_bucket, Bucket=self.url.bucket, **extra)
        except StoreError as e:
            if getattr(e, "code", "") in ("BucketAlreadyOwnedByYou",):
                return
            raise StoreError(f"{self.url}: bucket {self.url.bucket} does not exist and cannot be created: "
                             f"{e.reason}") from None

    def put_new(self, name: str, body: "bytes | BinaryIO") -> None:
        """Store `body` under `name` only if nothing is there: StoreConflict
        if something is (412 from the store). body: bytes, or a binary file
        read from where it is (streamed, not held in memory: a local pack
        that `rpofs store push` moves may be GiBs; botocore rewinds it for
        a retry)."""
        self._call(f"writing {name}", self._client.put_object, Bucket=self.url.bucket, Key=self.url.key(name),
                   Body=body, IfNoneMatch="*")

    def put(self, name: str, body: bytes) -> None:
        """Store `body` under `name`, replacing what is there (a lease)."""
        self._call(f"writing {name}", self._client.put_object, Bucket=self.url.bucket, Key=self.url.key(name),
                   Body=body)

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> tuple[bytes, int]:
        """(bytes [start, stop) of the object, or all of it; the object's
        size). A range starting at or past its end gives b"". PackMissing
        when the object is not there."""
        kwargs = {}
        if start is not None:
            kwargs["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
        try:
            answer = self._call(f"reading {name}", self._client.get_object, Bucket=self.url.bucket,
                                Key=self.url.key(name), **kwargs)
        except _Unsatisfiable:
            return b"", self.size(name)
        try:
            data = answer["Body"].read()
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            raise StoreUnreachable(f"{self.url}: reading {name}: the connection failed: {e}") from None
        total = answer.get("ContentRange", "")
        size = int(total.rsplit("/", 1)[1]) if "/" in total else answer["ContentLength"]
        return data, size

    def size(self, name: str) -> int:
        """The object's size; PackMissing when it is not there."""
        answer = self._call(f"reading the size of {name}", self._client.head_object, Bucket=self.url.bucket,
                            Key=self.url.key(name))
        return answer["ContentLength"]

    def list(self, under: str = "") -> dict[str, int]:
        """{name: size} of every object whose name starts with `under`
        (names relative to the prefix)."""
        out = {}
        base = self.url.key(under) if under or self.url.prefix else ""
        strip = len(self.url.key("")) if self.url.prefix else 0
        paginator = self._client.get_paginator("list_objects_v2")

        def pages():
            return list(paginator.paginate(Bucket=self.url.bucket, Prefix=base))
        for page in self._call(f"listing {base or 'the bucket'}", pages):
            for item in page.get("Contents", ()):
                out[item["Key"][strip:]] = item["Size"]
        return out

    def dirs(self, under: str) -> "list[str]":
        """The names one level below `under` (which ends with "/") that
        objects are under, e.g. dirs("hosts/") -> ["kvm1", "kvm2"]."""
        base = self.url.key(under)
        paginator = self._client.get_paginator("list_objects_v2")

        def pages():
            return list(paginator.paginate(Bucket=self.url.bucket, Prefix=base, Delimiter="/"))
        out = []
        for page in self._call(f"listing {base}", pages):
            for item in page.get("CommonPrefixes", ()):
                out.append(item["Prefix"][len(base):].rstrip("/"))
        return sorted(out)

    def any(self, under: str = "") -> str | None:
        """The name of one object whose name starts with `under`, or None."""
        base = self.url.key(under) if under or self.url.prefix else ""
        answer = self._call(f"listing {base or 'the bucket'}", self._client.list_objects_v2,
                            Bucket=self.url.bucket, Prefix=base, MaxKeys=1)
        found = answer.get("Contents", ())
        return found[0]["Key"] if found else None

    def delete(self, name: str) -> None:
        """Remove the object (nothing when it is not there)."""
        self._call(f"deleting {name}", self._client.delete_object, Bucket=self.url.bucket, Key=self.url.key(name))

    # -- errors ------------------------------------------------------------------

    def _call(self, what: str, fn, *args, **kwargs):
        """fn(...) with botocore's errors (after its retries) as rpofs errors."""
        where = f"{self.url} ({self.endpoint})"
        try:
            return fn(*args, **kwargs)
        except botocore.exceptions.NoCredentialsError:
            raise StoreAuthError(f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                 f"or AWS_PROFILE)") from None
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError) as e:
            raise StoreUnreachable(f"{where}: {what}: the store cannot be reached after {ATTEMPTS} tries: "
                                   f"{e}") from None
        except botocore.exceptions.ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            reason = f"{code or status}" + (f": {error['Message']}" if error.get("Message") else "")
            if code == "NoSuchBucket" or (status == 404 and fn == self._client.head_bucket):
                raise _NoBucket(f"{where}: bucket {self.url.bucket} does not exist", code, reason) from None
            if code in _MISSING or status == 404:
                raise PackMissing(f"{self.url}: object {what.split(' ')[-1]} is missing") from None
            if code == "InvalidRange" or status == 416:
                raise _Unsatisfiable(what, code, reason) from None
            if code == "PreconditionFailed" or status == 412:
                raise StoreConflict(f"{where}: {what}: the object already exists", code, reason) from None
            if code == "QuotaExceeded":
                raise StoreFull(f"{where}: {what}: the store's quota is reached (no space left)", code,
                                reason) from None
            if code in _AUTH or status == 403:
                raise StoreAuthError(f"{where}: {what}: the store refused the credentials ({reason}); check "
                                     f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile", code,
                                     reason) from None
            if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                raise StoreUnreachable(f"{where}: {what}: the store answered {reason} after {ATTEMPTS} tries",
                                       code, reason) from None
            raise StoreError(f"{where}: {what}: {reason}", code, reason) from None
        except botocore.exceptions.BotoCoreError as e:
            raise StoreError(f"{where}: {what}: {e}") from None


class _NoBucket(StoreError):
    pass


class _Unsatisfiable(StoreError):
    """A range starting past the object's end (416)."""

