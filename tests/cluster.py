"""A cluster on this machine for tests and benchmarks: an S3-compatible server (moto's standalone server,
its own process on a loopback port) and a Ray cluster of real nodes (`ray start --head`, then more
nodes joining it, each with its own temporary directory). Nothing is shared between the nodes and the
driver but the object store: that is what a KubeRay or cloud-VM cluster without a shared disk looks like.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(15)


@contextlib.contextmanager
def s3_server(bucket: str = "mfpo") -> Iterator[dict[str, str]]:
    """Start moto's S3 server; yield the environment variables a client needs (the usual AWS_* ones)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-" + secrets.token_hex(8),
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        client = _client(env)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield env
    finally:
        _stop(proc)


def _client(env: dict[str, str]) -> Any:
    """A boto3 S3 client for the server `s3_server` started (the test's own view of the bucket)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def s3_keys(env: dict[str, str], bucket: str, prefix: str) -> list[str]:
    """The keys under s3://bucket/prefix/, relative to it (listing only: cheap enough to poll)."""
    base = prefix.rstrip("/") + "/"
    pages = _client(env).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
    return [obj["Key"][len(base) :] for page in pages for obj in page.get("Contents", [])]


def s3_objects(env: dict[str, str], bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under s3://bucket/prefix/ (relative key -> bytes)."""
    client = _client(env)
    base = prefix.rstrip("/") + "/"
    keys = s3_keys(env, bucket, prefix)
    return {key: client.get_object(Bucket=bucket, Key=base + key)["Body"].read() for key in keys}


@contextlib.contextmanager
def ray_cluster(root: Path, env: dict[str, str], nodes: int = 2, cpus_per_node: int = 1) -> Iterator[str]:
    """Start a head node and `nodes - 1` more joining it, each with its own temporary directory and the
    given environment (credentials reach the workers through their node, as on a real cluster). Ray's
    token authentication stays on: every node and the driver read the same token file. Yields the
    address to pass as `run.ray.address`."""
    token = root / "ray-token"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text(secrets.token_hex(32))
    port = free_port()
    full_env = {
        **os.environ,
        **env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_DISABLE_USAGE_STATS": "1",
    }
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--num-gpus", "0"]
    procs: list[subprocess.Popen] = []
    address = f"127.0.0.1:{port}"
    log = open(root / "ray-nodes.log", "ab")  # noqa: SIM115 - closed below
    # The nodes' session folders hold AF_UNIX sockets, whose paths may not exceed 107 bytes: a short folder of
    # their own, not pytest's (deep under pytest-xdist's per-worker basetemp).
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        head = ["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temp / "node-0")]
        procs.append(
            subprocess.Popen(
                [str(BIN / "ray"), "start", *head, *common],
                env=full_env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        )
        _wait_for_nodes(address, full_env, 1)
        for k in range(1, nodes):
            procs.append(
                subprocess.Popen(
                    [str(BIN / "ray"), "start", "--address", address, "--temp-dir", str(temp / f"node-{k}"), *common],
                    env=full_env,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            )
        _wait_for_nodes(address, full_env, nodes)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def cluster_env(address_env: dict[str, str], root: Path) -> dict[str, str]:
    """The environment a driver needs to join a cluster started by `ray_cluster(root, ...)`."""
    return {**address_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(root / "ray-token")}


def _wait_for_nodes(address: str, env: dict[str, str], count: int, timeout: float = 120) -> None:
    script = (
        "import sys, time, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        f"deadline = time.monotonic() + {timeout}\n"
        f"while len([n for n in ray.nodes() if n['Alive']]) < {count}:\n"
        "    if time.monotonic() > deadline: sys.exit('nodes did not join')\n"
        "    time.sleep(0.3)\n"
    )
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray cluster at {address} did not come up with {count} node(s):\n{proc.stderr}")
        time.sleep(1)
