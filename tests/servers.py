"""Helpers to run `keysvc serve` as a subprocess and to open gRPC clients spread over
its worker processes.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from keysvc.v1 import keys_pb2, keys_pb2_grpc, seals_pb2, seals_pb2_grpc
from tests.conftest import REPO, TOKEN_LABEL

KEYSVC = str(REPO / ".venv" / "bin" / "keysvc")
READY_LINE = re.compile(r"keysvc serving on (\S+) with (\d+) worker\(s\)")
WORKERS = 2
TIMEOUT = 10.0
SHA256 = keys_pb2.KEY_ALGORITHM_HMAC_SHA256


# -- running `keysvc serve` --------------------------------------------------------------------


@dataclass
class KeysvcServer:
    """A `keysvc serve` subprocess (in its own process group) and the address it announced."""

    process: subprocess.Popen
    address: str
    workers: int
    log_path: Path
    stdout_lines: "queue.Queue[str | None]" = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, within: float) -> int | None:
        """Sends SIGTERM to the server process; its exit code, or None if still running after `within` s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            return None

    def kill_group(self) -> None:
        """Last resort: SIGKILL to the server's own process group (itself and its workers)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)


def _read_lines(stream, lines: "queue.Queue[str | None]") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def start_keysvc_server(token, database_url: str, log_path: Path, *, workers: int = 1,
                        ready_within: float = 90.0, extra_args: tuple[str, ...] = (),
                        extra_env: dict[str, str] | None = None) -> KeysvcServer:
    """Starts `keysvc serve` on 127.0.0.1:0 (with `extra_args`, and `extra_env` added to
    the token's environment) and returns once it announces its address. It serves in
    plain text (--insecure-loopback) unless `extra_args` give TLS files."""
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        [KEYSVC, "serve", "--listen", "127.0.0.1:0", "--database", database_url,
         "--token-label", TOKEN_LABEL, "--workers", str(workers),
         *(extra_args if "--tls-cert" in extra_args else ("--insecure-loopback", *extra_args))],
        env={**token.env, **(extra_env or {})}, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL,
        text=True, start_new_session=True,
    )
    log_file.close()
    lines: "queue.Queue[str | None]" = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + ready_within
    server = KeysvcServer(process, "", workers, log_path, lines)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            server.kill_group()
            pytest.fail(f"keysvc serve did not announce itself within {ready_within} s:\n{server.log()}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            process.wait(timeout=10)
            pytest.fail(f"keysvc serve exited with {process.returncode} before serving:\n{server.log()}")
        announced = READY_LINE.search(line)
        if announced:
            server.address = announced.group(1)
            assert int(announced.group(2)) == workers
            return server


def stop_keysvc_server(server: KeysvcServer) -> None:
    """Teardown: SIGTERM, and SIGKILL to the group if that is not enough."""
    if server.terminate(within=20) is None:
        server.kill_group()


# -- processes and connections, from /proc ------------------------------------------------------------


def child_pids(parent: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may hold spaces: split after it.
        if int(stat.rpartition(")")[2].split()[1]) == parent:
            children.add(int(entry.name))
    return children


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for descriptor in descriptors:
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def established_inodes(port: int) -> set[int]:
    """Inodes of the established TCP sockets whose local port is `port` (the server side)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port and fields[3] == "01":  # 01: ESTABLISHED
                inodes.add(int(fields[9]))
    return inodes


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- channels -------------------------------------------------------------------------------------------


class Client:
    """Stubs over one channel with its own TCP connection."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.keys = keys_pb2_grpc.KeyServiceStub(self.channel)
        self.seals = seals_pb2_grpc.SealServiceStub(self.channel)
        # Connect now, so the connection (and the worker behind it) is chosen here.
        self.keys.ListKeys(keys_pb2.ListKeysRequest(page_size=1), timeout=TIMEOUT, wait_for_ready=True)
        # The pid of the worker serving this connection, when known.
        self.worker_pid: int | None = None

    def seal(self, key_id: str, message: bytes, version: int = 0) -> seals_pb2.SealResponse:
        return self.seals.Seal(seals_pb2.SealRequest(key_id=key_id, message=message, version=version),
                               timeout=TIMEOUT)

    def verify(self, key_id: str, message: bytes, seal_text: str) -> seals_pb2.VerifyResponse:
        return self.seals.Verify(seals_pb2.VerifyRequest(key_id=key_id, message=message, seal=seal_text),
                                 timeout=TIMEOUT)


def connections_by_worker(server: KeysvcServer, workers: set[int]) -> dict[int, set[int]]:
    """Socket inodes of the established connections each worker holds on the server port."""
    established = established_inodes(int(server.address.rpartition(":")[2]))
    return {pid: socket_inodes(pid) & established for pid in workers}


def open_clients_per_worker(server: KeysvcServer, per_worker: int) -> list[Client]:
    """Exactly `per_worker` clients served by each worker, alternating workers in the list.

    Connections are opened one at a time, each attributed to the worker whose established
    sockets grew; surplus connections to a worker already served enough are closed.
    """
    workers = child_pids(server.process.pid)
    wanted: dict[int, list[Client]] = {}
    surplus: list[Client] = []
    deadline = time.monotonic() + 30
    while len(wanted) < WORKERS or any(len(found) < per_worker for found in wanted.values()):
        assert time.monotonic() < deadline, f"connections did not spread over {WORKERS} workers: {wanted}"
        before = connections_by_worker(server, workers)
        client = Client(server.address)
        after = connections_by_worker(server, workers)
        grown = [pid for pid in workers if after[pid] - before[pid]]
        assert len(grown) == 1, f"cannot tell which worker took the connection: {grown}"
        client.worker_pid = grown[0]
        found = wanted.setdefault(client.worker_pid, [])
        (found if len(found) < per_worker else surplus).append(client)
    close_clients(surplus)
    return [client for group in zip(*wanted.values()) for client in group]


def close_clients(clients: list[Client]) -> None:
    for client in clients:
        client.channel.close()


def create_key(client: Client, merchant: str, name: str = "coherent") -> str:
    return client.keys.CreateKey(keys_pb2.CreateKeyRequest(
        merchant_id=merchant, name=name, purpose=keys_pb2.KEY_PURPOSE_SEAL, algorithm=SHA256),
        timeout=TIMEOUT).key.key_id
