"""The limits document: what is accepted, what is refused (with the path of each
offending field), and how a concrete key's limits are resolved."""

from __future__ import annotations

import pytest

from engine.core.limits import LimitsError, load_limits, load_limits_yaml, resolve

ISSUE_EXAMPLE = """\
limits: v1
rules:
  - key: tool:llm.classify
    concurrency: 8
    rate: 50/s
    breaker: {failure_rate: 0.5, min_calls: 20, window: 60s, slow_call: 10s, open_for: 30s,
              half_open_calls: 3}
  - key: tenant:*
    concurrency: 20
    budget: {amount: 100.00, per: 1d, timezone: Europe/Berlin, warn_at: 0.8,
             on_exhausted: wait}
  - key: "tenant:acme"
    weight: 3
"""


def issues(data: object) -> dict[str, str]:
    with pytest.raises(LimitsError) as caught:
        load_limits(data)
    return dict(caught.value.issues)


def test_the_example_of_the_issue_loads_with_its_units_read() -> None:
    doc = load_limits_yaml(ISSUE_EXAMPLE)
    tool = resolve(doc, "tool:llm.classify")
    assert tool.concurrency == 8
    assert tool.rate is not None and (tool.rate.count, tool.rate.period_ms) == (50, 1000)
    assert tool.breaker is not None and tool.breaker.slow_call == 10_000
    assert tool.breaker.open_for == 30_000


def test_a_key_takes_its_kinds_wildcard_and_its_own_rule_on_top() -> None:
    doc = load_limits_yaml(ISSUE_EXAMPLE)
    acme, other = resolve(doc, "tenant:acme"), resolve(doc, "tenant:globex")
    assert (acme.concurrency, acme.weight) == (20, 3.0)
    assert (other.concurrency, other.weight) == (20, 1.0)
    assert acme.budget is not None and acme.budget.per == "day"
    assert acme.budget.timezone == "Europe/Berlin"


def test_a_key_no_rule_names_and_no_document_are_unlimited() -> None:
    doc = load_limits_yaml(ISSUE_EXAMPLE)
    assert not resolve(doc, "tool:crm.refund").binding
    assert not resolve(None, "tenant:acme").binding


def test_every_offending_field_is_named_by_its_path_in_one_refusal() -> None:
    found = issues(
        {
            "limits": "v2",
            "rules": [
                {
                    "key": "tenant:*",
                    "budget": {"amount": -1, "per": "fortnight", "timezone": "Mars/Olympus"},
                },
                {"key": "no colon"},
                {"key": "tool:x", "rate": "fast", "colour": "red"},
            ],
        }
    )
    assert found["limits"] == "this engine reads limits: v1"
    assert "greater than 0" in found["rules[0](tenant:*).budget.amount"]
    assert "fortnight" in found["rules[0](tenant:*).budget.per"]
    assert "Mars/Olympus" in found["rules[0](tenant:*).budget.timezone"]
    assert "write kind:name" in found["rules[1](no colon).key"]
    assert "50/s" in found["rules[2](tool:x).rate"]
    assert found["rules[2](tool:x).colour"].startswith("unknown field")


@pytest.mark.parametrize(
    ("rule", "path", "words"),
    [
        ({"key": "tool:a"}, "rules[0](tool:a)", "sets no limit"),
        ({"key": "tool:a", "burst": 5}, "rules[0](tool:a)", "burst needs a rate"),
        ({"key": "tool:a", "concurrency": 0}, "rules[0](tool:a).concurrency", "greater than"),
        (
            {"key": "tool:a", "breaker": {"failure_rate": 1.5}},
            "rules[0](tool:a).breaker.failure_rate",
            "less than",
        ),
        (
            {
                "key": "tool:a",
                "breaker": {"failure_rate": 0.5, "open_for": "1m", "max_open_for": "10s"},
            },
            "rules[0](tool:a).breaker",
            "max_open_for",
        ),
        (
            {"key": "tool:a", "budget": {"amount": 5, "per": "day", "on_exhausted": "shrug"}},
            "rules[0](tool:a).budget.on_exhausted",
            "wait",
        ),
        ({"key": "tool:a", "aging": "soon"}, "rules[0](tool:a).aging", "bad duration"),
    ],
)
def test_a_bad_rule_is_refused_at_its_path(rule: dict[str, object], path: str, words: str) -> None:
    found = issues({"limits": "v1", "rules": [rule]})
    assert words in found[path], found


def test_two_rules_for_one_key_are_refused() -> None:
    found = issues(
        {
            "limits": "v1",
            "rules": [{"key": "tool:a", "concurrency": 1}, {"key": "tool:a", "rate": "1/s"}],
        }
    )
    assert "two rules" in found["$"]


def test_rates_are_read_per_any_duration() -> None:
    doc = load_limits(
        {
            "limits": "v1",
            "rules": [{"key": "tool:a", "rate": "5/10s"}, {"key": "tool:b", "rate": "100/m"}],
        }
    )
    a, b = resolve(doc, "tool:a").rate, resolve(doc, "tool:b").rate
    assert a is not None and (a.count, a.period_ms) == (5, 10_000)
    assert b is not None and b.interval_ms == 600


def test_not_yaml_and_not_a_mapping_are_refused_plainly() -> None:
    with pytest.raises(LimitsError, match="not valid YAML"):
        load_limits_yaml("limits: [v1")
    with pytest.raises(LimitsError, match="a limits document is a mapping"):
        load_limits_yaml("- just a list")
