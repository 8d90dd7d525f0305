"""Reading Cloud Storage objects, into memory or into a local file kept current: this process's
client, retries, errors and counters.

Transient failures (429, 5xx, resets, timeouts) are retried with exponential backoff; a missing
object or bucket and refused credentials raise at once, each with its own `GCSError` subclass
whose message names the object and what to do.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import google.auth
import requests
import urllib3
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption

logger = logging.getLogger(__name__)
T = TypeVar("T")
SCHEME = "gs://"
TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_TYPES = (
    ConnectionError,  # includes reset / aborted / refused
    TimeoutError,
    http.client.HTTPException,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    auth_exceptions.TransportError,  # network failure while fetching a token
    DataCorruption,  # checksum mismatch, e.g. a truncated body
)


class GCSError(OSError):
    """A Cloud Storage read failed; the message names the object and what to do."""


class GCSNotFoundError(GCSError, FileNotFoundError):
    """The object does not exist."""


class GCSBucketNotFoundError(GCSNotFoundError):
    """The bucket does not exist."""


class GCSPermissionError(GCSError, PermissionError):
    """The credentials are missing, invalid or may not read the bucket."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for transient errors; `timeout` is per request (s)."""

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    timeout: float = 60.0

    def delay(self, attempt: int) -> float:
        """Sleep before retry number `attempt` (1-based): uniform in [0, base * 2^(attempt-1)]."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


@dataclass
class Stats:
    """Counters of this process (a forked worker starts from zero)."""

    objects_read: int = 0
    bytes_read: int = 0
    retries: int = 0
    cache_hits: int = 0
    files_downloaded: int = 0


_stats: dict[int, Stats] = {}
_clients: dict[tuple[int, str | None], storage.Client] = {}


def stats() -> Stats:
    """This process's counters (live object: read its fields)."""
    return _stats.setdefault(os.getpid(), Stats())


def reset_stats() -> None:
    """Zero this process's counters."""
    _stats[os.getpid()] = Stats()


def get_client() -> storage.Client:
    """This process's client, created on first use.

    Keyed by pid: a forked data-loader worker must not reuse its parent's connections (or the
    client's background threads), so it makes its own. Also keyed by the emulator address.
    """
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    key = (os.getpid(), emulator)
    if key not in _clients:
        if emulator:
            # The emulator ignores auth: anonymous credentials keep the library from looking up
            # this machine's real credentials (absent in CI) and sending tokens to a local server.
            client = storage.Client(
                project=os.environ.get("GOOGLE_CLOUD_PROJECT"), credentials=AnonymousCredentials()
            )
        else:
            try:
                credentials, project = google.auth.default(scopes=storage.Client.SCOPE)
            except auth_exceptions.DefaultCredentialsError as exc:
                raise GCSPermissionError(
                    f"no Google Cloud credentials in this container ({exc}); run on a node with "
                    "a service account or set GOOGLE_APPLICATION_CREDENTIALS."
                ) from exc
            client = storage.Client(project=project, credentials=credentials)
        _clients.setdefault(key, client)
    return _clients[key]


def split_path(path: str) -> tuple[str, str]:
    """`gs://bucket/a/b.jpg` -> `("bucket", "a/b.jpg")`."""
    bucket, _, name = str(path).removeprefix(SCHEME).partition("/")
    if not str(path).startswith(SCHEME) or not bucket or not name:
        raise ValueError(f"{path!r} is not a Cloud Storage object path gs://bucket/object")
    return bucket, name


def _permanent_error(exc: Exception, bucket: str, name: str) -> GCSError | None:
    """The clear error for a failure that retrying cannot fix, else None."""
    uri = f"{SCHEME}{bucket}/{name}"
    if isinstance(exc, api_exceptions.NotFound):
        # A 404 does not say whether the bucket or the object is missing: ask (once, failing).
        with contextlib.suppress(Exception):  # e.g. no storage.buckets.get: blame the object
            if not get_client().bucket(bucket).exists(timeout=10, retry=None):
                return GCSBucketNotFoundError(
                    f"bucket {bucket} does not exist (reading {uri}): check data.bucket."
                )
        return GCSNotFoundError(f"{uri} not found: check data.bucket and data.prefix.")
    if isinstance(exc, api_exceptions.Forbidden):
        return GCSPermissionError(
            f"forbidden: the credentials of this container cannot read bucket {bucket} ({uri}); "
            "grant its service account roles/storage.objectViewer on the bucket."
        )
    # DefaultCredentialsError: also what refreshing unusable credentials raises.
    bad_credentials = (auth_exceptions.RefreshError, auth_exceptions.DefaultCredentialsError)
    if isinstance(exc, api_exceptions.Unauthorized) or (
        isinstance(exc, bad_credentials) and not getattr(exc, "retryable", False)
    ):
        return GCSPermissionError(
            f"bad or missing Google Cloud credentials for {uri} ({exc}); run on a node with a "
            "service account or set GOOGLE_APPLICATION_CREDENTIALS."
        )
    return None


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code in TRANSIENT_CODES
    return isinstance(exc, TRANSIENT_TYPES) or bool(getattr(exc, "retryable", False))


def call_with_retries(fn: Callable[[], T], bucket: str, name: str, policy: RetryPolicy) -> T:
    """Run `fn` (one request on gs://bucket/name), retrying transient errors per `policy`."""
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return fn()
        except GCSError:
            raise
        except Exception as exc:
            permanent = _permanent_error(exc, bucket, name)
            if permanent is not None:
                raise permanent from exc
            uri = f"{SCHEME}{bucket}/{name}"
            if not _is_transient(exc):
                raise GCSError(f"{uri}: {type(exc).__name__}: {exc}") from exc
            if attempt == policy.max_attempts:
                raise GCSError(
                    f"{uri}: still failing after {attempt} attempts ({type(exc).__name__}: "
                    f"{exc}); Cloud Storage or the network is unavailable, try again later."
                ) from exc
            delay = policy.delay(attempt)
            stats().retries += 1
            logger.warning("%s: %s; retry %d in %.2fs", uri, type(exc).__name__, attempt, delay)
            time.sleep(delay)
    raise ValueError(f"RetryPolicy.max_attempts must be >= 1, not {policy.max_attempts}")


def read_object(bucket: str, name: str, policy: RetryPolicy | None = None) -> bytes:
    """The bytes of gs://bucket/name, with retries."""
    policy = policy or RetryPolicy()

    def fetch() -> bytes:
        blob = get_client().bucket(bucket).blob(name)
        return blob.download_as_bytes(timeout=policy.timeout, retry=None)

    data = call_with_retries(fetch, bucket, name, policy)
    counters = stats()
    counters.objects_read += 1
    counters.bytes_read += len(data)
    return data


def _is_current(target: Path, blob: storage.Blob) -> bool:
    """Whether `target` holds this version of `blob`: same size, mtime set to its update time."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return False
    same_time = blob.updated is None or int(st.st_mtime) == int(blob.updated.timestamp())
    return st.st_size == blob.size and same_time


def _download(blob: storage.Blob, target: Path, timeout: float) -> None:
    """Write `blob` to `target` atomically: readers see the old file or the whole new one."""
    # The URL from the client's endpoint (not the metadata's mediaLink), pinned to the generation
    # whose size we compare with.
    pinned = blob.bucket.blob(blob.name, generation=blob.generation)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            pinned.download_to_file(file, timeout=timeout, retry=None)
        if os.path.getsize(tmp) != blob.size:
            raise ConnectionError(f"short read: {os.path.getsize(tmp)} of {blob.size} bytes")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        if blob.updated is not None:
            os.utime(tmp, (blob.updated.timestamp(),) * 2)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def download_object(bucket: str, name: str, target: Path, policy: RetryPolicy) -> bool:
    """Make `target` a copy of gs://bucket/name, with retries; False when it already was one."""
    blob = get_client().bucket(bucket).blob(name)
    call_with_retries(lambda: blob.reload(timeout=policy.timeout, retry=None), bucket, name, policy)
    if _is_current(target, blob):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    call_with_retries(lambda: _download(blob, target, policy.timeout), bucket, name, policy)
    stats().files_downloaded += 1
    return True


def upload_file(path: Path, bucket: str, name: str, policy: RetryPolicy | None = None) -> None:
    """Write the local file `path` to gs://bucket/name, with retries."""
    policy = policy or RetryPolicy()
    blob = get_client().bucket(bucket).blob(name)
    call_with_retries(
        lambda: blob.upload_from_filename(str(path), timeout=policy.timeout, retry=None),
        bucket,
        name,
        policy,
    )
