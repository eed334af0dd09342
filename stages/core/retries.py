"""What a storage failure means, and retrying the transient ones with bounded backoff.

Transient failures (throttling, 5xx, dropped connections) are retried twice over: each cloud client
retries single requests with its own backoff (``STAGE_STORE_CLIENT_RETRIES`` sets how often, for
every client; unset: each client's default policy), then :func:`with_retries` retries the whole
operation (``STAGE_STORE_ATTEMPTS`` attempts, default 4, backoff from ``STAGE_STORE_BACKOFF_S``,
default 1 s, x4, at most 30 s) and finally raises :class:`~stages.core.errors.StoreError` in one
line that names the URI.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec

from stages.core.errors import StoreError, UserError
from stages.core.uris import redact

log = logging.getLogger(__name__)
ATTEMPTS = 4  # default of STAGE_STORE_ATTEMPTS: tries of one operation, the first included
T = TypeVar("T")


class _WithoutTraceback(logging.Filter):
    """Keep a storage library's line about a failed request, drop its stack trace: the store retries
    the operation and, when it keeps failing, reports it in one line that names the URI."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        return True


for _library in ("gcsfs", "s3fs", "adlfs.spec"):  # the loggers these libraries log their retries on
    logging.getLogger(_library).addFilter(_WithoutTraceback())


# How often each client retries one request (STAGE_STORE_CLIENT_RETRIES), before the retries below.


def _client_retries() -> int | None:
    try:
        return max(0, int(os.environ["STAGE_STORE_CLIENT_RETRIES"]))
    except (KeyError, ValueError):
        return None  # unset (or unreadable): each client keeps its own policy


def client_options(scheme: str) -> dict[str, Any]:
    retries = _client_retries()
    if scheme == "s3" and retries is not None:
        # botocore's "standard" mode retries throttling, 5xx and connection errors with jittered backoff.
        # Explicit options replace fsspec's configured ones (FSSPEC_S3=...) whole, so those are kept here.
        config_kwargs = dict(fsspec.config.conf.get("s3", {}).get("config_kwargs") or {})
        config_kwargs["retries"] = {"mode": "standard", "max_attempts": retries + 1}
        return {"config_kwargs": config_kwargs}
    return {}


def tune_client_retries(fs: fsspec.AbstractFileSystem) -> None:
    """Make every client retry one request ``STAGE_STORE_CLIENT_RETRIES`` times (when it is set)."""
    retries = _client_retries()
    if retries is None or getattr(fs, "_stage_client_retries", None) == retries:
        return
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols:
        fs.retries = 1  # botocore retries each request (max_attempts above); no second loop in s3fs
    if "gs" in protocols:
        # gcsfs fixes 6 tries (sleeping 1, 2, 4, 8, 16 s) when its class is defined; rewrap this instance's
        # request methods with the wanted count.
        from gcsfs.retry import retry_request

        for name in ("_request", "_get_file_request", "_get_file_concurrent"):
            inner = getattr(getattr(type(fs), name, None), "__wrapped__", None)
            if inner is not None:
                setattr(fs, name, types.MethodType(retry_request(retries=retries + 1)(inner), fs))
    if "abfs" in protocols:
        # azure-storage-blob defaults to 3 retries after 15 s, 18 s and 24 s; adlfs passes no retry
        # settings through, so the policy object the client's pipeline holds is adjusted in place.
        policy = getattr(getattr(getattr(fs, "service_client", None), "_config", None), "retry_policy", None)
        if policy is not None:
            policy.total_retries = policy.connect_retries = policy.read_retries = policy.status_retries = retries
            policy.initial_backoff, policy.increment_base, policy.random_jitter_range = 1, 2, 1
    fs._stage_client_retries = retries


# ---------------------------------------------------------------------------------------------
# What a failure means: the fs libraries raise their own exception types (botocore, aiohttp, azure,
# gcsfs), wrapped in OSError or not, so the store classifies them by type name and status code.

_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
# botocore (connection-level), aiohttp, azure-core, google-auth, requests, urllib3, fsspec
_TRANSIENT_TYPES = frozenset(
    """
    EndpointConnectionError ConnectionClosedError ReadTimeoutError ConnectTimeoutError HTTPClientError
    ProxyConnectionError ResponseStreamingError IncompleteReadError ServerDisconnectedError
    ClientConnectionError ClientConnectorError ClientOSError ClientPayloadError ServerTimeoutError
    ServiceRequestError ServiceResponseError ServiceRequestTimeoutError ServiceResponseTimeoutError
    IncompleteRead TransportError ChecksumError FSTimeoutError ProxyError ChunkedEncodingError
    ConnectionError ConnectTimeout ReadTimeout RemoteDisconnected ResponseParserError
    """.split()  # noqa: SIM905
)
_THROTTLE_CODES = frozenset(
    """
    SlowDown Throttling ThrottlingException RequestLimitExceeded ServerBusy RequestTimeout
    InternalError ServiceUnavailable OperationTimedOut TooManyRequestsException rateLimitExceeded
    backendError
    """.split()  # noqa: SIM905
)
# s3fs turns a 503 into OSError(EBUSY) and a 500 into OSError(EREMOTEIO); the rest are the sockets'.
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE}
# A path no file system can open as given: the user's to fix, not the store's to retry.
_INVALID_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP}
_DENIED_STATUS = {401, 403}
_DENIED_CODES = frozenset(
    """
    AccessDenied InvalidAccessKeyId SignatureDoesNotMatch ExpiredToken AuthenticationFailed
    AuthorizationFailure AuthorizationPermissionMismatch InsufficientAccountPermissions forbidden
    """.split()  # noqa: SIM905
)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    for attr in ("status_code", "status", "code"):  # azure-core, aiohttp, gcsfs HttpError
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return str(getattr(exc, "error_code", "") or getattr(exc, "reason", "") or "")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify(exc: BaseException) -> str:
    """One of "missing", "exists", "denied", "invalid", "unsupported", "transient" or "permanent"."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return "missing"
    if isinstance(exc, FileExistsError):
        return "exists"
    if isinstance(exc, PermissionError):
        return "denied"
    for err in _chain(exc):
        status, code, name = _status(err), _error_code(err), type(err).__name__
        if status == 404 or name in ("ResourceNotFoundError", "NoSuchKey"):
            return "missing"
        if status in _DENIED_STATUS or code in _DENIED_CODES or name == "ClientAuthenticationError":
            return "denied"
        if isinstance(err, OSError) and str(err).startswith("Forbidden"):  # gcsfs's 403
            return "denied"
        if status == 501 or code == "NotImplemented":  # e.g. a conditional write an S3-compatible store lacks
            return "unsupported"
        if status in _TRANSIENT_STATUS or code in _THROTTLE_CODES or name in _TRANSIENT_TYPES:
            return "transient"
        if isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return "transient"
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return "transient"
        if isinstance(err, OSError) and err.errno in _INVALID_ERRNOS:
            return "invalid"
    return "permanent"


_STORAGE_MODULES = frozenset(
    """
    botocore aiobotocore s3fs aiohttp azure adlfs gcsfs google requests urllib3 fsspec
    """.split()  # noqa: SIM905
)


def _from_storage(exc: BaseException) -> bool:
    return any(
        isinstance(err, OSError) or type(err).__module__.split(".")[0] in _STORAGE_MODULES for err in _chain(exc)
    )


def _describe(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__)


def _attempts() -> int:
    try:
        return max(1, int(os.environ.get("STAGE_STORE_ATTEMPTS", ATTEMPTS)))
    except ValueError:
        return ATTEMPTS


def _backoff() -> float:
    try:
        return max(0.0, float(os.environ.get("STAGE_STORE_BACKOFF_S", 1.0)))
    except ValueError:
        return 1.0


def with_retries(what: str, uri: str, fn: Callable[[], T]) -> T:
    """Run fn, retrying transient errors with bounded exponential backoff; other errors pass through.

    Missing and already-existing objects keep their built-in types (callers branch on them); a
    permission problem becomes a UserError; the rest becomes a StoreError that names the URI. Library
    messages are redacted and the library exception is not chained, so no credential reaches a log.
    """
    attempts, delay = _attempts(), _backoff()
    # Errors are raised after the except block: the library's exception (unredacted text) is not
    # chained to ours, while whatever the caller was already handling stays visible in the traceback.
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError):
            raise
        except Exception as exc:
            kind = classify(exc)
            if kind == "exists" or (kind == "permanent" and not _from_storage(exc)):
                raise  # an existing object callers branch on, or a bug rather than the store
            failure = _describe(exc)
        if kind == "missing":
            raise FileNotFoundError(f"{redact(uri)} does not exist ({failure})")
        if kind == "invalid":
            raise UserError(f"cannot {what} {redact(uri)!r}: {failure}")
        if kind == "unsupported":
            raise NotImplementedError(f"the store cannot {what} {redact(uri)!r} this way: {failure}")
        if kind == "denied":
            raise UserError(
                f"permission denied to {what} {redact(uri)!r}: check the artifact root and the credentials "
                f"in the environment ({failure})"
            )
        if kind == "permanent":
            raise StoreError(f"could not {what} {redact(uri)!r}: {failure}")
        if attempt == attempts:
            raise StoreError(
                f"could not {what} {redact(uri)!r} after {attempts} attempts (the store kept failing): {failure}"
            )
        log.warning("%s %s failed (%s); retrying in %.1fs", what, redact(uri), failure, delay)
        time.sleep(delay)
        delay = min(delay * 4, 30.0)
    raise AssertionError("unreachable")
