"""Who may call what: the role matrix of DESIGN.md ("Roles"), enforced here and nowhere else.

A caller is the mutual-TLS identity "<role>@<site>" of its client certificate. Each rule names
who may call a method (or every method of a service, by its "/package.Service/" prefix):
"role@h" is that role of the server's own hospital (at the aggregator: of any hospital), and
"operator@central" is the federation operator. A method without a rule is refused to everyone,
so a new RPC is closed until it is given one. Health and reflection are open to every
authenticated caller. The aggregator also checks that an agent acts for its own hospital
(services/aggregator/edges/grpc_servicer.py), and the gateway that inference names the caller it reads for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fibemrss.domain.errors import ConfigError, PermissionDenied, Unauthenticated
from fibemrss.platform.identity import is_dns_label

Authorize = Callable[[str, str], None]  # (caller identity, full method name) -> raises if refused

CENTRAL = "central"
# Probes and tooling may use these on any authenticated connection.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_GATEWAY = "/fibemrss.emr.v1.EmrGatewayService/"
_AGENT = "/fibemrss.federation.v1.HospitalAgentService/"
_AGGREGATOR = "/fibemrss.federation.v1.AggregatorService/"
_DIAGNOSIS = "/fibemrss.inference.v1.DiagnosisService/"
_KSERVE = "/inference.GRPCInferenceService/"  # the KServe v2 wire package
# The MLLP and FHIR REST edges (bundles, resources, NDJSON $import and its status) ask with this
# same name, so every transport follows one rule.
INGEST_METHOD = _GATEWAY + "Ingest"

HOSPITAL_RULES: Mapping[str, frozenset[str]] = {
    # EHR interfaces hold ingest@h, which may do this and nothing else; the operator may too.
    INGEST_METHOD: frozenset({"ingest@h", "operator@h"}),
    _GATEWAY + "GetIngestStats": frozenset({"operator@h"}),
    _GATEWAY + "ListQuarantine": frozenset({"operator@h"}),
    _GATEWAY + "ResolveQuarantine": frozenset({"operator@h"}),
    _GATEWAY + "StreamTrainingExamples": frozenset({"agent@h"}),
    # One patient by key, on behalf of the caller the inference service names (audited as such).
    _GATEWAY + "GetPatient": frozenset({"inference@h"}),
    # Study review and decisions: the hospital's own operator (docs/studies.md).
    _GATEWAY + "ReviewStudy": frozenset({"operator@h"}),
    _GATEWAY + "DecideStudy": frozenset({"operator@h"}),
    _AGENT + "GetAgentStatus": frozenset({"operator@h"}),
    _DIAGNOSIS: frozenset({"ehr@h"}),
    _KSERVE: frozenset({"ehr@h"}),
}

CENTRAL_RULES: Mapping[str, frozenset[str]] = {
    _AGGREGATOR + "StartFederation": frozenset({"operator@central"}),
    _AGGREGATOR + "GetRound": frozenset({"agent@h", "operator@central"}),
    _AGGREGATOR + "SubmitUpdate": frozenset({"agent@h"}),
    _AGGREGATOR + "FetchAggregate": frozenset({"agent@h"}),
    _AGGREGATOR + "PublishMaskKey": frozenset({"agent@h"}),
    _AGGREGATOR + "GetMaskKeys": frozenset({"agent@h"}),
    _AGGREGATOR + "PostRoundMessage": frozenset({"agent@h"}),
    _AGGREGATOR + "GetRoundStage": frozenset({"agent@h"}),
    _AGGREGATOR + "FetchUpload": frozenset({"agent@h"}),
    _AGGREGATOR + "GetFederationStatus": frozenset({"agent@h", "operator@h", "operator@central"}),
    # The federation operator proposes studies; hospitals read them to review them at home.
    _AGGREGATOR + "ProposeStudy": frozenset({"operator@central"}),
    _AGGREGATOR + "GetStudyProposal": frozenset({"agent@h", "operator@h", "operator@central"}),
}


# People in the web consoles (OpenID Connect sign-in, docs/console.md), by the console role that
# their provider group maps to: a steward holds operator@h's decisions, an auditor reads. An
# action without a rule is refused to everyone.
CONSOLE_ROLES = frozenset({"steward", "auditor"})
CONSOLE_RULES: Mapping[str, frozenset[str]] = {
    "console.read": frozenset({"steward", "auditor"}),  # studies, privacy, models, consent, federation
    "console.search_audit": frozenset({"steward", "auditor"}),
    "console.read_quarantine": frozenset({"steward"}),  # held records: pseudonymous patient data
    "console.resolve_quarantine": frozenset({"steward"}),
    "console.review_study": frozenset({"steward"}),  # counts eligible patients: a read of every record
    "console.decide_study": frozenset({"steward"}),
    "console.set_budget": frozenset({"steward"}),
    "console.retire_model": frozenset({"steward"}),
}


# The federation operator's console at the aggregator: read-only for now.
CENTRAL_CONSOLE_ROLES = frozenset({"operator"})
CENTRAL_CONSOLE_RULES: Mapping[str, frozenset[str]] = {
    "console.read_federations": frozenset({"operator"}),
}


def console_authorize(
    name: str, roles: frozenset[str], action: str, rules: Mapping[str, frozenset[str]] = CONSOLE_RULES
) -> None:
    """PermissionDenied unless one of a signed-in person's console roles may take `action`."""
    if not roles & rules.get(action, frozenset()):
        held = ", ".join(sorted(roles)) or "no role"
        raise PermissionDenied(f"{name} ({held}) may not {action.removeprefix('console.').replace('_', ' ')}")


def split_identity(identity: str) -> tuple[str, str]:
    """(role, site) of "<role>@<site>", or Unauthenticated."""
    role, at, site = identity.partition("@")
    if identity.startswith("unauthenticated:") or not at or not role or not site or "@" in site:
        raise Unauthenticated("a client certificate naming <role>@<site> is required")
    return role, site


def check_hospital_name(name: str) -> None:
    if not name or name == CENTRAL or "@" in name:
        raise ConfigError(f"{name!r} cannot name a hospital ('{CENTRAL}' is the federation operator's site)")
    if not is_dns_label(name):
        raise ConfigError(
            f"{name!r} cannot name a hospital: its certificates spell it into a DNS name "
            "(lowercase letters, digits and inner hyphens, at most 63)"
        )


def _rule(rules: Mapping[str, frozenset[str]], method: str) -> frozenset[str]:
    if method in rules:
        return rules[method]
    return rules.get(method.rpartition("/")[0] + "/", frozenset())


def _policy(rules: Mapping[str, frozenset[str]], hospital: str | None) -> Authorize:
    """`hospital` is the server's own hospital, or None at the central site."""

    def authorize(identity: str, method: str) -> None:
        role, site = split_identity(identity)
        if method.startswith(OPEN_SERVICES):
            return
        if site == CENTRAL:
            as_rule = f"{role}@central"
        elif hospital is None or site == hospital:
            as_rule = f"{role}@h"
        else:
            as_rule = ""  # another hospital's certificate: nothing here
        if as_rule not in _rule(rules, method):
            where = f"hospital {hospital}" if hospital else "the aggregator"
            raise PermissionDenied(f"{identity} may not call {method.rsplit('/', 1)[-1]} at {where}")

    return authorize


def hospital_policy(hospital: str) -> Authorize:
    check_hospital_name(hospital)
    return _policy(HOSPITAL_RULES, hospital)


def central_policy() -> Authorize:
    return _policy(CENTRAL_RULES, None)
