"""Echo baseline for the keysvc benchmark: the gRPC transport with no HSM behind it.

Serves keysvc.v1.SealService on a grpc.server built like keysvc.rpc.server's
create_server (same ThreadPoolExecutor size, same channel options, taken from
ServerOptions as `keysvc serve` with one worker uses them). Its Seal answers a
constant SealResponse; the other methods answer constant responses too, so the
difference from a real keysvc server is the servicer's work (parsing, key cache,
HSM call), not the transport.

Usage: echo_server.py [--listen HOST:PORT]   (port 0 picks one)
Prints "echo serving on HOST:PORT with 1 worker(s)" once listening; stops on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import grpc  # noqa: E402

from keysvc.rpc.server import ServerOptions, listen, new_grpc_server  # noqa: E402
from keysvc.v1 import seals_pb2, seals_pb2_grpc  # noqa: E402

# A seal of the size keysvc answers for HMAC-SHA256 in hex.
CONSTANT_SEAL = seals_pb2.SealResponse(seal="0" * 64, key_id="bench/echo", version=1)


class EchoSealServicer(seals_pb2_grpc.SealServiceServicer):
    def Seal(self, request, context):
        return CONSTANT_SEAL

    def Verify(self, request, context):
        return seals_pb2.VerifyResponse(valid=True, key_id=request.key_id, version=1)

    def BatchSeal(self, request, context):
        return seals_pb2.BatchSealResponse(
            results=[seals_pb2.BatchSealResult(response=CONSTANT_SEAL) for _ in request.requests]
        )

    def BatchVerify(self, request, context):
        return seals_pb2.BatchVerifyResponse(
            results=[seals_pb2.BatchVerifyResult(response=seals_pb2.VerifyResponse(valid=True, version=1))
                     for _ in request.requests]
        )


def create_echo_server(address: str, options: ServerOptions) -> tuple[grpc.Server, int]:
    """The same kind of server as keysvc's (keysvc.rpc.server.new_grpc_server), echoing."""
    server = new_grpc_server(options)
    seals_pb2_grpc.add_SealServiceServicer_to_server(EchoSealServicer(), server)
    return server, listen(server, address)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    # As `keysvc serve` builds them with one worker (keysvc.service.serve_here).
    options = ServerOptions(reuse_port=False)
    server, port = create_echo_server(args.listen, options)
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    server.start()
    host = args.listen.rpartition(":")[0]
    print(f"echo serving on {host}:{port} with 1 worker(s)", flush=True)
    stop.wait()
    server.stop(1.0).wait()


if __name__ == "__main__":
    main()
