"""Site policies: every bad field named; every rule a study breaks named by the rule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.site_policy import DEFAULT_POLICY, SitePolicy, parse_site_policy, policy_problems
from fibemrss.domain.tasks import HEART_DISEASE_V1, HEART_DISEASE_V1_DP, TASKS


def test_a_policy_document_is_read_and_every_bad_field_is_named() -> None:
    p = parse_site_policy(b"min_eligible: 80\nmodel_factories: ['lab.models:small']\nmax_epsilon: 2\n")
    assert (p.min_eligible, p.model_factories, p.max_epsilon) == (80, ("lab.models:small",), 2.0)
    with pytest.raises(InvalidArgument) as bad:
        parse_site_policy(
            b"min_eligible: 0\nmodel_factories: [nocolon]\nmax_epsilon: -1\nrequire_dp: maybe\nwho: me\n"
        )
    assert sorted(v.field for v in bad.value.violations) == [
        "max_epsilon",
        "min_eligible",
        "model_factories[0]",
        "require_dp",
        "who",
    ]


def test_every_shipped_study_meets_the_default_policy_with_enough_patients() -> None:
    for task in TASKS.values():
        assert policy_problems(DEFAULT_POLICY, task, eligible=50) == [], task.name


def test_each_rule_a_study_breaks_is_named() -> None:
    factory = replace(HEART_DISEASE_V1, model="evil.models:build")
    assert [p.field for p in policy_problems(DEFAULT_POLICY, factory, 500)] == ["model_factories"]
    allowed = SitePolicy(model_factories=("evil.models:build",))
    assert policy_problems(allowed, factory, 500) == []
    small = policy_problems(DEFAULT_POLICY, HEART_DISEASE_V1, 49)
    assert [p.field for p in small] == ["min_eligible"] and "49" in small[0].description
    assert policy_problems(DEFAULT_POLICY, HEART_DISEASE_V1, None) == []  # no count: rule not judged
    assert [p.field for p in policy_problems(SitePolicy(require_dp=True), HEART_DISEASE_V1, 500)] == [
        "require_dp"
    ]
    stingy = SitePolicy(max_epsilon=0.5)
    assert [p.field for p in policy_problems(stingy, HEART_DISEASE_V1_DP, 500)] == ["max_epsilon"]
    assert policy_problems(SitePolicy(max_epsilon=1.01), HEART_DISEASE_V1_DP, 500) == []
    loinc_only = SitePolicy(code_systems=("http://loinc.org",))
    problems = policy_problems(loinc_only, HEART_DISEASE_V1, 500)
    assert [p.field for p in problems] == ["code_systems"] and "urn:fibemrss:uci-heart" in problems[
        0
    ].description
