"""Who may call what: roles, the RPCs each role may call, and the policy file that
grants roles to caller identities (PCI DSS 7: each caller does its job and no more).

    gateway      seals and verifies (SealService), tokenizes (Tokenize, GetTokenInfo)
    detokenizer  Detokenize
    signer       SigningService
    key-admin    KeyService, and token data-key administration
    auditor      AuditService
    (key-admin also approves others' dual-control requests: ApprovalService)
    (key-admin and auditor list the replicas: ReplicaService.ListReplicas)
    (key-admin delivers the master key to an enrolling replica, under dual control;
     key-admin and auditor read its check value and the enrollments: MasterKeyService)
    (key-admin proposes a new policy, under dual control; key-admin and auditor read the
     policy in force: PolicyService)

A grant may be limited to some merchants (key ids `<merchant>/<name>`) or token
domains; by default it covers all. Anything not granted is refused.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ROLES = ("gateway", "detokenizer", "signer", "key-admin", "auditor")
ALL = "*"

_SEALS = "/keysvc.v1.SealService/"
_SIGNING = "/keysvc.v1.SigningService/"
_KEYS = "/keysvc.v1.KeyService/"
_TOKENS = "/keysvc.v1.TokenService/"
_AUDIT = "/keysvc.v1.AuditService/"
_APPROVALS = "/keysvc.v1.ApprovalService/"
_REPLICAS = "/keysvc.v1.ReplicaService/"
_MASTER_KEY = "/keysvc.v1.MasterKeyService/"
_POLICY = "/keysvc.v1.PolicyService/"

# Method name prefix (a service) or full method name → the roles that may call it.
RPC_ROLES: dict[str, frozenset[str]] = {
    _SEALS: frozenset({"gateway"}),
    _SIGNING: frozenset({"signer"}),
    _KEYS: frozenset({"key-admin"}),
    _TOKENS + "Tokenize": frozenset({"gateway"}),
    _TOKENS + "GetTokenInfo": frozenset({"gateway", "detokenizer", "key-admin"}),
    _TOKENS + "Detokenize": frozenset({"detokenizer"}),
    _TOKENS + "DeleteToken": frozenset({"key-admin"}),
    _TOKENS + "RotateTokenKey": frozenset({"key-admin"}),
    _TOKENS + "RewrapTokens": frozenset({"key-admin"}),
    _TOKENS + "ShredTokenDomain": frozenset({"key-admin"}),
    _AUDIT: frozenset({"auditor"}),
    _APPROVALS: frozenset({"key-admin"}),
    _REPLICAS + "ListReplicas": frozenset({"key-admin", "auditor"}),
    _MASTER_KEY + "DeliverMasterKey": frozenset({"key-admin"}),
    _MASTER_KEY + "GetMasterKeyCheckValue": frozenset({"key-admin", "auditor"}),
    _MASTER_KEY + "ListEnrollments": frozenset({"key-admin", "auditor"}),
    _POLICY + "ProposePolicy": frozenset({"key-admin"}),
    _POLICY + "GetPolicy": frozenset({"key-admin", "auditor"}),
}
# Calls limited per identity (keysvc.limits), by kind: a Verify endpoint is a MAC oracle
# and Detokenize hands out card numbers.
RATE_LIMITED_METHODS = {
    _SEALS + "Verify": "verify", _SEALS + "BatchVerify": "verify", _SIGNING + "Verify": "verify",
    _TOKENS + "Detokenize": "detokenize",
}
# Calls that can hold the HSM for long: a caller must say how long it will wait.
DEADLINE_REQUIRED_METHODS = frozenset({
    _SEALS + "BatchSeal", _SEALS + "BatchVerify", _SIGNING + "BatchSign", _TOKENS + "Tokenize",
    _TOKENS + "Detokenize", _TOKENS + "RewrapTokens", _KEYS + "CreateKey", _KEYS + "RotateKey",
})
# Calls that need a second key-admin's approval when dual control is on: the optional
# ones by the short name `auth.dual_control_operations` lists them with (all by default);
# delivering the master key to another HSM always needs two.
OPTIONAL_DUAL_CONTROL = {
    "ImportKey": _KEYS + "ImportKey", "DestroyKeyVersion": _KEYS + "DestroyKeyVersion",
    "ShredTokenDomain": _TOKENS + "ShredTokenDomain", "ProposePolicy": _POLICY + "ProposePolicy",
}
ALWAYS_DUAL_CONTROL = frozenset({_MASTER_KEY + "DeliverMasterKey"})
DUAL_CONTROL_METHODS = frozenset(OPTIONAL_DUAL_CONTROL.values()) | ALWAYS_DUAL_CONTROL


def dual_control_methods(operations: Iterable[str]) -> frozenset[str]:
    """The full method names needing two key-admins when `operations` (short names from
    OPTIONAL_DUAL_CONTROL) are configured. Raises KeyError naming an unknown one."""
    return frozenset(OPTIONAL_DUAL_CONTROL[name] for name in operations) | ALWAYS_DUAL_CONTROL
# Calls that change keys or reveal card numbers: recorded in the audit trail whatever
# their outcome (denied calls of every method are recorded too).
AUDITED_METHODS = frozenset({
    _KEYS + name for name in ("CreateKey", "ImportKey", "RotateKey", "SetKeyVersionState", "SetPrimaryVersion",
                              "DestroyKeyVersion")
} | {
    _TOKENS + name for name in ("Detokenize", "DeleteToken", "RotateTokenKey", "RewrapTokens", "ShredTokenDomain")
} | {
    _APPROVALS + name for name in ("ApproveOperation", "RejectOperation")
} | {
    _MASTER_KEY + "DeliverMasterKey", _POLICY + "ProposePolicy",
})


def roles_for(method: str) -> frozenset[str]:
    """The roles that may call `method` (a full gRPC method name); empty when none."""
    found = RPC_ROLES.get(method)
    if found is None:
        found = RPC_ROLES.get(method[: method.rfind("/") + 1], frozenset())
    return found


class PolicyError(ValueError):
    """The policy file is malformed; the message names the grant and the setting."""


@dataclass(frozen=True)
class Grant:
    identity: str
    roles: frozenset[str]
    merchants: frozenset[str] = frozenset({ALL})
    domains: frozenset[str] = frozenset({ALL})


@dataclass(frozen=True)
class Scope:
    """What a request touches: the merchants of its key ids, its token domains."""

    merchants: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""
    # The role the call is made with (for metrics): the granted role that allows it, or
    # when refused the caller's roles joined by "+"; "" for an identity with no grant.
    role: str = ""


class Policy:
    def __init__(self, grants: list[Grant]) -> None:
        self._grants = {grant.identity: grant for grant in grants}

    @classmethod
    def load(cls, path: Path) -> "Policy":
        """Reads a TOML policy file (see `parse`). Raises PolicyError."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise PolicyError(f"cannot read the policy {path}: {error}") from None
        return cls.parse(text, f"the policy {path}")

    @classmethod
    def parse(cls, text: str, source: str = "the policy") -> "Policy":
        """A TOML policy: [[grant]] identity, roles, optional merchants, domains; nothing
        else (a misspelt `merchants` must not silently grant every merchant). Raises
        PolicyError naming the grant and the setting."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise PolicyError(f"cannot read {source}: {error}") from None
        unknown = sorted(set(document) - {"grant"})
        entries = document.get("grant", [])
        if unknown:
            raise PolicyError(f"{source}: unknown setting {unknown[0]!r} (a policy holds [[grant]] tables only)")
        if not isinstance(entries, list):
            raise PolicyError(f"{source}: grant must be an array of tables ([[grant]])")
        grants = []
        for index, entry in enumerate(entries):
            where = f"grant {index + 1}"
            if not isinstance(entry, dict):
                raise PolicyError(f"{where}: must be a table ([[grant]])")
            extra = sorted(set(entry) - {"identity", "roles", "merchants", "domains"})
            if extra:
                raise PolicyError(f"{where}: unknown setting {extra[0]!r}")
            identity = entry.get("identity")
            roles = entry.get("roles", [])
            if not isinstance(identity, str) or not identity:
                raise PolicyError(f"{where}: identity must be a non-empty string")
            if not isinstance(roles, list) or not roles or any(role not in ROLES for role in roles):
                raise PolicyError(f"{where}: roles must be a list of {', '.join(ROLES)}")
            limits = {}
            for name in ("merchants", "domains"):
                value = entry.get(name, [ALL])
                if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
                    raise PolicyError(f"{where}: {name} must be a list of names (or [\"*\"])")
                limits[name] = frozenset(value)
            grants.append(Grant(identity, frozenset(roles), **limits))
        identities = [grant.identity for grant in grants]
        if len(set(identities)) != len(identities):
            raise PolicyError("an identity has two grants: merge them")
        return cls(grants)

    def take(self, newer: "Policy") -> None:
        """Uses `newer`'s grants from now on (one assignment: calls see the old or the new)."""
        self._grants = newer._grants

    def roles_of(self, identity: str) -> frozenset[str]:
        grant = self._grants.get(identity)
        return grant.roles if grant else frozenset()

    def holders_of(self, role: str) -> frozenset[str]:
        """The identities granted `role`."""
        return frozenset(grant.identity for grant in self._grants.values() if role in grant.roles)

    def decide(self, identity: str, method: str, scope: Scope) -> Decision:
        grant = self._grants.get(identity)
        if grant is None:
            return Decision(False, f"{identity or 'the caller'} has no grant in the policy")
        needed = roles_for(method)
        usable = needed & grant.roles
        if not usable:
            wanted = " or ".join(sorted(needed)) or "a role no one holds"
            return Decision(False, f"{method} needs the {wanted} role", "+".join(sorted(grant.roles)))
        role = min(usable)
        if ALL not in grant.merchants and not scope.merchants <= grant.merchants:
            return Decision(False, "the grant does not cover this merchant", role)
        if ALL not in grant.domains and not scope.domains <= grant.domains:
            return Decision(False, "the grant does not cover this token domain", role)
        return Decision(True, role=role)
