"""Study documents: a federated task as a versioned YAML or JSON document (pure).

A document names its features by code system, code and unit, its label, its cohort, model,
hyper-parameters and federation settings; `parse_study` validates it and names every bad field;
`study_hash` is the SHA-256 of its canonical form (the parsed study as sorted, compact JSON), so
two documents that differ only in layout, comments or key order have one identity, and any change
of meaning gives another. The schema for editors and other tools is `studies/study.schema.json`;
the parser here is the authority and says which field is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from importlib import resources
from typing import Any

import yaml

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.task_spec import (
    CONDITION_CATEGORIES,
    CohortSpec,
    DpSpec,
    FeatureSpec,
    HyperParameters,
    LabelSpec,
    PersonalizationSpec,
    TaskSpec,
)
from fibemrss.domain.text import text_problem

FORMAT = 1
NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
SOURCES = ("age", "sex", "observation", "coded", "condition")
MODELS = ("logistic_regression", "mlp")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
TOP_LEVEL = {
    "format", "study", "version", "description", "features", "label", "cohort", "model",
    "hyper_parameters", "federation", "evaluation", "privacy", "personalization",
}  # fmt: skip

# The HE codec's HeParams.max_weight (fibemrss.he sits beside the domain, not under it:
# tests/unit/test_study_documents.py checks the two agree).
CODEC_MAX_WEIGHT = 1024


class _Reader:
    """Reads typed fields out of a parsed document, collecting every problem with its path."""

    def __init__(self) -> None:
        self.problems: list[FieldProblem] = []

    def bad(self, path: str, why: str) -> None:
        self.problems.append(FieldProblem(path, why))

    def obj(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.bad(path, "must be a mapping")
            return {}
        for key in value:
            if key not in allowed:
                self.bad(f"{path}.{key}" if path else str(key), "is not a field of a study document")
        return value

    def text(self, d: dict[str, Any], key: str, path: str, required: bool = True, default: str = "") -> str:
        value = d.get(key)
        if value is None:
            if required:
                self.bad(path, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, str | int):
            self.bad(path, "must be text")
            return default
        return str(value)

    def number(
        self, d: dict[str, Any], key: str, path: str, default: float | None = None, low: float | None = None,
        high: float | None = None, positive: bool = False,
    ) -> float | None:  # fmt: skip
        value = d.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            self.bad(path, "must be a number")
            return default
        if positive and value <= 0:
            self.bad(path, "must be positive")
        if low is not None and value < low:
            self.bad(path, f"must be at least {low:g}")
        if high is not None and value > high:
            self.bad(path, f"must be at most {high:g}")
        return float(value)

    def integer(
        self, d: dict[str, Any], key: str, path: str, default: int | None = None, low: int = 0
    ) -> int | None:
        value = d.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(path, "must be a whole number")
            return default
        if value < low:
            self.bad(path, f"must be at least {low}")
        return value


def _feature(r: _Reader, raw: Any, path: str) -> FeatureSpec | None:
    d = r.obj(raw, path, {"name", "source", "system", "code", "unit", "categories", "scale", "within_days"})
    name = r.text(d, "name", f"{path}.name")
    source = r.text(d, "source", f"{path}.source")
    if source and source not in SOURCES:
        r.bad(f"{path}.source", f"must be one of {', '.join(SOURCES)}")
        return None
    system = r.text(d, "system", f"{path}.system", required=source in ("observation", "coded", "condition"))
    code = r.text(d, "code", f"{path}.code", required=source in ("observation", "coded", "condition"))
    unit = r.text(d, "unit", f"{path}.unit", required=source in ("observation", "age"))
    scale = r.number(d, "scale", f"{path}.scale", default=1.0, positive=True) or 1.0
    within = r.integer(d, "within_days", f"{path}.within_days", low=1)
    if within is not None and source != "condition":
        r.bad(f"{path}.within_days", "applies to condition features only")
    categories: tuple[str, ...] = ()
    raw_categories = d.get("categories")
    if source in ("sex", "coded"):
        if not isinstance(raw_categories, list) or not raw_categories:
            r.bad(f"{path}.categories", "list the category codes (one-hot order)")
        elif not all(isinstance(c, str) and c for c in raw_categories) or len(set(raw_categories)) != len(
            raw_categories
        ):
            r.bad(f"{path}.categories", "must be distinct, non-empty codes")
        else:
            categories = tuple(raw_categories)
    elif raw_categories is not None:
        r.bad(f"{path}.categories", f"applies to sex and coded features only, not {source or 'this source'}")
    if source == "condition":
        categories = CONDITION_CATEGORIES
    if source == "age" and unit and unit != "a":
        r.bad(f"{path}.unit", "age is in years: UCUM unit 'a'")
    internal = "numeric" if source == "observation" else source
    return FeatureSpec(name, internal, system, code, unit, categories, scale, within)  # type: ignore[arg-type]  # checked above


def _label(r: _Reader, raw: Any) -> LabelSpec:
    if raw is None:
        r.bad("label", "is required: an observation above a threshold, or a condition present")
        return LabelSpec("", "")
    d = r.obj(raw, "label", {"observation", "condition"})
    kinds = [k for k in ("observation", "condition") if k in d]
    if len(kinds) != 1:
        r.bad("label", "set exactly one of observation, condition")
        return LabelSpec("", "")
    kind = kinds[0]
    path = f"label.{kind}"
    allowed = {"system", "code", "above"} if kind == "observation" else {"system", "code", "within_days"}
    body = r.obj(d[kind], path, allowed)
    system = r.text(body, "system", f"{path}.system")
    code = r.text(body, "code", f"{path}.code")
    if kind == "observation":
        above = r.number(body, "above", f"{path}.above")
        if above is None:
            r.bad(f"{path}.above", "is required: the label is 1 when the value is above it")
        return LabelSpec(system, code, positive_above=above or 0.0)
    return LabelSpec(
        system,
        code,
        kind="condition",
        within_days=r.integer(body, "within_days", f"{path}.within_days", low=1),
    )


def _cohort(r: _Reader, raw: Any) -> CohortSpec:
    if raw is None:
        return CohortSpec()
    d = r.obj(raw, "cohort", {"min_age", "max_age", "required_observations"})
    low = r.number(d, "min_age", "cohort.min_age", low=0, high=130)
    high = r.number(d, "max_age", "cohort.max_age", low=0, high=130)
    if low is not None and high is not None and low > high:
        r.bad("cohort.max_age", "must not be below min_age")
    required: list[tuple[str, str]] = []
    items = d.get("required_observations") or []
    if not isinstance(items, list):
        r.bad("cohort.required_observations", "must be a list of {system, code}")
        items = []
    for i, item in enumerate(items):
        path = f"cohort.required_observations[{i}]"
        body = r.obj(item, path, {"system", "code"})
        required.append((r.text(body, "system", f"{path}.system"), r.text(body, "code", f"{path}.code")))
    return CohortSpec(low, high, tuple(required))


def _hyper(r: _Reader, raw: Any) -> HyperParameters:
    d = r.obj(
        raw or {},
        "hyper_parameters",
        {"learning_rate", "local_epochs", "batch_size", "strategy", "server_options", "proximal_mu"},
    )
    strategy = r.text(d, "strategy", "hyper_parameters.strategy", required=False, default="fedavg")
    if strategy not in STRATEGIES:
        r.bad("hyper_parameters.strategy", f"must be one of {', '.join(STRATEGIES)}")
    options = d.get("server_options") or {}
    parsed: list[tuple[str, float]] = []
    if not isinstance(options, dict):
        r.bad("hyper_parameters.server_options", "must be a mapping of option to number")
    else:
        for key, value in sorted(options.items()):
            if isinstance(value, bool) or not isinstance(value, int | float):
                r.bad(f"hyper_parameters.server_options.{key}", "must be a number")
            else:
                parsed.append((str(key), float(value)))
    return HyperParameters(
        learning_rate=r.number(d, "learning_rate", "hyper_parameters.learning_rate", 0.05, positive=True)
        or 0.05,
        local_epochs=r.integer(d, "local_epochs", "hyper_parameters.local_epochs", 1, low=1) or 1,
        batch_size=r.integer(d, "batch_size", "hyper_parameters.batch_size", 4, low=1) or 4,
        strategy=strategy,
        server_options=tuple(parsed),
        proximal_mu=r.number(d, "proximal_mu", "hyper_parameters.proximal_mu", 0.0, low=0.0) or 0.0,
    )


def _personalization(r: _Reader, raw: Any) -> PersonalizationSpec | None:
    if raw is None:
        return None
    path = "personalization"
    d = r.obj(raw, path, {"local_epochs", "learning_rate", "validation_fraction"})
    return PersonalizationSpec(
        local_epochs=r.integer(d, "local_epochs", f"{path}.local_epochs", 5, low=1) or 5,
        learning_rate=r.number(d, "learning_rate", f"{path}.learning_rate", 0.01, positive=True) or 0.01,
        validation_fraction=r.number(
            d, "validation_fraction", f"{path}.validation_fraction", 0.25, positive=True, high=0.9
        )
        or 0.25,
    )


def _privacy(r: _Reader, raw: Any) -> dict[str, Any]:
    d = r.obj(
        raw or {},
        "privacy",
        {
            "pairwise_masking",
            "min_contributors",
            "weighting",
            "weight_noise_scale",
            "weight_quantum",
            "dp",
            "histogram_bins",
            "histogram_min_count",
            "max_weight",
            "max_update_norm",
        },
    )
    out: dict[str, Any] = {}
    out["max_weight"] = r.integer(d, "max_weight", "privacy.max_weight", None, low=1)
    if out["max_weight"] is not None and out["max_weight"] > CODEC_MAX_WEIGHT:
        r.bad(
            "privacy.max_weight",
            f"must be at most {CODEC_MAX_WEIGHT} (the HE codec's bound on one hospital's weight)",
        )
    out["max_update_norm"] = r.number(d, "max_update_norm", "privacy.max_update_norm", None, positive=True)
    masking = d.get("pairwise_masking", True)
    if not isinstance(masking, bool):
        r.bad("privacy.pairwise_masking", "must be true or false")
    out["pairwise_masking"] = bool(masking)
    out["min_contributors"] = r.integer(d, "min_contributors", "privacy.min_contributors", 3, low=1) or 3
    weighting = r.text(d, "weighting", "privacy.weighting", required=False, default="noised")
    if weighting not in ("noised", "examples"):
        r.bad("privacy.weighting", "must be noised or examples")
    out["weighting"] = weighting
    out["weight_noise_scale"] = r.number(d, "weight_noise_scale", "privacy.weight_noise_scale", 8.0, low=0.0)
    out["weight_quantum"] = r.integer(d, "weight_quantum", "privacy.weight_quantum", 8, low=1) or 8
    bins = r.integer(d, "histogram_bins", "privacy.histogram_bins", 10, low=1) or 10
    if bins > 100:
        r.bad("privacy.histogram_bins", "must be at most 100")
    out["histogram_bins"] = bins
    out["histogram_min_count"] = (
        r.integer(d, "histogram_min_count", "privacy.histogram_min_count", 10, low=1) or 10
    )
    out["dp"] = None
    if d.get("dp") is not None:
        dp = r.obj(
            d["dp"],
            "privacy.dp",
            {"target_epsilon", "target_delta", "max_grad_norm", "noise_multiplier", "sample_rate"},
        )
        out["dp"] = DpSpec(
            target_epsilon=r.number(dp, "target_epsilon", "privacy.dp.target_epsilon", 1.0, positive=True),
            target_delta=r.number(
                dp, "target_delta", "privacy.dp.target_delta", 1e-5, positive=True, high=0.1
            )
            or 1e-5,
            max_grad_norm=r.number(dp, "max_grad_norm", "privacy.dp.max_grad_norm", 1.0, positive=True)
            or 1.0,
            noise_multiplier=r.number(
                dp, "noise_multiplier", "privacy.dp.noise_multiplier", None, positive=True
            ),
            sample_rate=r.number(dp, "sample_rate", "privacy.dp.sample_rate", 0.05, positive=True, high=1.0)
            or 0.05,
        )
    return out


def parse_study(content: str | bytes, source: str = "study") -> TaskSpec:
    """A study document (YAML or JSON) as a TaskSpec; InvalidArgument naming every bad field."""
    try:
        raw = yaml.safe_load(content)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InvalidArgument(
            "unreadable study document", [FieldProblem(source, f"is not YAML or JSON{where}")]
        ) from None
    r = _Reader()
    d = r.obj(raw, "", TOP_LEVEL)
    if not d:
        raise InvalidArgument("invalid study document", r.problems or [FieldProblem(source, "is empty")])
    fmt = r.integer(d, "format", "format", FORMAT)
    if fmt != FORMAT:
        r.bad("format", f"this build reads study format {FORMAT}")
    name = r.text(d, "study", "study")
    if name and not NAME.fullmatch(name):
        r.bad("study", "lower-case letters, digits, '.' and '-', at most 63 characters")
    version = r.integer(d, "version", "version", low=1)
    if version is None:
        r.bad("version", "is required (a whole number, raised with every change)")
    features: list[FeatureSpec] = []
    raw_features = d.get("features")
    if not isinstance(raw_features, list) or not raw_features:
        r.bad("features", "list at least one feature")
        raw_features = []
    for i, raw_feature in enumerate(raw_features):
        feature = _feature(r, raw_feature, f"features[{i}]")
        if feature is not None:
            features.append(feature)
    seen: set[str] = set()
    for i, f in enumerate(features):
        if f.name in seen:
            r.bad(f"features[{i}].name", f"{f.name!r} is used twice")
        seen.add(f.name)
    label = _label(r, d.get("label"))
    cohort = _cohort(r, d.get("cohort"))
    model = r.text(d, "model", "model", required=False, default="logistic_regression")
    if model not in MODELS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", model):
        r.bad("model", f"one of {', '.join(MODELS)}, or package.module:factory")
    hyper = _hyper(r, d.get("hyper_parameters"))
    fed = r.obj(
        d.get("federation") or {}, "federation", {"rounds", "quorum", "sites", "validation_tolerance"}
    )
    validation_tolerance = r.number(
        fed, "validation_tolerance", "federation.validation_tolerance", None, low=0.0, high=1.0
    )
    rounds = r.integer(fed, "rounds", "federation.rounds", 15, low=1) or 15
    quorum = r.integer(fed, "quorum", "federation.quorum", 4, low=1) or 4
    sites_raw = fed.get("sites", [])
    sites: tuple[str, ...] = ()
    if not isinstance(sites_raw, list) or not all(
        isinstance(x, str) and x and "@" not in x and x != "central" and not text_problem(x)
        for x in sites_raw
    ):
        r.bad("federation.sites", "must be a list of hospital names (not 'central', no '@')")
    elif len(set(sites_raw)) != len(sites_raw):
        r.bad("federation.sites", "names a site twice")
    else:
        sites = tuple(sites_raw)
    ev = r.obj(d.get("evaluation") or {}, "evaluation", {"threshold", "test_fraction", "split_seed"})
    threshold = r.number(ev, "threshold", "evaluation.threshold", 0.5, low=0.0, high=1.0) or 0.5
    test_fraction = r.number(ev, "test_fraction", "evaluation.test_fraction", 0.2, low=0.0, high=0.9)
    split_seed = r.text(ev, "split_seed", "evaluation.split_seed", required=False, default=f"{name}-split-1")
    privacy = _privacy(r, d.get("privacy"))
    personalization = _personalization(r, d.get("personalization"))
    if r.problems:
        raise InvalidArgument("invalid study document", r.problems)
    return TaskSpec(
        name=name,
        features=tuple(features),
        label=label,
        model=model,
        hyper=hyper,
        rounds=rounds,
        quorum=quorum,
        sites=sites,
        validation_tolerance=validation_tolerance,
        threshold=threshold,
        test_fraction=0.2 if test_fraction is None else test_fraction,
        split_seed=split_seed,
        cohort=cohort,
        description=r.text(d, "description", "description", required=False),
        version=version or 1,
        personalization=personalization,
        **privacy,
    )


def study_to_json(task: TaskSpec) -> dict[str, Any]:
    """The document of a study, every field written out (the canonical form's content)."""
    features = []
    for f in task.features:
        item: dict[str, Any] = {
            "name": f.name,
            "source": "observation" if f.source == "numeric" else f.source,
        }
        if f.system:
            item.update(system=f.system, code=f.code)
        if f.unit:
            item["unit"] = f.unit
        if f.source in ("sex", "coded"):
            item["categories"] = list(f.categories)
        if f.scale != 1.0:
            item["scale"] = f.scale
        if f.within_days is not None:
            item["within_days"] = f.within_days
        features.append(item)
    label: dict[str, Any]
    if task.label.kind == "condition":
        body: dict[str, Any] = {"system": task.label.system, "code": task.label.code}
        if task.label.within_days is not None:
            body["within_days"] = task.label.within_days
        label = {"condition": body}
    else:
        label = {
            "observation": {
                "system": task.label.system,
                "code": task.label.code,
                "above": task.label.positive_above,
            }
        }
    doc: dict[str, Any] = {
        "format": FORMAT,
        "study": task.name,
        "version": task.version,
        "features": features,
        "label": label,
        "model": task.model,
        "hyper_parameters": {
            "learning_rate": task.hyper.learning_rate,
            "local_epochs": task.hyper.local_epochs,
            "batch_size": task.hyper.batch_size,
            "strategy": task.hyper.strategy,
            "server_options": dict(task.hyper.server_options),
            "proximal_mu": task.hyper.proximal_mu,
        },
        "federation": {
            "rounds": task.rounds,
            "quorum": task.quorum,
            # Only when set: studies written before it keep their identity (hash).
            **({"sites": sorted(task.sites)} if task.sites else {}),
            **(
                {"validation_tolerance": task.validation_tolerance}
                if task.validation_tolerance is not None
                else {}
            ),
        },
        "evaluation": {
            "threshold": task.threshold,
            "test_fraction": task.test_fraction,
            "split_seed": task.split_seed,
        },
    }
    doc["privacy"] = {
        "pairwise_masking": task.pairwise_masking,
        "min_contributors": task.min_contributors,
        "weighting": task.weighting,
        "weight_noise_scale": task.weight_noise_scale,
        "weight_quantum": task.weight_quantum,
    }
    # Only when set: studies written before histograms keep their identity (hash).
    if task.histogram_bins != 10:
        doc["privacy"]["histogram_bins"] = task.histogram_bins
    if task.histogram_min_count != 10:
        doc["privacy"]["histogram_min_count"] = task.histogram_min_count
    if task.max_weight is not None:
        doc["privacy"]["max_weight"] = task.max_weight
    if task.max_update_norm is not None:
        doc["privacy"]["max_update_norm"] = task.max_update_norm
    if task.dp is not None:
        doc["privacy"]["dp"] = {
            k: v
            for k, v in (
                ("target_epsilon", task.dp.target_epsilon),
                ("target_delta", task.dp.target_delta),
                ("max_grad_norm", task.dp.max_grad_norm),
                ("noise_multiplier", task.dp.noise_multiplier),
                ("sample_rate", task.dp.sample_rate),
            )
            if v is not None
        }
    if task.personalization is not None:
        # Only when present, so the identity of a study without it is unchanged.
        doc["personalization"] = {
            "local_epochs": task.personalization.local_epochs,
            "learning_rate": task.personalization.learning_rate,
            "validation_fraction": task.personalization.validation_fraction,
        }
    c = task.cohort
    if c != CohortSpec():
        doc["cohort"] = {
            **({"min_age": c.min_age} if c.min_age is not None else {}),
            **({"max_age": c.max_age} if c.max_age is not None else {}),
            "required_observations": [{"system": s, "code": k} for s, k in c.required],
        }
    if task.description:
        doc["description"] = task.description
    return doc


def canonical_form(task: TaskSpec) -> bytes:
    # The description is prose for people: it does not change what a study reads or trains.
    doc = study_to_json(replace(task, description=""))
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def study_hash(task: TaskSpec) -> str:
    return "sha256:" + hashlib.sha256(canonical_form(task)).hexdigest()


def shipped_documents() -> dict[str, bytes]:
    """The studies shipped with the project (fibemrss/domain/studies/*.yaml), by file name."""
    folder = resources.files("fibemrss.domain") / "studies"
    return {
        p.name: p.read_bytes()
        for p in folder.iterdir()
        if p.name.endswith((".yaml", ".yml", ".json")) and not p.name.endswith(".schema.json")
    }


def parse_study_field(document: bytes, field: str = "document") -> TaskSpec:
    """The study sent in a request's `field`; InvalidArgument naming `<field>.<bad field>`."""
    if not document:
        raise InvalidArgument(f"{field} is required", [FieldProblem(field, "send the study document")])
    try:
        return parse_study(document, field)
    except InvalidArgument as exc:
        raise InvalidArgument(
            "invalid study document",
            [
                FieldProblem(v.field if v.field == field else f"{field}.{v.field}", v.description)
                for v in exc.violations
            ],
        ) from None
