"""keysvc benchmark: unary Seal and BatchSeal against the transport and HSM limits.

One run, one fresh SoftHSM token, one machine:
- keysvc: `keysvc serve` on 127.0.0.1:0 (sqlite in the temporary folder), one
  HMAC-SHA256 key created through gRPC;
- echo: bench/echo_server.py, a grpc.server built like keysvc's whose Seal answers
  a constant SealResponse: the transport limit;
- raw HSM: a python-pkcs11 HMAC-SHA256 loop in this process on the same token:
  the HSM limit;
- signing: unary Sign at 8 in flight with RSA-2048 and RSA-3072 keys, PSS and
  PKCS#1 v1.5, each against a raw python-pkcs11 sign loop on the same token with a
  key of the same size and the same mechanism (the HSM limit);
- payment schemes: BatchSeal of realistic SIPS, Monetico and CM-CIC messages, one
  row per scheme, against raw-HMAC BatchSeal of the same number of bytes measured
  alongside (the cost of building the platform's string).
Unary cells: a grpc.aio client, N tasks in this process keeping N calls in flight,
64-byte messages. Paired cells (echo and Seal at one concurrency; BatchSeal and raw
HSM) are warmed up, then measured in alternating slices, so that other load on the
machine during the run hits both alike; the "other" column shows how much there was.
Prints a table and the ratios against their targets; asserts nothing.

Usage: .venv/bin/python bench/bench.py [--seconds 4] [--warmup 1] [--rounds 4]
           [--workers 1] [--channels N] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from keysvc.v1 import keys_pb2, keys_pb2_grpc, seals_pb2, seals_pb2_grpc, signing_pb2, signing_pb2_grpc  # noqa: E402
from keysvc.v1 import keys_pb2, keys_pb2_grpc, seals_pb2, seals_pb2_grpc  # noqa: E402
from keysvc.v1 import tokens_pb2, tokens_pb2_grpc  # noqa: E402

TOKEN_LABEL = "bench"
MESSAGE_BYTES = 64
BATCH_ITEMS = 100
BATCH_IN_FLIGHT = 2
CONCURRENCIES = (1, 8, 32)
SEAL_TARGET = 0.85
BATCH_TARGET = 0.50
SIGN_TARGET = 0.90
SIGN_IN_FLIGHT = 8
TOKENIZE_TARGET = 0.50
TOKEN_UNARY_IN_FLIGHT = 8
CALL_TIMEOUT = 30.0
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0  # keysvc gives calls in flight 5 s after SIGTERM
HSM_MODULE = os.environ.get("KEYSVC_HSM_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Interrupted(Exception):
    """SIGTERM (or SIGINT) asked the benchmark to stop."""


# -- subprocesses ---------------------------------------------------------------------------


try:
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # resolved here, not in the forked child
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies without cleaning up."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    log_path: Path
    address: str = ""
    lines: "queue.Queue[str | None]" = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, name: str, command: list[str], env: dict[str, str], log_path: Path) -> "Server":
        log = open(log_path, "wb")
        process = subprocess.Popen(
            command, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True,  # our own process group: signalled by us only, workers included
            preexec_fn=_die_with_parent,
        )
        log.close()
        server = cls(name, process, log_path)
        threading.Thread(target=server._read_stdout, daemon=True).start()
        return server

    def _read_stdout(self) -> None:
        # Keeps draining stdout after the ready line, so the server never blocks on it.
        for raw in self.process.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def wait_ready(self, prefix: str, timeout: float = READY_TIMEOUT) -> str:
        """Waits for "<prefix> HOST:PORT with N worker(s)"; returns HOST:PORT."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s\n{self.log_tail()}") from None
            if line is None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.process.wait()} before it was ready\n{self.log_tail()}"
                )
            if line.startswith(prefix):
                self.address = line[len(prefix):].split()[0]
                return self.address

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join(f"  {self.name}| {line}" for line in text)

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process of the server's process group."""
        total = 0.0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            # After the command: state(0) ppid(1) pgrp(2) ... utime(11) stime(12)
            if int(fields[2]) == self.process.pid:
                total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return total

    def rss_bytes(self) -> int:
        """Resident memory of every live process of the server's process group."""
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid:
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss(21), in pages
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM: killing it",
                      file=sys.stderr)
        try:  # anything left in its process group (a worker, a stuck server)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


# -- measurement ----------------------------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass
class Cell:
    """One row of the table, accumulated over one or more measured slices."""

    label: str
    in_flight: int
    unit: str = "ops/s"
    ops: int = 0  # completed calls (unary, raw HSM) or items (BatchSeal)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, per call
    errors: int = 0
    first_error: str = ""
    server_cpu: float | None = None  # CPU seconds of the server under test
    client_cpu: float = 0.0  # CPU seconds of this process (the client, or the raw HSM loop)
    other_cpu: float = 0.0  # CPU seconds of everything else on the machine

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def percentile_ms(self, fraction: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    def cpu_percent(self, cpu: float | None) -> str:
        return "-" if cpu is None or not self.seconds else f"{100 * cpu / self.seconds:.0f}%"

    def cpu_per_op_us(self, cpu: float | None) -> str:
        return "-" if cpu is None or not self.ops else f"{1e6 * cpu / self.ops:.0f}"

    def error(self, text: str, count: int = 1) -> None:
        self.errors += count
        self.first_error = self.first_error or text


class Usage:
    """CPU use over one slice: the server's, this process's, and the rest of the machine's."""

    def __init__(self, server: Server | None) -> None:
        self.server = server
        self.server_cpu = server.cpu_seconds() if server else 0.0
        self.client_cpu = time.process_time()
        self.machine = machine_busy_seconds()
        self.started = time.perf_counter()

    def add_to(self, cell: Cell) -> None:
        cell.seconds += time.perf_counter() - self.started
        client = time.process_time() - self.client_cpu
        server = self.server.cpu_seconds() - self.server_cpu if self.server else 0.0
        if self.server:
            cell.server_cpu = (cell.server_cpu or 0.0) + server
        cell.client_cpu += client
        cell.other_cpu += max(0.0, machine_busy_seconds() - self.machine - client - server)


def _error_text(error: Exception) -> str:
    if isinstance(error, aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


class GrpcLoad:
    """`in_flight` asyncio tasks, each calling `call(task_index)` back to back.
    `call` returns how many items failed inside a successful call."""

    def __init__(self, cell: Cell, call, server: Server, items_per_call: int = 1) -> None:
        self.cell, self.call, self.server, self.items_per_call = cell, call, server, items_per_call

    async def run(self, seconds: float, record: bool = True) -> None:
        cell, call, items = self.cell, self.call, self.items_per_call
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds

        async def task(index: int) -> None:
            while loop.time() < end:
                started = time.perf_counter()
                try:
                    failed_items = await call(index)
                except grpc.RpcError as error:
                    if record:
                        cell.error(_error_text(error))
                    continue
                if record:
                    cell.latencies.append(time.perf_counter() - started)
                    cell.ops += items - failed_items
                    if failed_items:
                        cell.error("item errors in a batch response", failed_items)

        usage = Usage(self.server)
        await asyncio.gather(*(task(i) for i in range(cell.in_flight)))
        if record:
            usage.add_to(cell)  # the elapsed time includes the calls finishing after `end`


class RawHsmLoad:
    """HMAC-SHA256 of 64-byte messages with a session key, in this process, one thread,
    on its own logged-in session (PKCS#11 login is per process)."""

    def __init__(self, cell: Cell, config_path: Path, pin: str) -> None:
        os.environ["SOFTHSM2_CONF"] = str(config_path)  # before the module is first loaded here
        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism

        self.cell = cell
        token = pkcs11.lib(HSM_MODULE).get_token(token_label=TOKEN_LABEL)
        self.session = token.open(user_pin=pin, rw=True)
        self.key = self.session.generate_key(
            KeyType.GENERIC_SECRET, 256, store=False,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                      Attribute.SIGN: True, Attribute.VERIFY: False},
        )
        self.mechanism = Mechanism.SHA256_HMAC
        self.message = os.urandom(MESSAGE_BYTES)

    async def run(self, seconds: float, record: bool = True) -> None:
        # Synchronous on purpose: nothing else runs meanwhile (no call is in flight).
        sign, message, mechanism = self.key.sign, self.message, self.mechanism
        latencies = self.cell.latencies if record else []
        usage = Usage(None)
        now = usage.started
        end = now + seconds
        while now < end:
            sign(message, mechanism=mechanism)
            after = time.perf_counter()
            latencies.append(after - now)
            now = after
        if record:
            self.cell.ops = len(latencies)  # the cell's list: every recorded slice
            usage.add_to(self.cell)

    def close(self) -> None:
        self.key.destroy()
        self.session.close()


class RawSignLoad:
    """RSA signatures of 64-byte messages in this process, one thread, with a session key
    pair of `bits` and the mechanism keysvc uses (the hash is made here, as keysvc does)."""

    def __init__(self, cell: Cell, config_path: Path, pin: str, bits: int, pss: bool) -> None:
        os.environ["SOFTHSM2_CONF"] = str(config_path)
        import hashlib

        import pkcs11
        from pkcs11 import MGF, Attribute, KeyType, Mechanism

        self.cell = cell
        token = pkcs11.lib(HSM_MODULE).get_token(token_label=TOKEN_LABEL)
        try:
            self.session = token.open(user_pin=pin, rw=True)
        except pkcs11.exceptions.UserAlreadyLoggedIn:  # login is per process: the raw HMAC load's
            self.session = token.open(rw=True)
        self.public, self.private = self.session.generate_keypair(
            KeyType.RSA, bits, store=False, private_template={Attribute.SIGN: True, Attribute.SENSITIVE: True})
        message = os.urandom(MESSAGE_BYTES)
        if pss:
            self.data = hashlib.sha256(message).digest()
            self.mechanism, self.parameters = Mechanism.RSA_PKCS_PSS, (Mechanism.SHA256, MGF.SHA256, 32)
        else:  # DigestInfo(SHA-256) ‖ hash
            self.data = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(message).digest()
            self.mechanism, self.parameters = Mechanism.RSA_PKCS, None

    async def run(self, seconds: float, record: bool = True) -> None:
        sign, data, mechanism, parameters = self.private.sign, self.data, self.mechanism, self.parameters
        latencies = self.cell.latencies if record else []
        usage = Usage(None)
        now = usage.started
        end = now + seconds
        while now < end:
            sign(data, mechanism=mechanism, mechanism_param=parameters)
            after = time.perf_counter()
            latencies.append(after - now)
            now = after
        if record:
            self.cell.ops = len(latencies)
            usage.add_to(self.cell)

    def close(self) -> None:
        self.private.destroy()
        self.public.destroy()
        self.session.close()


class RawTokenHsmLoad:
    """What tokenizing one PAN costs the HSM at the least: the fingerprint HMAC-SHA256 and
    the AES-256-GCM encryption (with associated data), each with a session key, looped in
    this process, one thread, on its own logged-in session. One op is one PAN."""

    def __init__(self, cell: Cell, config_path: Path, pin: str) -> None:
        os.environ["SOFTHSM2_CONF"] = str(config_path)  # before the module is first loaded here
        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism
        from pkcs11.mechanisms import GCMParams

        self.cell = cell
        token = pkcs11.lib(HSM_MODULE).get_token(token_label=TOKEN_LABEL)
        self.session = token.open(user_pin=pin, rw=True)
        self.hmac_key = self.session.generate_key(
            KeyType.GENERIC_SECRET, 256, store=False,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                      Attribute.SIGN: True, Attribute.VERIFY: False},
        )
        self.aes_key = self.session.generate_key(
            KeyType.AES, 256, store=False,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                      Attribute.ENCRYPT: True, Attribute.DECRYPT: True},
        )
        self.hmac, self.gcm, self.params = Mechanism.SHA256_HMAC, Mechanism.AES_GCM, GCMParams
        self.pans = [card_numbers(16)[0] for _ in range(64)]
        self.aad = b"keysvc-token-v1" + bytes(40)

    async def run(self, seconds: float, record: bool = True) -> None:
        sign, encrypt, params = self.hmac_key.sign, self.aes_key.encrypt, self.params
        hmac_mechanism, gcm, aad, pans = self.hmac, self.gcm, self.aad, self.pans
        latencies = self.cell.latencies if record else []
        usage = Usage(None)
        now = usage.started
        end = now + seconds
        index = 0
        while now < end:
            pan = pans[index % 64].encode()
            index += 1
            sign(b"keysvc-pan-fingerprint-v1:" + pan, mechanism=hmac_mechanism)
            encrypt(pan, mechanism=gcm, mechanism_param=params(os.urandom(12), aad, 128))
            after = time.perf_counter()
            latencies.append(after - now)
            now = after
        if record:
            self.cell.ops = len(latencies)
            usage.add_to(self.cell)

    def close(self) -> None:
        self.hmac_key.destroy()
        self.aes_key.destroy()
        self.session.close()


def card_numbers(count: int, length: int = 16) -> list[str]:
    """`count` random Luhn-valid PANs starting with 4 (Visa-like)."""
    numbers = []
    for _ in range(count):
        body = "4" + str(secrets.randbelow(10 ** (length - 2))).zfill(length - 2)
        total = 0
        for position, character in enumerate(reversed(body)):
            digit = int(character)
            if position % 2 == 0:  # doubled: the check digit will sit to its right
                digit = digit * 2 - 9 if digit > 4 else digit * 2
            total += digit
        numbers.append(body + str((10 - total % 10) % 10))
    return numbers


async def interleaved(loads, seconds: float, warmup: float, rounds: int) -> None:
    """Warms each load up, then alternates them in `rounds` slices of seconds/rounds each,
    so that a change in the machine's load during the run affects them alike."""
    for load in loads:
        await load.run(warmup, record=False)
    for _ in range(rounds):
        for load in loads:
            await load.run(seconds / rounds)


# -- the run --------------------------------------------------------------------------------


def make_channels(address: str, count: int) -> list[aio.Channel]:
    # Separate subchannel pools: otherwise channels to one target share one connection,
    # and SO_REUSEPORT (several workers) spreads connections, not calls.
    options = [("grpc.use_local_subchannel_pool", 1)] if count > 1 else []
    return [aio.insecure_channel(address, options=options) for _ in range(count)]


async def run_cells(args, keysvc: Server, echo: Server, config_path: Path, pin: str, progress):
    """Returns the Seal cells, the echo cells (one per concurrency), the BatchSeal cell, the raw HSM cell."""
    keysvc_channels = make_channels(keysvc.address, args.channels)
    echo_channels = make_channels(echo.address, args.channels)
    raw = None
    try:
        keys = keys_pb2_grpc.KeyServiceStub(keysvc_channels[0])
        created = await keys.CreateKey(keys_pb2.CreateKeyRequest(
            merchant_id="bench", name="seal", purpose=keys_pb2.KEY_PURPOSE_SEAL,
            algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=CALL_TIMEOUT)
        key_id = created.key.key_id
        keysvc_stubs = [seals_pb2_grpc.SealServiceStub(c) for c in keysvc_channels]
        echo_stubs = [seals_pb2_grpc.SealServiceStub(c) for c in echo_channels]
        first = await keysvc_stubs[0].Seal(
            seals_pb2.SealRequest(key_id=key_id, message=bytes(MESSAGE_BYTES)), timeout=CALL_TIMEOUT)
        progress(f"key {key_id} created; first seal {first.seal[:16]}... (version {first.version})")

        def unary(stubs, request):
            async def call(index: int) -> int:
                await stubs[index % len(stubs)].Seal(request, timeout=CALL_TIMEOUT)
                return 0
            return call

        request = seals_pb2.SealRequest(key_id=key_id, message=os.urandom(MESSAGE_BYTES))
        seal_cells, echo_cells = [], []
        for in_flight in args.concurrency:
            echo_cell = Cell("echo Seal (transport limit)", in_flight)
            seal_cell = Cell("keysvc Seal", in_flight)
            await interleaved([GrpcLoad(echo_cell, unary(echo_stubs, request), echo),
                               GrpcLoad(seal_cell, unary(keysvc_stubs, request), keysvc)],
                              args.seconds, args.warmup, args.rounds)
            echo_cells.append(echo_cell)
            seal_cells.append(seal_cell)
            progress(f"{in_flight:>2} in flight: echo {echo_cell.rate:.0f} ops/s, keysvc Seal {seal_cell.rate:.0f} ops/s")

        batch = seals_pb2.BatchSealRequest(requests=[
            seals_pb2.SealRequest(key_id=key_id, message=os.urandom(MESSAGE_BYTES)) for _ in range(BATCH_ITEMS)
        ])

        async def batch_call(index: int) -> int:
            response = await keysvc_stubs[index % len(keysvc_stubs)].BatchSeal(batch, timeout=CALL_TIMEOUT)
            return sum(1 for result in response.results if result.WhichOneof("outcome") != "response")

        batch_cell = Cell(f"keysvc BatchSeal ({BATCH_ITEMS} items/call)", BATCH_IN_FLIGHT, unit="items/s")
        raw_cell = Cell("raw HSM HMAC-SHA256 (pkcs11)", 1)
        raw = RawHsmLoad(raw_cell, config_path, pin)
        await interleaved([GrpcLoad(batch_cell, batch_call, keysvc, items_per_call=BATCH_ITEMS), raw],
                          args.seconds, args.warmup, args.rounds)
        progress(f"BatchSeal {batch_cell.rate:.0f} items/s, raw HSM {raw_cell.rate:.0f} ops/s")
        scheme_cells = await run_scheme_cells(args, keys, keysvc_stubs, keysvc, progress)
        return seal_cells, echo_cells, batch_cell, raw_cell, scheme_cells
    finally:
        if raw is not None:
            raw.close()
        for channel in keysvc_channels + echo_channels:
            await channel.close()


async def run_sign_part(args, keysvc: Server, config_path: Path, pin: str, progress):
    channels = make_channels(keysvc.address, args.channels)
    try:
        keys = keys_pb2_grpc.KeyServiceStub(channels[0])
        return await run_sign_cells(args, keys, channels, keysvc, config_path, pin, progress)
    finally:
        for channel in channels:
            await channel.close()


async def run_token_cells(args, keysvc: Server, config_path: Path, pin: str, progress):
    """Tokenize and Detokenize at batches of 1 and 100 items, and the raw HSM baseline.
    Every Tokenize call carries PANs never tokenized before (the full path: fingerprint,
    lookup, token, encryption, insert)."""
    channel = make_channels(keysvc.address, 1)[0]
    raw = None
    try:
        stub = tokens_pb2_grpc.TokenServiceStub(channel)
        domain = "bench"
        # Enough fresh PANs for every Tokenize call of the run, made before measuring.
        pool_size = int(args.seconds + args.warmup + 2) * 40_000
        pans = iter(card_numbers(pool_size))
        progress(f"{pool_size} PANs generated for Tokenize")
        known = await stub.Tokenize(tokens_pb2.TokenizeRequest(domain=domain, pans=card_numbers(1000)),
                                    timeout=CALL_TIMEOUT)
        tokens = [result.token.token for result in known.results]

        def tokenize(items: int):
            async def call(index: int) -> int:
                batch = [next(pans) for _ in range(items)]
                response = await stub.Tokenize(tokens_pb2.TokenizeRequest(domain=domain, pans=batch),
                                               timeout=CALL_TIMEOUT)
                return sum(1 for result in response.results if result.WhichOneof("outcome") != "token")
            return call

        def detokenize(items: int):
            requests = [tokens_pb2.DetokenizeRequest(domain=domain, tokens=tokens[start:start + items])
                        for start in range(0, len(tokens), items)]
            counter = iter(range(1 << 62))

            async def call(index: int) -> int:
                response = await stub.Detokenize(requests[next(counter) % len(requests)], timeout=CALL_TIMEOUT)
                return sum(1 for result in response.results if result.WhichOneof("outcome") != "token")
            return call

        cells = {
            ("Tokenize", 100): Cell(f"keysvc Tokenize ({BATCH_ITEMS} items/call)", BATCH_IN_FLIGHT, "items/s"),
            ("Tokenize", 1): Cell("keysvc Tokenize (1 item/call)", TOKEN_UNARY_IN_FLIGHT, "items/s"),
            ("Detokenize", 100): Cell(f"keysvc Detokenize ({BATCH_ITEMS} items/call)", BATCH_IN_FLIGHT, "items/s"),
            ("Detokenize", 1): Cell("keysvc Detokenize (1 item/call)", TOKEN_UNARY_IN_FLIGHT, "items/s"),
        }
        raw_cell = Cell("raw HSM HMAC + AES-GCM per PAN", 1, "items/s")
        raw = RawTokenHsmLoad(raw_cell, config_path, pin)
        loads = [
            GrpcLoad(cells[("Tokenize", 100)], tokenize(BATCH_ITEMS), keysvc, items_per_call=BATCH_ITEMS),
            raw,
            GrpcLoad(cells[("Detokenize", 100)], detokenize(BATCH_ITEMS), keysvc, items_per_call=BATCH_ITEMS),
            GrpcLoad(cells[("Tokenize", 1)], tokenize(1), keysvc),
            GrpcLoad(cells[("Detokenize", 1)], detokenize(1), keysvc),
        ]
        await interleaved(loads, args.seconds, args.warmup, args.rounds)
        progress(f"Tokenize x100 {cells[('Tokenize', 100)].rate:.0f} items/s, raw {raw_cell.rate:.0f} PANs/s")
        return list(cells.values()), raw_cell
    finally:
        if raw is not None:
            raw.close()
        await channel.close()


def print_token_table(token_cells, raw_cell) -> None:
    print()
    print("tokens (16-digit PANs, new PANs on every Tokenize call; one client channel)")
    header = f"{'cell':<38} {'in flight':>9} {'rate':>9} {'unit':<8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'srv µs':>6}"
    print(header)
    print("-" * len(header))
    for cell in [*token_cells, raw_cell]:
        p50, p99 = cell.percentile_ms(0.50), cell.percentile_ms(0.99)
        print(f"{cell.label:<38} {cell.in_flight:>9} {cell.rate:>9.0f} {cell.unit:<8} "
              f"{'-' if p50 is None else f'{p50:.2f}':>7} {'-' if p99 is None else f'{p99:.2f}':>7} "
              f"{cell.errors:>6} {cell.cpu_per_op_us(cell.server_cpu):>6}")
    for cell in token_cells:
        if cell.first_error:
            print(f"  first error in '{cell.label}': {cell.first_error}")
    batched = token_cells[0]
    ratio = batched.rate / raw_cell.rate if raw_cell.rate else 0.0
    verdict = "meets" if ratio >= TOKENIZE_TARGET else "misses"
    print(f"  {'Tokenize x100 items/s / raw HSM PANs/s':<40} {100 * ratio:6.1f}%   "
          f"target >= {100 * TOKENIZE_TARGET:.0f}%   {verdict}")




# -- payment schemes ---------------------------------------------------------------------------

SIPS_FIELDS = [
    ("amount", "12550"), ("currencyCode", "978"), ("merchantId", "002001000000001"),
    ("normalReturnUrl", "https://shop.example/payment/return"), ("transactionReference", "TR20261127000123"),
    ("orderId", "CMD-2026-000123"), ("customerContact.email", "client@example.fr"),
    ("customerContact.lastname", "Dupré"), ("paymentMeanBrandList", "VISA,MASTERCARD,CB"),
    ("keyVersion", "1"),
]
SIPS_JSON = (
    '{"amount": 12550, "currencyCode": "978", "merchantId": "002001000000001", "interfaceVersion": "IR_WS_2.47",'
    ' "normalReturnUrl": "https://shop.example/payment/return", "orderChannel": "INTERNET",'
    ' "transactionReference": "TR20261127000123", "customerContact": {"email": "client@example.fr",'
    ' "firstname": "Zoé", "lastname": "Dupré"}, "paymentMeanBrandList": ["VISA", "MASTERCARD", "CB"],'
    ' "keyVersion": 1}'
).encode()
MONETICO_FIELDS = [
    ("TPE", "1234567"), ("date", "27/11/2026:10:00:00"), ("montant", "125.50EUR"), ("reference", "CMD000123"),
    ("texte-libre", "Commande de thé"), ("version", "3.0"), ("lgue", "FR"), ("societe", "monSite1"),
    ("mail", "client@example.fr"), ("contexte_commande", "eyJiaWxsaW5nIjp7ImFkZHJlc3NMaW5lMSI6IjEgcnVlIn19"),
    ("url_retour_ok", "https://shop.example/ok"), ("url_retour_err", "https://shop.example/err"),
]
CMCIC_FIELDS = [
    ("TPE", "1234567"), ("date", "27/11/2026:10:00:00"), ("montant", "125.50"), ("devise", "EUR"),
    ("reference", "CMD000123"), ("texte-libre", "Commande"), ("version", "3.0"), ("lgue", "FR"),
    ("societe", "monSite1"), ("mail", "client@example.fr"),
]

CMCIC_NOTIFICATION_FIELDS = [
    ("TPE", "1234567"), ("date", "27/11/2026_a_10:00:00"), ("montant", "125.50EUR"), ("reference", "CMD000123"),
    ("texte-libre", "Commande"), ("version", "3.0"), ("code-retour", "paiement"), ("cvx", "oui"), ("vld", "1228"),
    ("brand", "VI"), ("status3ds", "1"), ("numauto", "010101"), ("originecb", "FRA"), ("bincb", "497010"),
    ("ipclient", "192.0.2.1"), ("originetr", "FRA"),
]
SIPS_JSON_RESPONSE = (
    '{"redirectionData": "4AgbsrffvPgzDghQysbOJIZBJTZsk1KNlTmoOCtSORkMfzQgSR5OEw0gAE2bAAFbHuYQXuBm",'
    ' "redirectionStatusCode": "00", "redirectionStatusMessage": "INITIALISATION REQUEST ACCEPTED",'
    ' "redirectionUrl": "https://payment-gateway.example/", "redirectionVersion": "IR_WS_2.0",'
    ' "keyVersion": 1, "seal": "c3eb508b0d419e3bd2bb1a0416c2a48585fa6d683aa8d1a3dfba8ee877079f9f"}'
).encode()


def _fields(pairs) -> list:
    return [seals_pb2.Field(name=name, value=value) for name, value in pairs]


async def run_scheme_cells(args, keys, stubs, keysvc: Server, progress) -> list[tuple[Cell, Cell]]:
    """(scheme cell, raw HMAC BatchSeal cell over messages of the same size) per payment scheme."""
    async def create(name: str, platform: int, algorithm: int) -> str:
        response = await keys.CreateKey(keys_pb2.CreateKeyRequest(
            merchant_id="bench", name=name, purpose=keys_pb2.KEY_PURPOSE_SEAL, algorithm=algorithm,
            platform=platform), timeout=CALL_TIMEOUT)
        return response.key.key_id

    sips = await create("sips", keys_pb2.KEY_PLATFORM_SIPS, keys_pb2.KEY_ALGORITHM_HMAC_SHA256)
    legacy = await create("sips-legacy", keys_pb2.KEY_PLATFORM_SIPS, keys_pb2.KEY_ALGORITHM_SHA256_DATA_SECRET)
    monetico = await create("monetico", keys_pb2.KEY_PLATFORM_MONETICO, keys_pb2.KEY_ALGORITHM_HMAC_SHA1)
    generic = await create("generic", keys_pb2.KEY_PLATFORM_GENERIC, keys_pb2.KEY_ALGORITHM_HMAC_SHA256)
    sips_data = "|".join(f"{name}={value}" for name, value in SIPS_FIELDS).encode()
    schemes = [
        ("SIPS POST Data, HMAC-SHA-256", dict(key_id=sips, scheme=seals_pb2.SEAL_SCHEME_SIPS_POST, message=sips_data)),
        ("SIPS POST Data, legacy SHA-256",
         dict(key_id=legacy, scheme=seals_pb2.SEAL_SCHEME_SIPS_POST, message=sips_data)),
        ("SIPS POST from fields", dict(key_id=sips, scheme=seals_pb2.SEAL_SCHEME_SIPS_POST,
                                       fields=_fields(SIPS_FIELDS))),
        ("SIPS JSON request", dict(key_id=sips, scheme=seals_pb2.SEAL_SCHEME_SIPS_JSON_REQUEST, message=SIPS_JSON)),
        ("Monetico 3.0", dict(key_id=monetico, scheme=seals_pb2.SEAL_SCHEME_MONETICO,
                              fields=_fields(MONETICO_FIELDS))),
        ("CM-CIC legacy request", dict(key_id=monetico, scheme=seals_pb2.SEAL_SCHEME_CMCIC_LEGACY_REQUEST,
                                       fields=_fields(CMCIC_FIELDS))),
        ("CM-CIC legacy notification", dict(key_id=monetico, scheme=seals_pb2.SEAL_SCHEME_CMCIC_LEGACY_NOTIFICATION,
                                            fields=_fields(CMCIC_NOTIFICATION_FIELDS))),
        ("SIPS JSON response", dict(key_id=sips, scheme=seals_pb2.SEAL_SCHEME_SIPS_JSON_RESPONSE,
                                    message=SIPS_JSON_RESPONSE)),
    ]

    def batch_load(cell: Cell, request: seals_pb2.SealRequest) -> GrpcLoad:
        batch = seals_pb2.BatchSealRequest(requests=[request] * BATCH_ITEMS)

        async def call(index: int) -> int:
            response = await stubs[index % len(stubs)].BatchSeal(batch, timeout=CALL_TIMEOUT)
            return sum(1 for result in response.results if result.WhichOneof("outcome") != "response")
        return GrpcLoad(cell, call, keysvc, items_per_call=BATCH_ITEMS)

    pairs = []
    for label, fields in schemes:
        request = seals_pb2.SealRequest(**fields)
        # The baseline: raw HMAC over as many bytes as the scheme's request carries.
        same_size = seals_pb2.SealRequest(key_id=generic, message=os.urandom(request.ByteSize()))
        cell = Cell(label, BATCH_IN_FLIGHT, unit="items/s")
        baseline = Cell("  raw HMAC, same bytes", BATCH_IN_FLIGHT, unit="items/s")
        await interleaved([batch_load(cell, request), batch_load(baseline, same_size)],
                          args.seconds / 2, args.warmup / 2, args.rounds)
        progress(f"{label}: {cell.rate:.0f} items/s (raw HMAC over as many bytes: {baseline.rate:.0f})")
        pairs.append((cell, baseline))
    return pairs


# -- signing -------------------------------------------------------------------------------------


async def run_sign_cells(args, keys, channels, keysvc: Server, config_path: Path, pin: str,
                         progress) -> list[tuple[Cell, Cell]]:
    """(keysvc Sign cell, raw HSM sign cell) for RSA-2048 and 3072, PSS and PKCS#1 v1.5."""
    stubs = [signing_pb2_grpc.SigningServiceStub(c) for c in channels]
    pairs = []
    for bits in (2048, 3072):
        created = await keys.CreateKey(keys_pb2.CreateKeyRequest(
            merchant_id="bench", name=f"rsa-{bits}", purpose=keys_pb2.KEY_PURPOSE_SIGN,
            algorithm=keys_pb2.KeyAlgorithm.Value(f"KEY_ALGORITHM_RSA_{bits}")), timeout=CALL_TIMEOUT)
        for pss in (True, False):
            algorithm = (signing_pb2.SIGNATURE_ALGORITHM_RSA_PSS_SHA256 if pss
                         else signing_pb2.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256)
            request = signing_pb2.SignRequest(key_id=created.key.key_id, algorithm=algorithm,
                                              message=os.urandom(MESSAGE_BYTES))

            async def call(index: int, request=request) -> int:
                await stubs[index % len(stubs)].Sign(request, timeout=CALL_TIMEOUT)
                return 0

            name = f"RSA-{bits} {'PSS' if pss else 'PKCS#1 v1.5'}"
            cell = Cell(f"keysvc Sign {name}", SIGN_IN_FLIGHT)
            raw_cell = Cell(f"  raw HSM sign {name}", 1)
            raw = RawSignLoad(raw_cell, config_path, pin, bits, pss)
            try:
                await interleaved([GrpcLoad(cell, call, keysvc), raw], args.seconds / 2, args.warmup / 2,
                                  args.rounds)
            finally:
                raw.close()
            progress(f"Sign {name}: {cell.rate:.0f} ops/s (raw HSM {raw_cell.rate:.0f})")
            pairs.append((cell, raw_cell))
    return pairs


def print_table(args, seal_cells=(), echo_cells=(), batch_cell=None, raw_cell=None, scheme_cells=(),
                sign_cells=()) -> None:
    def ms(value):
        return "-" if value is None else f"{value:.2f}"

    print()
    print(f"keysvc benchmark: SoftHSM2 token '{TOKEN_LABEL}', keysvc --workers {args.workers}, echo 1 worker, "
          f"{os.cpu_count()} CPU(s), {args.channels} client channel(s) per server")
    print(f"{args.seconds:g} s per cell ({args.rounds} slices alternating with the paired cell) "
          f"after {args.warmup:g} s warm-up; {MESSAGE_BYTES}-byte messages")
    header = (f"{'cell':<34} {'in flight':>9} {'rate':>9} {'unit':<8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'errors':>6} {'srv CPU':>7} {'srv µs':>6} {'cli CPU':>7} {'cli µs':>6} {'other':>6}")
    print(header)
    print("-" * len(header))
    rows = []
    for echo, seal in zip(echo_cells, seal_cells):
        rows += [echo, seal]
    if batch_cell is not None:
        rows += [batch_cell, raw_cell]
    for scheme, baseline in scheme_cells:
        rows += [scheme, baseline]
    for sign, baseline in sign_cells:
        rows += [sign, baseline]
    for cell in rows:
        print(f"{cell.label:<34} {cell.in_flight:>9} {cell.rate:>9.0f} {cell.unit:<8} "
              f"{ms(cell.percentile_ms(0.50)):>7} {ms(cell.percentile_ms(0.99)):>7} {cell.errors:>6} "
              f"{cell.cpu_percent(cell.server_cpu):>7} {cell.cpu_per_op_us(cell.server_cpu):>6} "
              f"{cell.cpu_percent(cell.client_cpu):>7} {cell.cpu_per_op_us(cell.client_cpu):>6} "
              f"{cell.cpu_percent(cell.other_cpu):>6}")
    print("p50/p99: per call (a BatchSeal call is 100 items). srv/cli CPU: the server's and this process's CPU,")
    print("% of one core and µs per op or item; other: CPU of everything else on the machine, % of one core.")
    for cell in rows:
        if cell.first_error:
            print(f"  first error in '{cell.label}' x{cell.in_flight}: {cell.first_error}")
    print()
    print("ratios")
    for echo, seal in zip(echo_cells, seal_cells):
        ratio = seal.rate / echo.rate if echo.rate else 0.0
        verdict = "meets" if ratio >= SEAL_TARGET else "misses"
        print(f"  {f'Seal / echo at {seal.in_flight} in flight':<36} {100 * ratio:6.1f}%   "
              f"target >= {100 * SEAL_TARGET:.0f}%   {verdict}")
    if batch_cell is not None:
        ratio = batch_cell.rate / raw_cell.rate if raw_cell.rate else 0.0
        verdict = "meets" if ratio >= BATCH_TARGET else "misses"
        print(f"  {'BatchSeal items/s / raw HSM ops/s':<36} {100 * ratio:6.1f}%   "
              f"target >= {100 * BATCH_TARGET:.0f}%   {verdict}")
    for scheme, baseline in scheme_cells:
        ratio = scheme.rate / baseline.rate if baseline.rate else 0.0
        print(f"  {scheme.label + ' / raw HMAC':<52} {100 * ratio:6.1f}%   (no target: the cost of the format)")
    for sign, baseline in sign_cells:
        ratio = sign.rate / baseline.rate if baseline.rate else 0.0
        verdict = "meets" if ratio >= SIGN_TARGET else "misses"
        print(f"  {sign.label + ' / raw HSM':<52} {100 * ratio:6.1f}%   target >= {100 * SIGN_TARGET:.0f}%   "
              f"{verdict}")


# -- soak -------------------------------------------------------------------------------------------

SOAK_REPORT_EVERY = 10.0


async def soak(args, keysvc: Server, progress) -> None:
    """Mixed traffic for args.soak minutes: unary Seal and Verify, BatchSeal, a SIPS seal,
    Sign, Tokenize and Detokenize, 8 calls in flight; a row every 10 s."""
    channel = make_channels(keysvc.address, 1)[0]
    keys = keys_pb2_grpc.KeyServiceStub(channel)
    seals = seals_pb2_grpc.SealServiceStub(channel)
    signing = signing_pb2_grpc.SigningServiceStub(channel)
    tokens = tokens_pb2_grpc.TokenServiceStub(channel)
    hmac_key = (await keys.CreateKey(keys_pb2.CreateKeyRequest(
        merchant_id="soak", name="hmac", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256), timeout=CALL_TIMEOUT)).key
    sips_key = (await keys.CreateKey(keys_pb2.CreateKeyRequest(
        merchant_id="soak", name="sips", algorithm=keys_pb2.KEY_ALGORITHM_HMAC_SHA256,
        platform=keys_pb2.KEY_PLATFORM_SIPS), timeout=CALL_TIMEOUT)).key
    rsa_key = (await keys.CreateKey(keys_pb2.CreateKeyRequest(
        merchant_id="soak", name="rsa", purpose=keys_pb2.KEY_PURPOSE_SIGN,
        algorithm=keys_pb2.KEY_ALGORITHM_RSA_2048), timeout=CALL_TIMEOUT)).key
    message = os.urandom(MESSAGE_BYTES)
    sealed = (await seals.Seal(seals_pb2.SealRequest(key_id=hmac_key.key_id, message=message),
                               timeout=CALL_TIMEOUT)).seal
    made = await tokens.Tokenize(tokens_pb2.TokenizeRequest(domain="soak", pans=card_numbers(10)),
                                 timeout=CALL_TIMEOUT)
    token_values = [result.token.token for result in made.results]
    calls = [
        lambda: seals.Seal(seals_pb2.SealRequest(key_id=hmac_key.key_id, message=message), timeout=CALL_TIMEOUT),
        lambda: seals.Verify(seals_pb2.VerifyRequest(key_id=hmac_key.key_id, message=message, seal=sealed),
                             timeout=CALL_TIMEOUT),
        lambda: seals.BatchSeal(seals_pb2.BatchSealRequest(requests=[
            seals_pb2.SealRequest(key_id=hmac_key.key_id, message=message)] * 50), timeout=CALL_TIMEOUT),
        lambda: seals.Seal(seals_pb2.SealRequest(key_id=sips_key.key_id, scheme=seals_pb2.SEAL_SCHEME_SIPS_POST,
                                                 fields=_fields(SIPS_FIELDS)), timeout=CALL_TIMEOUT),
        lambda: signing.Sign(signing_pb2.SignRequest(
            key_id=rsa_key.key_id, algorithm=signing_pb2.SIGNATURE_ALGORITHM_RSA_PSS_SHA256, message=message),
            timeout=CALL_TIMEOUT),
        lambda: tokens.Tokenize(tokens_pb2.TokenizeRequest(domain="soak", pans=card_numbers(5)),
                                timeout=CALL_TIMEOUT),
        lambda: tokens.Detokenize(tokens_pb2.DetokenizeRequest(domain="soak", tokens=token_values),
                                  timeout=CALL_TIMEOUT),
    ]
    loop = asyncio.get_running_loop()
    end = loop.time() + args.soak * 60
    window: list[float] = []
    totals = {"calls": 0, "errors": 0}
    first_error = [""]

    async def task(index: int) -> None:
        count = index
        while loop.time() < end:
            count += 1
            started = time.perf_counter()
            try:
                await calls[count % len(calls)]()
            except grpc.RpcError as error:
                totals["errors"] += 1
                first_error[0] = first_error[0] or _error_text(error)
            window.append(time.perf_counter() - started)
            totals["calls"] += 1

    async def report() -> None:
        first_rss = keysvc.rss_bytes()
        print(f"soak: {args.soak:g} min of mixed traffic (Seal, Verify, BatchSeal x50, SIPS seal, Sign RSA-2048, "
              "Tokenize x5, Detokenize x10), 8 calls in flight")
        print(f"{'elapsed s':>9} {'calls':>8} {'errors':>6} {'calls/s':>8} {'p99 ms':>7} {'server RSS MB':>13}")
        started = last = loop.time()
        while loop.time() < end:
            await asyncio.sleep(min(SOAK_REPORT_EVERY, max(0.0, end - loop.time())))
            latencies = sorted(window)
            window.clear()
            interval, last = loop.time() - last, loop.time()
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000 if latencies else 0.0
            print(f"{loop.time() - started:>9.0f} {totals['calls']:>8} {totals['errors']:>6} "
                  f"{len(latencies) / max(interval, 1e-9):>8.0f} {p99:>7.1f} {keysvc.rss_bytes() / 2**20:>13.1f}",
                  flush=True)
        growth = (keysvc.rss_bytes() - first_rss) / 2**20
        print(f"server memory growth over the soak: {growth:+.1f} MB; errors: {totals['errors']}"
              + (f" (first: {first_error[0]})" if first_error[0] else ""))

    try:
        await asyncio.gather(report(), *(task(i) for i in range(8)))
    finally:
        await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="keysvc Seal/BatchSeal benchmark (prints a table).")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured duration of each cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded warm-up before each cell")
    parser.add_argument("--rounds", type=int, default=4,
                        help="slices each cell is split into, alternating with its paired cell")
    parser.add_argument("--workers", type=int, default=1, help="keysvc serve --workers (echo keeps 1)")
    parser.add_argument("--channels", type=int, default=0,
                        help="client channels (connections) per server; default 1, or 4 per worker "
                             "when --workers > 1 so that SO_REUSEPORT spreads them")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES),
                        help="unary calls in flight per cell")
    parser.add_argument("--parts", nargs="+", choices=["seals", "signs", "tokens"],
                        default=["seals", "signs", "tokens"], help="which cells to measure")
    parser.add_argument("--soak", type=float, default=0.0, metavar="MINUTES",
                        help="instead of the tables: MINUTES of mixed traffic, reporting errors, p99 latency "
                             "and server memory every 10 s")
    parser.add_argument("--database", default="",
                        help="keysvc's database URL (default: SQLite in the temporary folder); an empty "
                             "PostgreSQL database is best, the run leaves its rows there")
    args = parser.parse_args()
    args.channels = args.channels or (1 if args.workers == 1 else 4 * args.workers)

    def interrupt(*_):
        raise Interrupted()

    signal.signal(signal.SIGTERM, interrupt)

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - begun:5.1f} s] {text}", file=sys.stderr, flush=True)

    begun = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="keysvc-bench-"))
    servers: list[Server] = []
    try:
        subprocess.run([str(REPO / "hsm/softhsm/setup-token.sh"), str(tmp), TOKEN_LABEL],
                       check=True, stdout=subprocess.DEVNULL)
        config_path, pin_path = tmp / "softhsm2.conf", tmp / "pin"
        env = {**os.environ, "SOFTHSM2_CONF": str(config_path), "KEYSVC_HSM_PIN_FILE": str(pin_path)}
        env.pop("KEYSVC_HSM_PIN", None)  # the PIN comes from the file
        python_bin = Path(sys.executable)
        keysvc_bin = python_bin.parent / "keysvc"
        keysvc_command = [str(keysvc_bin)] if keysvc_bin.exists() else [str(python_bin), "-m", "keysvc.cli"]
        keysvc = Server.start("keysvc", keysvc_command + [
            "serve", "--insecure-loopback", "--listen", "127.0.0.1:0",
            "--database", args.database or f"sqlite:///{tmp}/k.db",
            "--token-label", TOKEN_LABEL, "--workers", str(args.workers), "--allow-detokenize",
        ], env, tmp / "keysvc.log")
        servers.append(keysvc)
        echo = Server.start("echo", [str(python_bin), str(REPO / "bench/echo_server.py"),
                                     "--listen", "127.0.0.1:0"], env, tmp / "echo.log")
        servers.append(echo)
        echo.wait_ready("echo serving on ")
        keysvc.wait_ready("keysvc serving on ")
        progress(f"token in {tmp}; keysvc on {keysvc.address} ({args.workers} worker(s)), echo on {echo.address}")

        if args.soak:
            asyncio.run(soak(args, keysvc, progress))
            return
        seal_cells, sign_cells = (), ()
        if "seals" in args.parts:
            seal_cells = asyncio.run(run_cells(args, keysvc, echo, config_path, pin_path.read_text().strip(),
                                               progress))
        if "signs" in args.parts:
            sign_cells = asyncio.run(run_sign_part(args, keysvc, config_path, pin_path.read_text().strip(),
                                                   progress))
        if seal_cells or sign_cells:
            print_table(args, *seal_cells, sign_cells=sign_cells)
        if "tokens" in args.parts:
            token_cells = asyncio.run(run_token_cells(args, keysvc, config_path, pin_path.read_text().strip(),
                                                      progress))
            print_token_table(*token_cells)
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted: stopping the servers", file=sys.stderr)
        raise SystemExit(130)
    except Exception:
        for server in servers:
            tail = server.log_tail()
            if tail:
                print(f"{server.name} log (tail):\n{tail}", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let clean-up finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        progress("servers stopped, temporary token removed")


if __name__ == "__main__":
    main()
