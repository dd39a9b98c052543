"""One table from domain errors to gRPC status codes, with rich error details.

Every status carries a google.rpc.ErrorInfo (reason, domain "keysvc"); an
INVALID_ARGUMENT also carries a BadRequest naming the field. Anything unexpected
becomes INTERNAL with a generic message: the details go to the server log only,
without request data.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from keysvc import errors
from keysvc.limits import RateLimited

log = logging.getLogger("keysvc.rpc")

ERROR_DOMAIN = "keysvc"

STATUS_BY_ERROR: dict[type[errors.KeysvcError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.IntegrityError: grpc.StatusCode.DATA_LOSS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_code_of(error: errors.KeysvcError) -> grpc.StatusCode:
    for error_class in type(error).__mro__:
        if error_class in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[error_class]
    return grpc.StatusCode.INTERNAL


def _packed(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(error: errors.KeysvcError) -> grpc.Status:
    code = status_code_of(error)
    details = [_packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN,
                                                   metadata=error.metadata))]
    if isinstance(error, RateLimited):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(error, errors.InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


def internal_status() -> grpc.Status:
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message="internal error; the server log has the details",
        details=[_packed(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))],
    )
    return rpc_status.to_status(status)


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on the monotonic clock, or None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def translated(method):
    """Wraps a servicer method: domain errors become their status, anything else INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except errors.KeysvcError as error:
            context.abort_with_status(rich_status(error))
        except Exception as error:
            # The type and the stack only: an exception's text may quote request data.
            log.error(
                "unexpected %s in %s\n%s",
                type(error).__name__, method.__name__, "".join(traceback.format_tb(error.__traceback__)),
            )
            context.abort_with_status(internal_status())

    return wrapper
