"""Authentication, authorisation and the audit trail for every RPC, in one interceptor.

The caller's identity comes from its TLS client certificate (keysvc.pki.identity_of);
the policy (keysvc.authz) says whether it may make the call on the merchants and token
domains the request names. Refused calls end UNAUTHENTICATED or PERMISSION_DENIED and
are recorded. Audited calls (key changes, detokenization) are recorded before they run
(no record, no call: UNAVAILABLE) and again with their outcome. Health checking and
reflection stay open. Without a policy (the --insecure-loopback development mode)
every call is allowed and recorded as made by "insecure-loopback".
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import grpc

from keysvc import errors
from keysvc.approvals import Approvals
from keysvc.audit import AuditTrail
from keysvc.authz import (
    AUDITED_METHODS,
    DEADLINE_REQUIRED_METHODS,
    RATE_LIMITED_METHODS,
    Policy,
    Scope,
)
from keysvc.limits import RateLimited, RateLimiter
from keysvc.logs import current_identity, current_request_id, current_role
from keysvc.pki import identity_of
from keysvc.policies import digest_of
from keysvc.rpc.errors import rich_status

log = logging.getLogger("keysvc.auth")

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
INSECURE_IDENTITY = "insecure-loopback"
NO_DEADLINE_SECONDS = 24 * 3600
_MAX_REMEMBERED_IDENTITIES = 1024


def scope_of(request) -> Scope:
    """The merchants and token domains a request names, in any field or batch item."""
    merchants: set[str] = set()
    domains: set[str] = set()

    def walk(message) -> None:
        for descriptor, value in message.ListFields():
            if descriptor.message_type is not None:
                for item in value if descriptor.is_repeated else [value]:
                    walk(item)
            elif descriptor.name == "key_id":
                merchants.add(value.partition("/")[0])
            elif descriptor.name == "merchant_id":
                merchants.add(value)
            elif descriptor.name == "domain":
                domains.add(value)

    walk(request)
    return Scope(frozenset(merchants), frozenset(domains))


def _target(scope: Scope, request) -> str:
    parts = sorted(scope.merchants) + [f"domain={d}" for d in sorted(scope.domains)]
    key_id = getattr(request, "key_id", "")
    if not key_id and getattr(request, "merchant_id", "") and getattr(request, "name", ""):
        key_id = f"{request.merchant_id}/{request.name}"  # CreateKey, ImportKey: the key they make
    version = getattr(request, "version", 0)
    if key_id:
        parts = [f"{key_id}#{version}" if version else key_id]
    enrollment_id = getattr(request, "enrollment_id", "")
    if enrollment_id:  # DeliverMasterKey: what the approving key-admin must recognise
        parts = [f"enrollment={enrollment_id}", f"transport-key={getattr(request, 'transport_key_fingerprint', '')}"]
    if getattr(request, "operation_id", ""):  # an approval names the operation it decides
        parts.append(f"op={request.operation_id}")
    if hasattr(request, "policy_toml"):  # ProposePolicy: the policy by its digest
        parts = [f"policy sha256={digest_of(request.policy_toml)}"]
    return ",".join(parts)[:512]


def target_of(request) -> str:
    """What the audit trail and an approving key-admin see of a request: its key id and
    version, merchants and token domains, enrollment and transport key, or policy digest."""
    return _target(scope_of(request), request)


class AuthInterceptor(grpc.ServerInterceptor):
    """`prechecks` (method -> check(request), raising KeysvcError) refuse a malformed
    request before it is kept for approval, rather than when it is approved."""

    def __init__(self, policy: Policy | None, audit: AuditTrail | None, approvals: Approvals | None = None,
                 limiter: RateLimiter | None = None, prechecks: Mapping[str, Callable] | None = None) -> None:
        self._policy = policy
        self._prechecks = dict(prechecks or {})
        self._audit = audit
        # Abuse limits apply to identified callers (with a policy).
        self._limiter = limiter if policy is not None else None
        # Dual control needs identities: only with a policy.
        self._approvals = approvals if policy is not None else None
        # method -> (the inner handler, the guarded handler wrapping it)
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        # client certificate (PEM) -> identity (keysvc.pki.identity_of: a pure function of it)
        self._identities: dict[bytes, str] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or method.startswith(OPEN_PREFIXES):
            return handler
        # gRPC asks on every call: the guarded handler is built once per method (and
        # again only if the inner one changes).
        built = self._guarded.get(method)
        if built is None or built[0] is not handler:
            built = (handler, grpc.unary_unary_rpc_method_handler(
                self._guarding(method, handler.unary_unary), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            ))
            self._guarded[method] = built
        return built[1]

    def _guarding(self, method: str, inner):
        if self._policy is None and method not in AUDITED_METHODS:
            # The development mode's hot path (Seal, Verify...): nothing to decide or record.
            def open_call(request, context):
                current_identity.set(INSECURE_IDENTITY)
                return inner(request, context)

            return open_call

        def guarded(request, context):
            return self._call(method, inner, request, context)

        return guarded

    def _identity(self, context) -> str | None:
        if self._policy is None:
            return INSECURE_IDENTITY
        certificates = context.auth_context().get("x509_pem_cert")
        if not certificates:
            return None
        certificate = certificates[0]
        identity = self._identities.get(certificate)
        if identity is None:
            # identity_of parses the certificate (x509): once per certificate, not per call.
            identity = identity_of(certificate)
            if len(self._identities) >= _MAX_REMEMBERED_IDENTITIES:
                self._identities.clear()  # rare: many distinct client certificates
            self._identities[certificate] = identity
        return identity

    def _record(self, identity: str, method: str, target: str, outcome: str, request_id: str) -> None:
        if self._audit is not None:
            self._audit.record(identity=identity, operation=method, target=target, outcome=outcome,
                               request_id=request_id)

    def _refuse(self, context, error: errors.KeysvcError, identity: str, method: str, target: str,
                request_id: str) -> None:
        try:
            self._record(identity, method, target, error.reason, request_id)
        except errors.KeysvcError:
            log.error("a refused call could not be recorded in the audit trail")
        context.abort_with_status(rich_status(error))

    def _ask_for_approval(self, context, identity: str, method: str, request, target: str, request_id: str) -> None:
        """Keeps the request as a pending operation instead of running it, and says so."""
        try:
            operation = self._approvals.propose(method, request.SerializeToString(), target, identity)
            self._record(identity, method, f"{target} op={operation.operation_id}", "APPROVAL_REQUIRED", request_id)
        except errors.KeysvcError as error:
            context.abort_with_status(rich_status(error))
        name = method.rpartition("/")[2]
        context.abort_with_status(rich_status(errors.FailedPrecondition(
            f"{name} needs a second key-admin: pending operation {operation.operation_id}, until "
            f"{operation.expires_at.isoformat(timespec='seconds')} (keysvc approvals approve "
            f"{operation.operation_id})",
            reason="APPROVAL_REQUIRED", metadata={"operation_id": operation.operation_id},
        )))

    def _check_limits(self, context, identity: str, method: str, request, target: str, request_id: str) -> None:
        remaining = context.time_remaining()
        # gRPC reports a call without a deadline as one that ends in a distant future.
        if method in DEADLINE_REQUIRED_METHODS and (remaining is None or remaining > NO_DEADLINE_SECONDS):
            self._refuse(context, errors.InvalidArgument(
                "deadline", f"{method.rpartition('/')[2]} needs a call deadline (timeout): it can hold the HSM "
                            "for long"), identity, method, target, request_id)
        kind = RATE_LIMITED_METHODS.get(method)
        if kind is not None and self._limiter is not None:
            items = len(getattr(request, "requests", None) or getattr(request, "tokens", None) or [None])
            try:
                self._limiter.take(identity, kind, items)
            except RateLimited as error:
                self._refuse(context, error, identity, method, target, request_id)

    def _call(self, method: str, inner, request, context):
        request_id = current_request_id.get() or ""  # the one the access log and metrics use
        scope = scope_of(request)
        target = _target(scope, request)
        identity = self._identity(context)
        current_identity.set(identity or "unauthenticated")  # the access log and approvals read it
        if identity is None:
            self._refuse(context, errors.Unauthenticated("a client certificate from the keysvc CA is required"),
                         "unauthenticated", method, target, request_id)
        if self._policy is not None:
            decision = self._policy.decide(identity, method, scope)
            current_role.set(decision.role)  # the request metrics' label
            if not decision.allowed:
                self._refuse(context, errors.PermissionDenied(decision.reason), identity, method, target, request_id)
            self._check_limits(context, identity, method, request, target, request_id)
        precheck = self._prechecks.get(method)
        if precheck is not None:
            try:
                precheck(request)
            except errors.KeysvcError as error:
                self._refuse(context, error, identity, method, target, request_id)
        if self._approvals is not None and self._approvals.requires(method):
            self._ask_for_approval(context, identity, method, request, target, request_id)
        if method not in AUDITED_METHODS:
            return inner(request, context)
        try:
            self._record(identity, method, target, "STARTED", request_id)
        except errors.KeysvcError as error:
            context.abort_with_status(rich_status(error))
        outcome = "INTERNAL"
        try:
            response = inner(request, context)
            outcome = "OK"
            return response
        except BaseException:
            code = context.code() if hasattr(context, "code") else None
            outcome = code.name if isinstance(code, grpc.StatusCode) else "ERROR"
            raise
        finally:
            try:
                self._record(identity, method, target, outcome, request_id)
            except errors.KeysvcError:
                log.error("the outcome of %s could not be recorded in the audit trail", method)
