"""Artifact URIs: which ones are allowed, how they are spelled, and what of them may be shown.

A plain path becomes an absolute ``file://`` URI; ``s3://``, ``gs://``, ``abfs://`` (and fsspec's
``memory://``, for tests of the store, never an artifact root) name objects. Credentials and endpoints
come only from the environment the platform gives the pod, never from config: a URI that carries a
password or a signature is refused, so the resolved config that every stage logs and saves cannot
hold one, and :func:`redact` keeps secrets out of every message the stages write.

Pure string rules: nothing here touches a store.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from stages.core.errors import UserError, shown

ALLOWED_SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "az", "memory")

# Environment variables whose values are secrets: never in a message we write.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "FSSPEC_S3_SECRET",
    "FSSPEC_S3_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
)
# Query parameters that make a URL a credential (presigned S3 URLs, Azure SAS, GCS signed URLs).
SIGNED_QUERY = frozenset(
    """
    sig x-amz-signature x-amz-credential x-amz-security-token x-goog-signature x-goog-credential
    signature token access_token key secret
    """.split()  # noqa: SIM905
)


def normalize_uri(uri: str, field: str = "uri") -> str:
    """A plain path becomes an absolute ``file://`` URI; unknown schemes and embedded credentials are rejected."""
    if not uri:
        raise UserError(f"{field} is empty; give a URI such as file:///data/x or s3://bucket/x")
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return "file://" + os.path.abspath(uri)
    if scheme not in ALLOWED_SCHEMES:
        raise UserError(f"{field}={shown(redact(uri))} uses scheme {scheme!r}; allowed: {', '.join(ALLOWED_SCHEMES)}")
    if _has_credentials(uri):
        raise UserError(
            f"{field}={shown(redact(uri))} carries credentials; URIs are logged and saved with every run, so "
            "credentials must come from the environment (workload identity or the cloud's standard variables)"
        )
    return uri


# The operating system's own folders: a stage run as root would write its artifacts among them.
SYSTEM_FOLDERS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr")


# Stores that live inside one process (fsspec's memory://, for tests of the store itself): outputs
# "committed" there vanish when the stage exits.
VOLATILE_SCHEMES = ("memory",)


def check_artifact_root(uri: str) -> None:
    """An artifact root outlives the stage and is a folder of its own: not a store inside the process, not
    the file system's root, not inside a system folder."""
    scheme = uri.partition("://")[0]
    if scheme in VOLATILE_SCHEMES:
        raise UserError(
            f"artifact_root={shown(uri)} is a store inside this process: what a stage commits there vanishes "
            "when it exits; give a folder or a bucket (file://, s3://, gs://, abfs://)"
        )
    if not is_local(uri):
        return
    path = os.path.normpath(local_path(uri))
    inside = next((f for f in SYSTEM_FOLDERS if path == f or path.startswith(f + "/")), None)
    if path == "/" or inside:
        where = "the file system's root" if path == "/" else f"inside the system folder {inside}"
        raise UserError(f"artifact_root={shown(uri)} is {where}; give the pipeline a folder of its own")


def _has_credentials(uri: str) -> bool:
    parts = urlsplit(uri)
    if ":" in parts.netloc.rpartition("@")[0]:  # user:password@ (a bare user@, as in abfs container@account, is fine)
        return True
    return any(key.lower() in SIGNED_QUERY for key, _ in parse_qsl(parts.query, keep_blank_values=True))


# At most 32 characters of scheme before "://" keep the search linear in the text's length: an unbounded
# ``\w+://`` retried the rest of a long word at each of its characters (minutes for a megabyte).
_USERINFO = re.compile(r"([A-Za-z][\w+.-]{0,31}://)[^/\s:@'\"]+:[^/\s@'\"]+@")


def redact(text: str) -> str:
    """``text`` without URL passwords, URL signatures and the values of the credential variables."""
    text = _USERINFO.sub(r"\1***@", text)
    text = re.sub(
        r"(?i)([?&](?:sig|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
        r"x-goog-credential|signature|access_token)=)[^&\s'\"]+",
        r"\1***",
        text,
    )
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        for secret in [value, *re.findall(r"(?:AccountKey|SharedAccessSignature)=([^;]+)", value)]:
            if len(secret) >= 8:
                text = text.replace(secret, "***")
    return text


def is_uri(name: str) -> bool:
    """A URI or a local path, as opposed to a hub id such as ``org/model``."""
    return "://" in name or name.startswith(("/", "."))


def is_glob(uri: str) -> bool:
    """Whether ``uri`` is a pattern (``*``, ``?`` or ``[`` after the scheme) rather than one file or folder."""
    return any(c in uri.partition("://")[2] for c in "*?[")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))
