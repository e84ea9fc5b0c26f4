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


@pytest.mark.parametrize(
    ("step", "path"),
    [
        ({"id": "a", "task": "q", "next": "nowhere"}, "steps[0](a).next"),
        (
            {"id": "a", "task": "q", "on_business_error": {"X": {"goto": "nowhere"}}},
            "steps[0](a).on_business_error.X.goto",
        ),
        (
            {"id": "a", "task": "q", "on_exhausted": {"goto": "nowhere"}},
            "steps[0](a).on_exhausted.goto",
        ),
        (
            {"id": "a", "choice": [{"when": "input.x", "goto": "nowhere"}]},
            "steps[0](a).choice[0].goto",
        ),
        (
            {"id": "a", "choice": [{"when": "input.x", "goto": "b"}], "default": "nowhere"},
            "steps[0](a).default",
        ),
        (
            {
                "id": "a",
                "approval": {
                    "approvers": ["g"],
                    "expires_after": "1h",
                    "on_expire": {"goto": "nowhere"},
                },
            },
            "steps[0](a).approval.on_expire.goto",
        ),
        (
            {"id": "a", "approval": {"approvers": ["g"], "on_reject": {"goto": "nowhere"}}},
            "steps[0](a).approval.on_reject.goto",
        ),
        (
            {
                "id": "a",
                "wait_event": {"name": "s", "timeout": "1h", "on_timeout": {"goto": "nowhere"}},
            },
            "steps[0](a).wait_event.on_timeout.goto",
        ),
    ],
)
def test_unknown_step_reference(step: dict[str, Any], path: str) -> None:
    found = issues(wf(step, {"id": "b", "task": "q"}))
    assert [p for p, _ in found] == [path]
    assert "unknown step 'nowhere'" in found[0][1]


def test_cycle_without_exit() -> None:
    found = issues(wf({"id": "a", "task": "q", "next": "b"}, {"id": "b", "task": "q", "next": "a"}))
    assert [p for p, _ in found] == ["steps[0](a)", "steps[1](b)"]
    assert all("cycle without exit" in message for _, message in found)


def test_loop_with_an_exit_is_accepted() -> None:
    load_spec(
        wf(
            {"id": "draft", "task": "llm.draft"},
            {
                "id": "check",
                "choice": [{"when": "steps.draft.result.ok", "goto": "send"}],
                "default": "draft",
            },
            {"id": "send", "task": "mail.send"},
        )
    )


def test_cycle_made_only_of_choices() -> None:
    found = issues(
        wf(
            {"id": "a", "choice": [{"when": "input.x", "goto": "b"}]},
            {"id": "b", "choice": [{"when": "input.y", "goto": "a"}], "default": "c"},
            {"id": "c", "task": "q"},
        )
    )
    assert [p for p, _ in found] == ["steps[0](a)", "steps[1](b)"]
    assert all("cycle made only of choice steps" in message for _, message in found)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (
            wf({"id": "a", "task": "q", "review_if": "result.[[", "review": {"approvers": ["g"]}}),
            "steps[0](a).review_if",
        ),
        (
            wf(
                {"id": "a", "choice": [{"when": "input.x ==", "goto": "b"}]},
                {"id": "b", "task": "q"},
            ),
            "steps[0](a).choice[0].when",
        ),
        (
            wf({"id": "a", "task": "q", "input": {"order": {"id": "input.[id"}}}),
            "steps[0](a).input.order.id",
        ),
        (
            wf({"id": "a", "wait_event": {"name": "s", "key": "input.(("}}),
            "steps[0](a).wait_event.key",
        ),
        (wf({"id": "a", "task": "q"}, output="steps.a.result.[["), "output"),
    ],
)
def test_bad_expression(data: dict[str, Any], path: str) -> None:
    found = issues(data)
    assert [p for p, _ in found] == [path]
    assert "bad expression" in found[0][1]


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (wf({"id": "a", "task": "q", "timeout": "5 parsecs"}), "steps[0](a).timeout"),
        (wf({"id": "a", "task": "q", "retry": {"initial": "soon"}}), "steps[0](a).retry.initial"),
        (wf({"id": "a", "sleep": "-3s"}), "steps[0](a).sleep"),
        (
            wf({"id": "a", "approval": {"approvers": ["g"], "remind_every": "1 week"}}),
            "steps[0](a).approval.remind_every",
        ),
        (wf({"id": "a", "task": "q"}, sla=True), "sla"),
    ],
)
def test_bad_duration(data: dict[str, Any], path: str) -> None:
    found = issues(data)
    assert [p for p, _ in found] == [path]
    assert "bad duration" in found[0][1]


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (wf({"id": "a", "task": "q", "retyr": {}}), "steps[0](a).retyr"),
        (
            wf({"id": "a", "task": "q", "retry": {"max_attempt": 3}}),
            "steps[0](a).retry.max_attempt",
        ),
        (wf({"id": "a", "task": "q"}, slaa="1h"), "slaa"),
        (
            wf({"id": "a", "approval": {"approvers": ["g"], "quorom": 2}}),
            "steps[0](a).approval.quorom",
        ),
    ],
)
def test_unknown_field(data: dict[str, Any], path: str) -> None:
    found = issues(data)
    assert [p for p, _ in found] == [path]
    assert "unknown field" in found[0][1]


def test_critical_without_approval() -> None:
    found = issues(
        wf({"id": "a", "task": "q"}, {"id": "wire", "task": "bank.wire", "critical": True})
    )
    assert found == [
        ("steps[1](wire).approval", "critical steps need an approval: {approvers: [...]}")
    ]


def test_duplicate_step_id() -> None:
    found = issues(wf({"id": "a", "task": "q"}, {"id": "b", "task": "q"}, {"id": "a", "task": "q"}))
    assert found == [("steps[2](a).id", "duplicate step id (also steps[0])")]


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        ({"input": {"order_id": "strnig"}}, "input.order_id"),
        ({"input": {"n": "int"}}, "input.n"),
    ],
)
def test_bad_input_type(schema: dict[str, Any], path: str) -> None:
    found = issues(wf({"id": "a", "task": "q"}, **schema))
    assert [p for p, _ in found] == [path]
    assert "unknown type" in found[0][1]


def test_bad_result_type() -> None:
    assert paths(wf({"id": "a", "task": "q", "result": {"score": "float"}})) == [
        "steps[0](a).result.score"
    ]


def test_every_problem_is_listed_at_once() -> None:
    found = paths(
        wf(
            {"id": "a", "task": "q", "next": "ghost"},
            {"id": "a", "task": "q", "critical": True},
            input={"x": "nope"},
        )
    )
    assert set(found) == {"steps[0](a).next", "steps[1](a).id", "steps[1](a).approval", "input.x"}


def test_other_refusals_name_their_field() -> None:
    assert paths(wf({"id": "a", "task": "q", "sleep": "1s"})) == ["steps[0](a)"]
    assert paths(wf({"id": "a"})) == ["steps[0](a)"]
    assert paths(wf({"id": "a", "task": "bad queue!"})) == ["steps[0](a).task"]
    assert paths(wf({"id": "a", "task": "q", "review_if": "result.x"})) == ["steps[0](a).review"]
    assert paths(wf({"id": "a", "approval": {"approvers": ["g"], "on_expire": {"goto": "a"}}})) == [
        "steps[0](a).approval.expires_after"
    ]
    assert paths({"workflow": "w", "version": 1, "steps": []}) == ["steps"]
    assert paths({"workflow": "w", "steps": [{"id": "a", "task": "q"}]}) == ["version"]


def test_wait_event_timeout_handler_must_be_goto_or_fail() -> None:
    found = issues(
        wf(
            {
                "id": "a",
                "wait_event": {"name": "s", "timeout": "1h", "on_timeout": {"escalate": "ops"}},
            }
        )
    )
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


# --------------------------------------------------------------------------- all at once


def test_type_errors_do_not_hide_the_checks_across_fields() -> None:
    found = issues(
        wf(
            {"id": "lookup", "task": "crm.get_order", "retry": {"initial": "1x"}},
            {
                "id": "pay",
                "task": "payments.commit",
                "on_business_error": {"AMOUNT_OVER_LIMIT": {"goto": "nowhere"}},
            },
        )
    )
    assert [p for p, _ in found] == [
        "steps[0](lookup).retry.initial",
        "steps[1](pay).on_business_error.AMOUNT_OVER_LIMIT.goto",
    ]
    assert "bad duration '1x'" in found[0][1]
    assert "unknown step 'nowhere'" in found[1][1]


def test_a_bad_field_and_a_bad_reference_in_one_step_are_both_reported() -> None:
    found = paths(
        wf(
            {
                "id": "a",
                "task": "q",
                "timeout": "5 parsecs",
                "next": "ghost",
                "input": {"x": "inputs.x"},
            }
        )
    )
    assert found == ["steps[0](a).timeout", "steps[0](a).next", "steps[0](a).input.x"]


def test_checks_around_a_field_with_a_bad_type_are_not_guessed() -> None:
    # the approval is malformed: "critical steps need an approval" would be wrong
    found = paths(
        wf(
            {
                "id": "a",
                "task": "q",
                "critical": True,
                "approval": {"approvers": ["g"], "expires_after": "soon"},
            }
        )
    )
    assert found == ["steps[0](a).approval.expires_after"]


def test_a_step_that_cannot_stand_still_resolves_as_a_target() -> None:
    found = paths(
        wf(
            {"id": "a", "task": "q", "next": "b", "retry": {"initial": "x"}},
            {"id": "b"},
            {"id": "c", "task": "q", "next": "nowhere"},
        )
    )
    assert found == ["steps[0](a).retry.initial", "steps[1](b)", "steps[2](c).next"]


def test_bad_top_level_fields_and_step_problems_together() -> None:
    found = paths(
        {
            "workflow": "w",
            "version": "one",
            "sla": "soon",
            "steps": [{"id": "a", "task": "q", "next": "ghost"}],
        }
    )
    assert found == ["version", "sla", "steps[0](a).next"]
    missing = paths({"steps": [{"id": "a", "task": "q", "next": "ghost"}]})
    assert missing == ["workflow", "version", "steps[0](a).next"]


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("step", "path", "message"),
    [
        (
            {"id": "a", "choice": [{"when": "inputs.amount > `100`", "goto": "b"}]},
            "steps[0](a).choice[0].when",
            "unknown root 'inputs' in 'inputs.amount > `100`' (did you mean 'input'?): "
            "expressions start from input, steps, signals, run",
        ),
        (
            {"id": "a", "task": "q", "input": {"x": "steps.nope.result"}},
            "steps[0](a).input.x",
            "unknown step 'nope' in 'steps.nope.result'; known steps: a, b",
        ),
        (
            {"id": "a", "task": "q", "input": {"x": "steps.b.output"}},
            "steps[0](a).input.x",
            "steps.b has only result, not 'output', in 'steps.b.output': write steps.b.result",
        ),
        (
            {"id": "a", "task": "q", "input": {"who": "run.requester"}},
            "steps[0](a).input.who",
            "run has no field 'requester' in 'run.requester' (did you mean 'requested_by'?); "
            "it has id, tenant, requested_by, workflow, version",
        ),
        (
            {"id": "a", "task": "q", "input": {"template": "refund_issued"}},
            "steps[0](a).input.template",
            "unknown root 'refund_issued' in 'refund_issued'; a literal string is quoted: "
            "\"'refund_issued'\": expressions start from input, steps, signals, run",
        ),
        (
            {"id": "a", "wait_event": {"name": "s", "key": "step.b.result.id"}},
            "steps[0](a).wait_event.key",
            "unknown root 'step' in 'step.b.result.id' (did you mean 'steps'?): expressions start "
            "from input, steps, signals, run",
        ),
        (
            {
                "id": "a",
                "task": "q",
                "review_if": "confidance < `0.8`",
                "review": {"approvers": ["g"]},
            },
            "steps[0](a).review_if",
            "unknown root 'confidance' in 'confidance < `0.8`' (did you mean 'confidence'?): "
            "expressions start from input, steps, signals, run, result, confidence",
        ),
    ],
)
def test_unknown_roots_and_steps_in_expressions_are_refused(
    step: dict[str, Any], path: str, message: str
) -> None:
    assert issues(wf(step, {"id": "b", "task": "q"})) == [(path, message)]


def test_the_output_and_nested_expressions_are_checked_too() -> None:
    found = issues(
        wf(
            {
                "id": "a",
                "task": "q",
                "input": {"order": {"ids": ["input.id", "steps.gone.result"]}},
            },
            output="length(steps.a.result.items[?price > limit]) || inptu",
        )
    )
    assert found == [
        (
            "output",
            "unknown root 'inptu' in 'length(steps.a.result.items[?price > limit]) || "
            "inptu' (did you mean 'input'?): expressions start from input, steps, "
            "signals, run",
        ),
        (
            "steps[0](a).input.order.ids[1]",
            "unknown step 'gone' in 'steps.gone.result'; known steps: a",
        ),
    ]


def test_input_fields_are_checked_against_a_strict_schema() -> None:
    step = {"id": "a", "choice": [{"when": "input.amout > `100`", "goto": "b"}]}
    found = issues(wf(step, {"id": "b", "task": "q"}, input={"amount": "number"}))
    assert found == [
        (
            "steps[0](a).choice[0].when",
            "input has no field 'amout' in 'input.amout > `100`' (did you mean "
            "'amount'?); the spec declares amount (strict_input: false lets runs "
            "pass others)",
        )
    ]
    load_spec(wf(step, {"id": "b", "task": "q"}, input={"amount": "number"}, strict_input=False))
    load_spec(wf(step, {"id": "b", "task": "q"}))  # no schema: nothing to check against


def test_valid_references_are_accepted() -> None:
    load_spec(
        wf(
            {
                "id": "a",
                "task": "q",
                "input": {
                    "n": "input.n",
                    "all": "steps.*.result",
                    "who": "run.requested_by",
                    "lit": "'text'",
                    "first": "input.items[0].name",
                    "me": "@",
                },
            },
            {"id": "b", "choice": [{"when": "steps.a.result.ok && signals.go", "goto": "c"}]},
            {
                "id": "c",
                "task": "q",
                "review_if": "result.score < `0.5` || confidence < `0.8`",
                "review": {"approvers": ["g"]},
            },
            input={"n": "integer", "items": "array"},
            output="steps.c.result",
        )
    )


def test_a_deployed_spec_loads_without_the_newer_reference_checks() -> None:
    from engine.core.spec import load_deployed_spec

    data = wf({"id": "a", "task": "q", "input": {"x": "inputs.x"}})
    assert issues(data)
    assert load_deployed_spec(data).step("a").input == {"x": "inputs.x"}
    with pytest.raises(SpecError):
        load_deployed_spec(wf({"id": "a", "task": "q", "next": "ghost"}))


def test_a_yaml_error_names_the_workflow() -> None:
    with pytest.raises(SpecError) as broken:
        load_spec_yaml("workflow: refund-agent\nversion: 1\ninput: {a: string, b: string?}\n")
    assert broken.value.workflow == "refund-agent"
    assert str(broken.value).startswith("workflow spec refund-agent is invalid:\n  $: not valid")
