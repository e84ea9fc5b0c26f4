"""Deploy-time spec validation: every refusal names the path of the offending field."""

from __future__ import annotations

from typing import Any

import pytest

from engine.core.errors import SpecError
from engine.core.spec import load_spec, load_spec_yaml, spec_to_data
from tests.harness import wf

REFUND_YAML = """
workflow: refund-agent
version: 3
sla: 4h
input: {order_id: string, customer_message: string}
redact: ["$.input.card_number", "*token*"]
steps:
  - id: lookup
    task: crm.get_order
    timeout: 30s
    retry: {max_attempts: 5, initial: 1s, multiplier: 2, max: 1m, jitter: full}
  - id: classify
    task: llm.classify_refund
    review_if: "result.confidence < `0.8`"
    review: {approvers: [refund-experts], expires_after: 2h, on_expire: fail}
  - id: refund
    prepare_commit:
      prepare: payments.prepare_refund
      commit: payments.commit_refund
    approval: {approvers: [finance], quorum: 2, exclude_requester: true,
               remind_every: 30m, expires_after: 24h, on_expire: {escalate: finance-leads}}
    on_business_error:
      AMOUNT_OVER_LIMIT: {goto: manual_review}
      MISSING_BANK_DETAILS: {wait_event: bank_details, timeout: 48h}
  - id: notify
    task: mail.send
    end: true
  - id: manual_review
    approval: {approvers: [refund-experts]}
"""



def issues(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as refused:
        load_spec(data)
    return refused.value.issues


def paths(data: dict[str, Any]) -> list[str]:
    return [path for path, _ in issues(data)]


def test_the_design_example_loads() -> None:
    spec = load_spec_yaml(REFUND_YAML)
    assert spec.key == ("refund-agent", 3)
    assert spec.sla == 4 * 3_600_000
    assert spec.step("lookup").retry.max == 60_000
    assert spec.step("refund").kind == "prepare_commit"
    approval = spec.step("refund").approval
    assert approval is not None and approval.on_expire.escalate == "finance-leads"
    assert spec.next_step("notify") is None
    assert load_spec(spec_to_data(spec)) == spec


@pytest.mark.parametrize(("step", "path"), [
    ({"id": "a", "task": "q", "next": "nowhere"}, "steps[0](a).next"),
    ({"id": "a", "task": "q", "on_business_error": {"X": {"goto": "nowhere"}}},
     "steps[0](a).on_business_error.X.goto"),
    ({"id": "a", "task": "q", "on_exhausted": {"goto": "nowhere"}},
     "steps[0](a).on_exhausted.goto"),
    ({"id": "a", "choice": [{"when": "input.x", "goto": "nowhere"}]}, "steps[0](a).choice[0].goto"),
    ({"id": "a", "choice": [{"when": "input.x", "goto": "b"}], "default": "nowhere"},
     "steps[0](a).default"),
    ({"id": "a", "approval": {"approvers": ["g"], "expires_after": "1h",
                              "on_expire": {"goto": "nowhere"}}},
     "steps[0](a).approval.on_expire.goto"),
    ({"id": "a", "approval": {"approvers": ["g"], "on_reject": {"goto": "nowhere"}}},
     "steps[0](a).approval.on_reject.goto"),
    ({"id": "a", "wait_event": {"name": "s", "timeout": "1h", "on_timeout": {"goto": "nowhere"}}},
     "steps[0](a).wait_event.on_timeout.goto"),
])
def test_unknown_step_reference(step: dict[str, Any], path: str) -> None:
    found = issues(wf(step, {"id": "b", "task": "q"}))
    assert [p for p, _ in found] == [path]
    assert "unknown step 'nowhere'" in found[0][1]


def test_cycle_without_exit() -> None:
    found = issues(wf({"id": "a", "task": "q", "next": "b"}, {"id": "b", "task": "q", "next": "a"}))
    assert [p for p, _ in found] == ["steps[0](a)", "steps[1](b)"]
    assert all("cycle without exit" in message for _, message in found)


def test_loop_with_an_exit_is_accepted() -> None:
    load_spec(wf(
        {"id": "draft", "task": "llm.draft"},
        {"id": "check", "choice": [{"when": "steps.draft.result.ok", "goto": "send"}],
         "default": "draft"},
        {"id": "send", "task": "mail.send"},
    ))


def test_cycle_made_only_of_choices() -> None:
    found = issues(wf(
        {"id": "a", "choice": [{"when": "input.x", "goto": "b"}]},
        {"id": "b", "choice": [{"when": "input.y", "goto": "a"}], "default": "c"},
        {"id": "c", "task": "q"},
    ))
    assert [p for p, _ in found] == ["steps[0](a)", "steps[1](b)"]
    assert all("cycle made only of choice steps" in message for _, message in found)


@pytest.mark.parametrize(("data", "path"), [
    (wf({"id": "a", "task": "q", "review_if": "result.[[",
         "review": {"approvers": ["g"]}}), "steps[0](a).review_if"),
    (wf({"id": "a", "choice": [{"when": "input.x ==", "goto": "b"}]}, {"id": "b", "task": "q"}),
     "steps[0](a).choice[0].when"),
    (wf({"id": "a", "task": "q", "input": {"order": {"id": "input.[id"}}}),
     "steps[0](a).input.order.id"),
    (wf({"id": "a", "wait_event": {"name": "s", "key": "input.(("}}), "steps[0](a).wait_event.key"),
    (wf({"id": "a", "task": "q"}, output="steps.a.result.[["), "output"),
])
def test_bad_expression(data: dict[str, Any], path: str) -> None:
    found = issues(data)
    assert [p for p, _ in found] == [path]
    assert "bad expression" in found[0][1]


@pytest.mark.parametrize(("data", "path"), [
    (wf({"id": "a", "task": "q", "timeout": "5 parsecs"}), "steps[0](a).timeout"),
    (wf({"id": "a", "task": "q", "retry": {"initial": "soon"}}), "steps[0](a).retry.initial"),
    (wf({"id": "a", "sleep": "-3s"}), "steps[0](a).sleep"),
    (wf({"id": "a", "approval": {"approvers": ["g"], "remind_every": "1 week"}}),
     "steps[0](a).approval.remind_every"),
    (wf({"id": "a", "task": "q"}, sla=True), "sla"),
])
def test_bad_duration(data: dict[str, Any], path: str) -> None:
    found = issues(data)
    assert [p for p, _ in found] == [path]
    assert "bad duration" in found[0][1]


@pytest.mark.parametrize(("data", "path"), [
    (wf({"id": "a", "task": "q", "retyr": {}}), "steps[0](a).retyr"),
    (wf({"id": "a", "task": "q", "retry": {"max_attempt": 3}}), "steps[0](a).retry.max_attempt"),
    (wf({"id": "a", "task": "q"}, slaa="1h"), "slaa"),
    (wf({"id": "a", "approval": {"approvers": ["g"], "quorom": 2}}), "steps[0](a).approval.quorom"),
])
def test_unknown_field(data: dict[str, Any], path: str) -> None:
    found = issues(data)
    assert [p for p, _ in found] == [path]
    assert "unknown field" in found[0][1]


def test_critical_without_approval() -> None:
    found = issues(wf({"id": "a", "task": "q"},
                      {"id": "wire", "task": "bank.wire", "critical": True}))
    assert found == [("steps[1](wire).approval",
                      "critical steps need an approval: {approvers: [...]}")]


def test_duplicate_step_id() -> None:
    found = issues(wf({"id": "a", "task": "q"}, {"id": "b", "task": "q"}, {"id": "a", "task": "q"}))
    assert found == [("steps[2](a).id", "duplicate step id (also steps[0])")]


@pytest.mark.parametrize(("schema", "path"), [
    ({"input": {"order_id": "strnig"}}, "input.order_id"),
    ({"input": {"n": "int"}}, "input.n"),
])
def test_bad_input_type(schema: dict[str, Any], path: str) -> None:
    found = issues(wf({"id": "a", "task": "q"}, **schema))
    assert [p for p, _ in found] == [path]
    assert "unknown type" in found[0][1]


def test_bad_result_type() -> None:
    assert paths(wf({"id": "a", "task": "q", "result": {"score": "float"}})) == [
        "steps[0](a).result.score"]


def test_every_problem_is_listed_at_once() -> None:
    found = paths(wf(
        {"id": "a", "task": "q", "next": "ghost"},
        {"id": "a", "task": "q", "critical": True},
        input={"x": "nope"},
    ))
    assert set(found) == {"steps[0](a).next", "steps[1](a).id", "steps[1](a).approval", "input.x"}


def test_other_refusals_name_their_field() -> None:
    assert paths(wf({"id": "a", "task": "q", "sleep": "1s"})) == ["steps[0](a)"]
    assert paths(wf({"id": "a"})) == ["steps[0](a)"]
    assert paths(wf({"id": "a", "task": "bad queue!"})) == ["steps[0](a).task"]
    assert paths(wf({"id": "a", "task": "q", "review_if": "result.x"})) == ["steps[0](a).review"]
    assert paths(wf({"id": "a", "approval": {"approvers": ["g"],
                                             "on_expire": {"goto": "a"}}})) == [
        "steps[0](a).approval.expires_after"]
    assert paths({"workflow": "w", "version": 1, "steps": []}) == ["steps"]
    assert paths({"workflow": "w", "steps": [{"id": "a", "task": "q"}]}) == ["version"]


def test_wait_event_timeout_handler_must_be_goto_or_fail() -> None:
    found = issues(wf({"id": "a", "wait_event": {"name": "s", "timeout": "1h",
                                                 "on_timeout": {"escalate": "ops"}}}))
    assert [p for p, _ in found] == ["steps[0](a).wait_event.on_timeout"]


def test_yaml_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(SpecError) as refused:
        load_spec_yaml("- just\n- a list\n")
    assert refused.value.issues[0][0] == "$"
    with pytest.raises(SpecError) as broken:
        load_spec_yaml("workflow: [unclosed\n")
    assert broken.value.issues[0][0] == "$"


def test_yaml_errors_carry_paths_too() -> None:
    text = REFUND_YAML.replace("timeout: 30s", "timeout: 30 parsecs")
    with pytest.raises(SpecError) as refused:
        load_spec_yaml(text)
    assert [p for p, _ in refused.value.issues] == ["steps[0](lookup).timeout"]
    assert refused.value.workflow == "refund-agent"
    assert "steps[0](lookup).timeout" in str(refused.value)
