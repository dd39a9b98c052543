"""What one HSM call costs when the CPU's caches are cold, as they are in a server.

`make bench` times HSM calls back to back (the raw loops): the module's code and data
stay in the core's caches and SoftHSM signs an HMAC in about 10 µs. In keysvc's server
each unary Seal makes its one HSM call between gRPC's work, the interpreter's and the
client's, which push SoftHSM out of the caches. This script measures the same calls
both ways on a fresh token: "hot" back to back, "cold" each after writing over a buffer
twice the size of a core's L2 cache. Python's own HMAC (OpenSSL, in process) is the
reference: a call that runs little code loses little.

Usage: .venv/bin/python bench/cache_cost.py [--calls 3000]   (make bench-cache)
Prints a table of median µs per call; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout

TOKEN_LABEL = "bench-cache"
HSM_MODULE = os.environ.get("KEYSVC_HSM_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
MESSAGE = os.urandom(64)


def _l2_bytes() -> int:
    """A core's L2 cache size from sysfs (4 MiB when it cannot be read)."""
    for index in range(4):
        base = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}")
        try:
            if (base / "level").read_text().strip() == "2":
                size = (base / "size").read_text().strip()
                return int(size.rstrip("K")) * 1024 if size.endswith("K") else int(size.rstrip("M")) * 1024 * 1024
        except (OSError, ValueError):
            continue
    return 4 * 1024 * 1024


class Evictor:
    """Writes over a buffer twice the L2 size: what ran before is no longer cached."""

    def __init__(self) -> None:
        size = 2 * _l2_bytes()
        self._buffer = bytearray(size)
        self._patterns = (b"\x01" * size, b"\x02" * size)
        self._turn = 0

    def __call__(self) -> None:
        self._turn ^= 1
        self._buffer[:] = self._patterns[self._turn]


def median_us(call: Callable[[], object], calls: int, before: Callable[[], None] | None) -> float:
    """Median µs of call(), each preceded by before() (not timed) when given."""
    for _ in range(min(200, calls)):
        call()
    timings = []
    for _ in range(calls):
        if before is not None:
            before()
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per cell")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="keysvc-cache-"))
    try:
        subprocess.run([str(REPO / "hsm/softhsm/setup-token.sh"), str(tmp), TOKEN_LABEL],
                       check=True, stdout=subprocess.DEVNULL)
        os.environ["SOFTHSM2_CONF"] = str(tmp / "softhsm2.conf")  # before the module is loaded
        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism

        from hsm.direct import DirectSigner

        session = pkcs11.lib(HSM_MODULE).get_token(token_label=TOKEN_LABEL).open(
            user_pin=(tmp / "pin").read_text().strip(), rw=True)
        hmac_key = session.generate_key(
            KeyType.GENERIC_SECRET, 256, store=False,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True})
        _public, rsa_key = session.generate_keypair(
            KeyType.RSA, 2048, store=False, private_template={Attribute.SIGN: True, Attribute.SENSITIVE: True})
        direct = DirectSigner(HSM_MODULE)
        mechanism = int(Mechanism.SHA256_HMAC)
        secret = os.urandom(32)
        digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(MESSAGE).digest()
        # (label, call, timed calls): signatures take 60 times an HMAC's time, so fewer of them.
        cells = [
            ("SoftHSM HMAC-SHA256, keysvc's direct path (Seal)",
             lambda: direct.sign_many(session.handle, hmac_key.handle, mechanism, [MESSAGE]), args.calls),
            ("SoftHSM HMAC-SHA256, python-pkcs11 (raw loop)",
             lambda: hmac_key.sign(MESSAGE, mechanism=Mechanism.SHA256_HMAC), args.calls),
            ("SoftHSM RSA-2048 PKCS#1 v1.5, python-pkcs11",
             lambda: rsa_key.sign(digest_info, mechanism=Mechanism.RSA_PKCS), max(1, args.calls // 10)),
            ("Python hmac HMAC-SHA256 (reference, no HSM)",
             lambda: hmac.new(secret, MESSAGE, "sha256").digest(), args.calls),
        ]
        evict = Evictor()
        print(f"median µs per call; cold: after writing {2 * _l2_bytes() >> 20} MiB")
        print(f"{'call':52} {'calls':>6} {'hot µs':>8} {'cold µs':>8} {'added µs':>9}")
        print("-" * 87)
        for label, call, calls in cells:
            hot = median_us(call, calls, None)
            cold = median_us(call, calls, evict)
            print(f"{label:52} {calls:6} {hot:8.1f} {cold:8.1f} {cold - hot:9.1f}")
        session.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
