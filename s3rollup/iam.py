"""IAM policy evaluation, offline: the constructs template.yaml uses, as AWS documents them.

One request (principal, action, resource, condition keys) against the caller's identity
policies and the resource's policy (bucket, queue or key policy), in one account:

1. an explicit ``Deny`` in any policy that applies refuses the request;
2. otherwise a KMS key policy must allow it, directly (the caller is named) or by delegating
   to IAM (the account is named: then an identity policy must allow it too);
3. otherwise, for every other resource, an ``Allow`` in an identity policy or in the resource
   policy naming the caller allows it;
4. otherwise the request is implicitly denied.

The account root's identity allows everything (resource policies still apply). Covered:
``Action``/``NotAction``, ``Resource``/``NotResource``, ``Principal`` (``"*"``, ``AWS``,
``Service``), and the condition operators String*, Arn*, Bool and Null, with ``IfExists`` and
the ``ForAnyValue``/``ForAllValues`` set operators. Anything else in a policy is refused
loudly (PolicyError) rather than guessed at.

(IAM policy evaluation logic: https://docs.aws.amazon.com/IAM/latest/UserGuide/
reference_policies_evaluation-logic.html; condition operators: ...reference_policies_elements
_condition_operators.html; KMS key policies: https://docs.aws.amazon.com/kms/latest/
developerguide/key-policy-default.html.)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import S3RollupError

Policy = Mapping[str, Any]
Context = Mapping[str, str | Sequence[str]]


class PolicyError(S3RollupError):
    """A policy uses a construct this evaluator does not cover."""

    code = "POLICY_UNSUPPORTED"


@dataclass(frozen=True)
class Request:
    """One authorization question: may principal do action on resource, in this context?"""

    principal: str  # arn:aws:iam::<account>:root, a role ARN or an assumed-role session ARN
    action: str  # service:Action
    resource: str  # an ARN
    context: Context = field(default_factory=dict)  # condition keys (any case) -> value(s)

    @property
    def account(self) -> str:
        """The principal's account."""
        return self.principal.split(":")[4]

    @property
    def is_root(self) -> bool:
        """The account root, whose identity allows everything."""
        return self.principal.endswith(":root")

    @property
    def role_arn(self) -> str:
        """The role behind an assumed-role session (the principal itself otherwise)."""
        m = re.fullmatch(r"arn:([^:]+):sts::(\d+):assumed-role/([^/]+)/.+", self.principal)
        return f"arn:{m[1]}:iam::{m[2]}:role/{m[3]}" if m else self.principal


@dataclass(frozen=True)
class Decision:
    """The answer and the statement (or its absence) that decided it."""

    allowed: bool
    reason: str  # "explicit deny (<sid>)", "allowed by <where> (<sid>)", "implicit deny: ..."


# ---- matching -----------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _glob(pattern: str, case: bool) -> re.Pattern[str]:
    text = fnmatch.translate(pattern).replace("[", r"\[")  # only * and ? are wildcards
    return re.compile(text, 0 if case else re.IGNORECASE)


def like(pattern: str, value: str, case: bool = True) -> bool:
    """IAM's wildcard match: ``*`` any run of characters, ``?`` one character."""
    if "*" not in pattern and "?" not in pattern:
        return pattern == value if case else pattern.lower() == value.lower()
    return _glob(pattern, case).match(value) is not None


def arn_like(pattern: str, value: str) -> bool:
    """ArnLike: each of the six colon-separated parts matched on its own."""
    p, v = pattern.split(":", 5), value.split(":", 5)
    return len(p) == len(v) == 6 and all(like(a, b) for a, b in zip(p, v, strict=True))


def as_list(value: Any) -> list[Any]:
    """A policy element's value as a list (policies give one value or a list)."""
    return list(value) if isinstance(value, list | tuple) else [value]


def _matches_action(st: Mapping[str, Any], action: str) -> bool:
    if "Action" in st:
        return any(like(a, action, case=False) for a in as_list(st["Action"]))
    if "NotAction" in st:
        return not any(like(a, action, case=False) for a in as_list(st["NotAction"]))
    raise PolicyError(f"statement {st.get('Sid', '?')} has neither Action nor NotAction")


def _matches_resource(st: Mapping[str, Any], resource: str) -> bool:
    if "Resource" in st:
        return any(like(r, resource) for r in as_list(st["Resource"]))
    if "NotResource" in st:
        return not any(like(r, resource) for r in as_list(st["NotResource"]))
    return True  # a resource policy may leave Resource out (it is the resource itself)


def principal_match(st: Mapping[str, Any], request: Request) -> str:
    """How a resource policy's statement names the caller: "direct", "account" (the account
    root or id: delegated to IAM) or "" (not at all)."""
    if "NotPrincipal" in st:
        raise PolicyError("NotPrincipal is not supported")
    principal = st.get("Principal")
    if principal == "*":
        return "direct"
    if not isinstance(principal, Mapping):
        return ""
    for kind, names in principal.items():
        for name in as_list(names):
            if kind != "AWS":
                continue  # Service principals: the service's own calls, not a caller's
            if name == "*" or name in (request.principal, request.role_arn):
                return "direct"
            if name in (request.account, f"arn:aws:iam::{request.account}:root"):
                return "account"
    return ""


# ---- conditions ---------------------------------------------------------------------------

_STRING_OPS = {
    "StringEquals": lambda p, v: p == v,
    "StringNotEquals": lambda p, v: p == v,
    "StringEqualsIgnoreCase": lambda p, v: p.lower() == v.lower(),
    "StringNotEqualsIgnoreCase": lambda p, v: p.lower() == v.lower(),
    "StringLike": like,
    "StringNotLike": like,
    "ArnEquals": lambda p, v: p == v,
    "ArnNotEquals": lambda p, v: p == v,
    "ArnLike": arn_like,
    "ArnNotLike": arn_like,
    "Bool": lambda p, v: str(p).lower() == str(v).lower(),
}


def _condition_holds(op: str, key: str, wanted: Any, context: Mapping[str, Any]) -> bool:
    qualifier, _, base = op.rpartition(":")
    if_exists = base.endswith("IfExists")
    base = base.removesuffix("IfExists")
    present = key.lower() in context
    if base == "Null":
        return any(str(w).lower() == ("false" if present else "true") for w in as_list(wanted))
    if base not in _STRING_OPS or qualifier not in ("", "ForAnyValue", "ForAllValues"):
        raise PolicyError(f"condition operator {op} is not supported")
    negated = "Not" in base
    if not present:
        # A missing key: IfExists and negated operators hold; the others do not
        # (ForAllValues holds on an empty set).
        return if_exists or negated or qualifier == "ForAllValues"
    values = [str(v) for v in as_list(context[key.lower()])]
    test = _STRING_OPS[base]
    patterns = [str(w) for w in as_list(wanted)]

    def matches(value: str) -> bool:
        return any(test(p, value) for p in patterns)

    if qualifier == "ForAllValues":
        hit = all(matches(v) for v in values)
    else:  # a single-valued key, or ForAnyValue
        hit = any(matches(v) for v in values)
    return not hit if negated else hit


def conditions_hold(st: Mapping[str, Any], context: Context) -> bool:
    """Every operator of the statement's Condition holds (AND across keys and operators)."""
    lowered = {k.lower(): v for k, v in context.items()}
    for op, block in (st.get("Condition") or {}).items():
        for key, wanted in block.items():
            if not _condition_holds(op, key, wanted, lowered):
                return False
    return True


# ---- evaluation ---------------------------------------------------------------------------


def _statements(policy: Policy | None) -> Iterable[Mapping[str, Any]]:
    if not policy:
        return []
    return as_list(policy.get("Statement", []))


def _sid(st: Mapping[str, Any]) -> str:
    return str(st.get("Sid") or "no Sid")


def evaluate(
    request: Request,
    identity_policies: Sequence[Policy] = (),
    resource_policy: Policy | None = None,
    key_policy: bool = False,
) -> Decision:
    """Decide one request as IAM would (see the module's docstring); key_policy says that
    resource_policy is a KMS key policy, which must allow the request itself."""
    identity_allow = "the account root" if request.is_root else ""
    for policy in identity_policies:
        for st in _statements(policy):
            if not (_matches_action(st, request.action) and _matches_resource(st, request.resource)):
                continue
            if not conditions_hold(st, request.context):
                continue
            if st["Effect"] == "Deny":
                return Decision(False, f"explicit deny in an identity policy ({_sid(st)})")
            identity_allow = identity_allow or f"an identity policy ({_sid(st)})"
    resource_allow = delegated = ""
    for st in _statements(resource_policy):
        how = principal_match(st, request)
        if not how or not _matches_action(st, request.action):
            continue
        if not _matches_resource(st, request.resource) or not conditions_hold(st, request.context):
            continue
        if st["Effect"] == "Deny":
            return Decision(False, f"explicit deny in the resource policy ({_sid(st)})")
        if how == "direct":
            resource_allow = resource_allow or _sid(st)
        else:
            delegated = delegated or _sid(st)
    if key_policy:
        if resource_allow:
            return Decision(True, f"allowed by the key policy ({resource_allow})")
        if delegated and identity_allow:
            return Decision(True, f"allowed by the key policy ({delegated}) and {identity_allow}")
        if delegated:
            return Decision(
                False, f"implicit deny: the key policy delegates ({delegated}) but no identity policy allows"
            )
        return Decision(False, "implicit deny: no key policy statement allows")
    if identity_allow:
        return Decision(True, f"allowed by {identity_allow}")
    if resource_allow:
        return Decision(True, f"allowed by the resource policy ({resource_allow})")
    return Decision(False, "implicit deny: no policy allows")
