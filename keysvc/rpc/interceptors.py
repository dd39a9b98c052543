"""The server interceptor that observes every unary call: a request id (the caller's
`x-request-id` when it sends a plain one, else a new one; returned in the trailing
metadata), one access log event, request metrics, a health probe as soon as a
call ends UNAVAILABLE, and the call's deadline as the bound of its waits for the
HSM (hsm/deadline.py).

It reads nothing of the request but the RPC name and, for batch calls, the number
of items: no key id, no message, no seal ever reaches a log line or a label. The
caller's role (a label) comes from the auth interceptor, inside this one.
"""

from __future__ import annotations

import logging
import re
import os
import time
from typing import Callable

import grpc

from hsm.deadline import reset_call_deadline, set_call_deadline
from keysvc import metrics
from keysvc.config import ACCESS_LOG_MODES
from keysvc.logs import current_identity, current_request_id, current_role

access_log = logging.getLogger("keysvc.access")

REQUEST_ID_HEADER = "x-request-id"
# A caller's request id is kept when it is short and plain, else replaced.
_CALLER_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Generated ids are letters only, so that log redaction (digit runs, hex runs) never
# mistakes one for a PAN or a key.
_ID_LENGTH = 22  # about 103 bits
# Fields holding a batch's items, whose count is recorded.
_BATCH_FIELDS = ("requests", "items")


# byte -> a lowercase letter (97 + byte % 26), for bytes.translate.
_ID_LETTERS = bytes(97 + byte % 26 for byte in range(256))
_NOT_YET = object()


def _request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _CALLER_REQUEST_ID.fullmatch(value):
            return value
    return os.urandom(_ID_LENGTH).translate(_ID_LETTERS).decode("ascii")


def _batch_field(request) -> str | None:
    """The name of the request's repeated field holding a batch's items, if any."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return None
    for name in _BATCH_FIELDS:
        field = descriptor.fields_by_name.get(name)
        if field is not None and field.is_repeated:
            return name
    return None


class ObservingInterceptor(grpc.ServerInterceptor):
    """Observes unary-unary calls; streaming ones (health Watch, reflection) pass through.

    `on_unavailable` is called (cheaply: it should only wake a prober) after a call
    ends with UNAVAILABLE. `access_log` says which calls get an access event: "all",
    "errors" (every status but OK: the default, since an event costs a unary call
    ~20 % of its throughput, measured with make bench) or "off".
    """

    def __init__(self, on_unavailable: Callable[[], None] | None = None, *, access_log: str = "errors") -> None:
        if access_log not in ACCESS_LOG_MODES:
            raise ValueError(f"access_log must be one of {', '.join(ACCESS_LOG_MODES)}")
        self._on_unavailable = on_unavailable
        self._log_ok = access_log == "all"
        self._log_failed = access_log != "off"
        # method -> (the inner handler, the observed handler wrapping it)
        self._observed: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        # gRPC asks on every call: the observed handler is built once per method (and
        # again only if the inner one changes), not a closure and a handler per call.
        method = handler_call_details.method
        built = self._observed.get(method)
        if built is None or built[0] is not handler:
            built = (handler, grpc.unary_unary_rpc_method_handler(
                self._observing(method.lstrip("/"), handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            ))
            self._observed[method] = built
        return built[1]

    def _observing(self, rpc: str, inner):
        batch_field = [_NOT_YET]  # the request type's batch field, found at its first call
        record = self._record
        perf_counter = time.perf_counter

        def observed(request, context):
            start = perf_counter()
            request_id = _request_id(context)
            bound = current_request_id.set(request_id)  # for every log line and inner interceptor
            # The auth interceptor sets who calls; a pool thread must not lend the last
            # call's caller to a call that never reaches it (health checks).
            identity_bound, role_bound = current_identity.set(""), current_role.set("")
            # A call waits for the process's PKCS#11 lock until its deadline at most (a hung
            # or long-held HSM must not hold every server thread).
            deadline_bound = set_call_deadline(context.time_remaining())
            code = grpc.StatusCode.UNKNOWN
            try:
                response = inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                try:
                    # In the trailers, which leave with the status anyway (initial metadata
                    # of its own cost ~35 µs of CPU a call); after an abort too, since the
                    # status goes out after this returns.
                    trailers = context.trailing_metadata()
                    own = ((REQUEST_ID_HEADER, request_id),)
                    context.set_trailing_metadata(tuple(trailers) + own if trailers else own)
                    if batch_field[0] is _NOT_YET:
                        batch_field[0] = _batch_field(request)
                    size = None if batch_field[0] is None else len(getattr(request, batch_field[0]))
                    record(rpc, code, perf_counter() - start, size, request_id, context)
                finally:
                    current_request_id.reset(bound)
                    current_identity.reset(identity_bound)
                    current_role.reset(role_bound)
                    reset_call_deadline(deadline_bound)

        return observed

    def _record(self, rpc, code, seconds, size, request_id, context) -> None:
        status = code.name
        role = current_role.get() or metrics.NO_ROLE
        metrics.requests_total.labels(rpc, status, role).inc()
        metrics.request_seconds.labels(rpc, role).observe(seconds)
        if size is not None:
            metrics.batch_items.labels(rpc).observe(size)
        if code is grpc.StatusCode.UNAVAILABLE and self._on_unavailable is not None:
            self._on_unavailable()
        wanted = self._log_ok if code is grpc.StatusCode.OK else self._log_failed
        if wanted and access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s", rpc, status,
                extra={"request_id": request_id, "identity": current_identity.get() or None, "rpc": rpc,
                       "status": status,
                       "duration_ms": round(seconds * 1000, 3), "peer": context.peer()},
            )
