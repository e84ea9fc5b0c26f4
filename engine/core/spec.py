"""Workflow specs: the pydantic model, YAML loading, and the checks made at deploy.

A spec is validated once, at the edge (``load_spec``); the core then trusts it. Every
refusal names the path of the offending field, e.g. ``steps[2](refund).retry.initial``.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from engine.core.durations import parse_duration
from engine.core.errors import ExpressionError, SpecError
from engine.core.expressions import root_paths
from engine.core.kinds import HandlerAction, StepKind

Duration = Annotated[int, BeforeValidator(parse_duration)]
"""Milliseconds; accepts ``30s``-style strings."""

INPUT_TYPES = ("string", "number", "integer", "boolean", "object", "array", "any")
STEP_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
QUEUE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
MAX_STEPS = 500
ROOTS = ("input", "steps", "signals", "run")
"""What expressions start from: the document ``RunState.data()`` builds."""
RESULT_ROOTS = (*ROOTS, "result", "confidence")
"""``review_if`` also sees the task's ``result`` and ``confidence``."""
RUN_FIELDS = ("id", "tenant", "requested_by", "workflow", "version")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Model):
    """Exponential backoff: attempt n waits min(max, initial * multiplier**(n-1)),
    then full jitter draws uniformly below that (deterministically, see ``policies``)."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    initial: Duration = 1000
    multiplier: float = Field(default=2.0, ge=1.0, le=10.0)
    max: Duration = 60_000
    jitter: Literal["full", "none"] = "full"


class Handler(_Model):
    """What to do on a business error, an expiry, a rejection or a timeout.

    Exactly one of ``goto``, ``wait_event``, ``escalate`` or ``fail: true``.
    """

    goto: str | None = None
    wait_event: str | None = None
    timeout: Duration | None = None
    escalate: str | None = None
    expires_after: Duration | None = None
    fail: bool = False

    @model_validator(mode="after")
    def _one_action(self) -> Handler:
        chosen = [k for k in ("goto", "wait_event", "escalate") if getattr(self, k)]
        if self.fail:
            chosen.append("fail")
        if len(chosen) != 1:
            raise ValueError(
                "a handler takes exactly one of goto, wait_event, escalate or fail "
                f"(got {', '.join(chosen) or 'none'})"
            )
        return self

    @property
    def action(self) -> HandlerAction:
        if self.goto:
            return HandlerAction.GOTO
        if self.wait_event:
            return HandlerAction.WAIT_EVENT
        if self.escalate:
            return HandlerAction.ESCALATE
        return HandlerAction.FAIL


def _handler(value: object) -> object:
    """Allow the short form ``on_expire: fail``."""
    return {"fail": True} if value == "fail" else value


HandlerField = Annotated[Handler, BeforeValidator(_handler)]
FAIL = Handler(fail=True)


class ApprovalSpec(_Model):
    """Who must approve, how many distinct approvers (``quorum: 2`` is four-eyes),
    reminders, expiry and what happens then."""

    approvers: list[str] = Field(min_length=1)
    quorum: int = Field(default=1, ge=1, le=10)
    exclude_requester: bool = True
    remind_every: Duration | None = None
    expires_after: Duration | None = None
    on_expire: HandlerField = FAIL
    on_reject: HandlerField = FAIL
    sla: Duration | None = None


class PrepareCommit(_Model):
    prepare: str
    commit: str


class WaitEvent(_Model):
    name: str
    key: str | None = None
    timeout: Duration | None = None
    on_timeout: HandlerField = FAIL


class ChoiceBranch(_Model):
    when: str
    goto: str


class StepSpec(_Model):
    """One step. Its kind is given by which of task, prepare_commit, approval (alone),
    wait_event, choice or sleep is set."""

    id: str
    task: str | None = None
    prepare_commit: PrepareCommit | None = None
    approval: ApprovalSpec | None = None
    wait_event: WaitEvent | None = None
    choice: list[ChoiceBranch] | None = None
    default: str | None = None
    sleep: Duration | None = None

    input: dict[str, Any] | None = None
    timeout: Duration = 300_000
    retry: RetryPolicy = RetryPolicy()
    critical: bool = False
    review_if: str | None = None
    review: ApprovalSpec | None = None
    result: dict[str, str] | None = None
    on_business_error: dict[str, HandlerField] = Field(default_factory=dict)
    on_exhausted: HandlerField | None = None
    next: str | None = None
    end: bool = False
    description: str = ""

    @model_validator(mode="after")
    def _one_kind(self) -> StepSpec:
        kinds = [
            k
            for k in ("task", "prepare_commit", "wait_event", "choice", "sleep")
            if getattr(self, k) is not None
        ]
        if not kinds and self.approval is None:
            raise ValueError(
                "a step needs one of task, prepare_commit, approval, wait_event, choice or sleep"
            )
        if len(kinds) > 1:
            raise ValueError(f"a step has exactly one kind, got {' and '.join(kinds)}")
        return self

    @property
    def kind(self) -> StepKind:
        for k in (
            StepKind.TASK,
            StepKind.PREPARE_COMMIT,
            StepKind.WAIT_EVENT,
            StepKind.CHOICE,
            StepKind.SLEEP,
        ):
            if getattr(self, k) is not None:
                return k
        return StepKind.APPROVAL


class WorkflowSpec(_Model):
    """A versioned workflow definition. Runs keep the version they started with."""

    workflow: str
    version: int = Field(ge=1)
    description: str = ""
    sla: Duration | None = None
    input: dict[str, str] = Field(default_factory=dict)
    strict_input: bool = True
    """With an ``input`` schema, a run input with a field it does not declare fails the
    run (``INVALID_INPUT``); ``false`` accepts such fields. Without a schema nothing is
    checked."""
    output: str | None = None
    redact: list[str] = Field(default_factory=list)
    steps: list[StepSpec] = Field(min_length=1, max_length=MAX_STEPS)

    def step(self, step_id: str) -> StepSpec:
        return self._index()[step_id]

    def has_step(self, step_id: str) -> bool:
        return step_id in self._index()

    def next_step(self, step_id: str) -> str | None:
        """The step after ``step_id`` when it completes normally, or None to end the run."""
        spec = self.step(step_id)
        if spec.end:
            return None
        if spec.next:
            return spec.next
        position = self._positions()[step_id]
        return self.steps[position + 1].id if position + 1 < len(self.steps) else None

    def requester_excluded_at(self) -> str | None:
        """The first step with an approval the run's requester may not vote in (an
        approval or review with ``exclude_requester``, or an escalation, which always
        excludes the requester), or None."""
        for step in self.steps:
            handlers = [*step.on_business_error.values(), step.on_exhausted]
            for approval in (step.approval, step.review):
                if approval is not None:
                    if approval.exclude_requester:
                        return step.id
                    handlers += [approval.on_expire, approval.on_reject]
            if any(h is not None and h.escalate for h in handlers):
                return step.id
        return None

    def _index(self) -> dict[str, StepSpec]:
        cached: dict[str, StepSpec] | None = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {s.id: s for s in self.steps}
            self.__dict__["_index_cache"] = cached
        return cached

    def _positions(self) -> dict[str, int]:
        cached: dict[str, int] | None = self.__dict__.get("_pos_cache")
        if cached is None:
            cached = {s.id: i for i, s in enumerate(self.steps)}
            self.__dict__["_pos_cache"] = cached
        return cached

    @property
    def key(self) -> tuple[str, int]:
        return (self.workflow, self.version)


# --------------------------------------------------------------------------- loading


def load_spec(data: Mapping[str, Any]) -> WorkflowSpec:
    """Validate a spec given as plain data. Raises ``SpecError`` listing every problem at
    once: field types and values, and the checks across fields (references, expressions,
    cycles) on every part that has the right types."""
    name = str(data.get("workflow", "")) if isinstance(data, Mapping) else ""
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        issues = [_pydantic_issue(data, err) for err in exc.errors()]
        issues += [i for i in _issues_beside(data, exc) if i not in issues]
        raise SpecError(name, _in_step_order(issues)) from None
    issues = list(_semantic_issues(spec))
    if issues:
        raise SpecError(spec.workflow, _in_step_order(issues))
    return spec


def load_deployed_spec(data: Mapping[str, Any]) -> WorkflowSpec:
    """A spec read back from a deployment (the store, the specs topic). Checked as at
    deploy except for what expressions refer to (roots, steps, input fields): a version
    deployed before those checks existed keeps loading, and its runs keep running."""
    name = str(data.get("workflow", "")) if isinstance(data, Mapping) else ""
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(name, [_pydantic_issue(data, err) for err in exc.errors()]) from None
    issues = list(_semantic_issues(spec, references=False))
    if issues:
        raise SpecError(spec.workflow, _in_step_order(issues))
    return spec


_WORKFLOW_NAME = re.compile(r"""^workflow:[ \t]*["']?([^"'\s#]+)""", re.MULTILINE)


def load_spec_yaml(text: str) -> WorkflowSpec:
    """Parse YAML text and validate it."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        named = _WORKFLOW_NAME.search(text)
        raise SpecError(
            named.group(1) if named else "", [("$", f"not valid YAML: {exc}")]
        ) from None
    if not isinstance(data, Mapping):
        raise SpecError("", [("$", "a spec is a mapping with workflow, version and steps")])
    return load_spec(data)


def spec_to_data(spec: WorkflowSpec) -> dict[str, Any]:
    """The canonical plain-data form, used to store and ship deployed specs."""
    return spec.model_dump(mode="json", exclude_defaults=True)


def _path(data: Any, loc: tuple[int | str, ...]) -> str:
    """Render a pydantic location as ``steps[2](refund).retry.initial``."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, Mapping) and isinstance(node.get("id"), str):
                out += f"({node['id']})"
        else:
            if part.startswith(("function-", "literal[", "Handler")) or "[" in part:
                continue
            out += f".{part}" if out else part
            node = node.get(part) if isinstance(node, Mapping) else None
    return out or "$"


def _in_step_order(issues: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Top-level fields first, then step by step; the order found within each."""

    def step_of(issue: tuple[str, str]) -> int:
        match = re.match(r"steps\[(\d+)\]", issue[0])
        return int(match.group(1)) if match else -1

    return sorted(issues, key=step_of)


_PLACEHOLDERS: dict[str, Any] = {"workflow": "_", "version": 1}


def _issues_beside(data: Any, exc: ValidationError) -> list[tuple[str, str]]:
    """The checks across fields, for a spec whose types are wrong somewhere.

    Every part that failed is taken out of a copy (a step that cannot stand becomes a
    placeholder that keeps its id, so references to it still resolve) until the rest
    validates; the cross-field checks then run on the rest, except where a removed part
    could make them wrong: on or around a removed path, and the cycle checks."""
    if not isinstance(data, Mapping):
        return []
    pruned: Any = copy.deepcopy(dict(data))
    removed: list[str] = []
    errors = exc.errors()
    for _ in range(20):
        for err in errors:
            where = _prune(pruned, tuple(err["loc"]))
            if where is None:
                return []
            removed.append(_path(data, where))
        try:
            spec = WorkflowSpec.model_validate(pruned)
        except ValidationError as again:
            errors = again.errors()
            continue
        return [
            (path, message)
            for path, message in _semantic_issues(spec, graph=False)
            if not any(_related(path, gone) for gone in removed)
        ]
    return []


def _prune(data: dict[str, Any], loc: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    """Take out what ``loc`` points at (the nearest part of it that exists); return the
    location taken out, or None if nothing can be."""
    trail: list[tuple[Any, int | str]] = []  # (container, key) down to the deepest part
    node: Any = data
    for part in loc:
        found = (
            part in node
            if isinstance(node, Mapping)
            else isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        )
        if found:
            trail.append((node, part))
            node = node[part]
        elif (
            isinstance(node, Mapping | list)
            and not str(part).startswith(("function-", "literal[", "Handler"))
            and "[" not in str(part)
        ):
            break  # a missing field: take out what should hold it
    if not trail and loc and loc[0] in _PLACEHOLDERS:
        data[str(loc[0])] = _PLACEHOLDERS[str(loc[0])]
        return (loc[0],)
    while trail:
        container, key = trail[-1]
        if len(trail) == 1 and key in _PLACEHOLDERS:
            container[key] = _PLACEHOLDERS[key]
            return (key,)
        if isinstance(container, list):
            if len(trail) == 2 and trail[0][1] == "steps" and isinstance(key, int):
                old = container[key]
                raw_id = old.get("id") if isinstance(old, Mapping) else None
                step_id = raw_id if isinstance(raw_id, str) else f"_{key}"
                container[key] = {"id": step_id, "sleep": 1}
                return ("steps", key)
            trail.pop()  # taking an item out would renumber the rest: take the list out
            continue
        if len(trail) == 1 and key == "steps":
            return None
        del container[key]
        return tuple(k for _, k in trail)
    return None


def _related(path: str, other: str) -> bool:
    """Whether one of the two paths is the other or lies inside it."""
    short, long = sorted((path, other), key=len)
    return long == short or long.startswith((short + ".", short + "["))


def _pydantic_issue(data: Any, err: Any) -> tuple[str, str]:
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown field (check the spelling; see the spec reference in the README)"
    elif err["type"] == "missing":
        message = "required field is missing"
    return _path(data, tuple(err["loc"])), message


# --------------------------------------------------------------------------- semantic checks


def _semantic_issues(
    spec: WorkflowSpec, graph: bool = True, references: bool = True
) -> Iterator[tuple[str, str]]:
    """The checks across fields; ``references`` includes what expressions refer to."""
    ids: dict[str, int] = {}
    for i, step in enumerate(spec.steps):
        where = f"steps[{i}]({step.id})"
        if not STEP_ID.match(step.id):
            yield f"{where}.id", "step ids use letters, digits, '_', '-' and '.'"
        if step.id in ids:
            yield f"{where}.id", f"duplicate step id (also steps[{ids[step.id]}])"
        ids.setdefault(step.id, i)
    for name, type_name in spec.input.items():
        if type_name.rstrip("?") not in INPUT_TYPES:
            yield (
                f"input.{name}",
                f"unknown type {type_name!r}; use one of {', '.join(INPUT_TYPES)}",
            )
    scope = _Scope(spec, ids, ROOTS if references else None)
    if spec.output is not None:
        yield from scope.issues("output", spec.output)

    for i, step in enumerate(spec.steps):
        where = f"steps[{i}]({step.id})"
        yield from _step_issues(scope, step, where, ids)
    if graph:
        yield from _graph_issues(spec)


class _Scope:
    """What the expressions of a spec may refer to: the roots of the run document, the
    steps of the spec and, when the spec declares its input strictly, the input fields."""

    def __init__(
        self, spec: WorkflowSpec, ids: Mapping[str, int], roots: tuple[str, ...] | None
    ) -> None:
        self.spec = spec
        self.ids = ids
        self.roots = roots
        self.fields = list(spec.input) if spec.input and spec.strict_input else None

    def with_roots(self, roots: tuple[str, ...]) -> _Scope:
        return _Scope(self.spec, self.ids, roots if self.roots is not None else None)

    def issues(self, path: str, text: str) -> Iterator[tuple[str, str]]:
        try:
            chains = root_paths(text)
        except ExpressionError as exc:
            yield path, str(exc)
            return
        said: set[str] = set()
        for chain in chains:
            problem = self._problem(chain, text)
            if problem is not None and problem not in said:
                said.add(problem)
                yield path, problem

    def _problem(self, chain: tuple[str, ...], text: str) -> str | None:
        """What is wrong with one root path of ``text`` (None: nothing, or not checked)."""
        if self.roots is None:
            return None
        root = chain[0]
        if root not in self.roots:
            hint = _did_you_mean(root, self.roots)
            if text.strip() == root:
                hint += f"; a literal string is quoted: \"'{root}'\""
            return (
                f"unknown root {root!r} in {text!r}{hint}: expressions start from "
                f"{', '.join(self.roots)}"
            )
        if root == "steps" and len(chain) > 1:
            step = chain[1]
            if step not in self.ids:
                return (
                    f"unknown step {step!r} in {text!r}"
                    f"{_did_you_mean(step, list(self.ids))}; known steps: "
                    f"{', '.join(self.ids)}"
                )
            if len(chain) > 2 and chain[2] != "result":
                return (
                    f"steps.{step} has only result, not {chain[2]!r}, in {text!r}: "
                    f"write steps.{step}.result"
                )
        if root == "run" and len(chain) > 1 and chain[1] not in RUN_FIELDS:
            return (
                f"run has no field {chain[1]!r} in {text!r}"
                f"{_did_you_mean(chain[1], RUN_FIELDS)}; it has {', '.join(RUN_FIELDS)}"
            )
        if (
            root == "input"
            and len(chain) > 1
            and self.fields is not None
            and chain[1] not in self.fields
        ):
            return (
                f"input has no field {chain[1]!r} in {text!r}"
                f"{_did_you_mean(chain[1], self.fields)}; the spec declares "
                f"{', '.join(self.fields)} (strict_input: false lets runs pass others)"
            )
        return None


def _did_you_mean(word: str, options: Iterator[str] | tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _step_issues(
    scope: _Scope, step: StepSpec, where: str, ids: Mapping[str, int]
) -> Iterator[tuple[str, str]]:
    def ref(path: str, target: str | None) -> Iterator[tuple[str, str]]:
        if target is not None and target not in ids:
            yield path, f"unknown step {target!r}; known steps: {', '.join(ids)}"

    for queue_path, queue in _queues(step, where):
        if not QUEUE.match(queue):
            yield queue_path, f"bad queue name {queue!r}: use letters, digits, '_', '-' and '.'"
    yield from ref(f"{where}.next", step.next)
    if step.next and step.end:
        yield f"{where}.end", "a step cannot have both next and end"
    if step.input is not None:
        for path, text in _mapping_expressions(step.input, f"{where}.input"):
            yield from scope.issues(path, text)
    if step.review_if is not None:
        yield from scope.with_roots(RESULT_ROOTS).issues(f"{where}.review_if", step.review_if)
        if step.kind is StepKind.PREPARE_COMMIT and step.approval is None:
            yield f"{where}.approval", "review_if on prepare_commit gates its approval; add one"
        elif step.kind is not StepKind.PREPARE_COMMIT and step.review is None:
            yield f"{where}.review", "review_if needs review: {approvers: [...]} to route to"
    if step.critical and step.approval is None:
        yield f"{where}.approval", "critical steps need an approval: {approvers: [...]}"
    if step.approval is not None and step.kind not in (
        StepKind.TASK,
        StepKind.PREPARE_COMMIT,
        StepKind.APPROVAL,
    ):
        yield f"{where}.approval", f"approval does not apply to a {step.kind} step"
    if step.review is not None and step.kind is not StepKind.TASK:
        yield f"{where}.review", f"review does not apply to a {step.kind} step"
    if step.result is not None:
        for name, type_name in step.result.items():
            if type_name.rstrip("?") not in INPUT_TYPES:
                yield f"{where}.result.{name}", f"unknown type {type_name!r}"
    for code, handler in step.on_business_error.items():
        yield from _handler_issues(handler, f"{where}.on_business_error.{code}", ids)
    if step.on_business_error and step.kind not in (StepKind.TASK, StepKind.PREPARE_COMMIT):
        yield f"{where}.on_business_error", "only task and prepare_commit steps fail with errors"
    if step.on_exhausted is not None:
        yield from _handler_issues(step.on_exhausted, f"{where}.on_exhausted", ids)
        if step.on_exhausted.wait_event:
            yield f"{where}.on_exhausted", "use goto, escalate or fail when retries run out"
    for label, approval in (("approval", step.approval), ("review", step.review)):
        if approval is None:
            continue
        for hname in ("on_expire", "on_reject"):
            handler = getattr(approval, hname)
            yield from _handler_issues(handler, f"{where}.{label}.{hname}", ids)
            if handler.wait_event:
                yield f"{where}.{label}.{hname}", "use goto, escalate or fail here"
        expires = approval.expires_after is not None
        if approval.on_expire.action is not HandlerAction.FAIL and not expires:
            yield f"{where}.{label}.expires_after", "on_expire needs expires_after"
    if step.wait_event is not None:
        if step.wait_event.key is not None:
            yield from scope.issues(f"{where}.wait_event.key", step.wait_event.key)
        yield from _handler_issues(
            step.wait_event.on_timeout, f"{where}.wait_event.on_timeout", ids
        )
        if step.wait_event.on_timeout.action not in (HandlerAction.GOTO, HandlerAction.FAIL):
            # decide only knows goto and fail here; anything else would silently fail the run
            yield f"{where}.wait_event.on_timeout", "use goto or fail when the signal times out"
    if step.choice is not None:
        if not step.choice:
            yield f"{where}.choice", "a choice needs at least one branch"
        for j, branch in enumerate(step.choice):
            yield from scope.issues(f"{where}.choice[{j}].when", branch.when)
            yield from ref(f"{where}.choice[{j}].goto", branch.goto)
        yield from ref(f"{where}.default", step.default)
    elif step.default is not None:
        yield f"{where}.default", "default belongs to choice steps"


def _handler_issues(
    handler: Handler, path: str, ids: Mapping[str, int]
) -> Iterator[tuple[str, str]]:
    if handler.goto is not None and handler.goto not in ids:
        yield f"{path}.goto", f"unknown step {handler.goto!r}; known steps: {', '.join(ids)}"


def _queues(step: StepSpec, where: str) -> Iterator[tuple[str, str]]:
    if step.task is not None:
        yield f"{where}.task", step.task
    if step.prepare_commit is not None:
        yield f"{where}.prepare_commit.prepare", step.prepare_commit.prepare
        yield f"{where}.prepare_commit.commit", step.prepare_commit.commit


def _mapping_expressions(mapping: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(mapping, str):
        yield path, mapping
    elif isinstance(mapping, dict):
        for key, value in mapping.items():
            yield from _mapping_expressions(value, f"{path}.{key}")
    elif isinstance(mapping, list):
        for i, value in enumerate(mapping):
            yield from _mapping_expressions(value, f"{path}[{i}]")


def successors(spec: WorkflowSpec, step: StepSpec) -> list[str | None]:
    """Every step control can move to from ``step``; None stands for the end of the run."""
    out: list[str | None] = []
    if step.kind is StepKind.CHOICE:
        out.extend(branch.goto for branch in step.choice or [])
        out.append(step.default if step.default is not None else spec.next_step(step.id))
    else:
        out.append(spec.next_step(step.id))
    handlers: list[Handler] = list(step.on_business_error.values())
    for h in (step.on_exhausted,):
        if h is not None:
            handlers.append(h)
    for approval in (step.approval, step.review):
        if approval is not None:
            handlers += [approval.on_expire, approval.on_reject]
    if step.wait_event is not None:
        handlers.append(step.wait_event.on_timeout)
    out.extend(h.goto for h in handlers if h.goto)
    return out


def _graph_issues(spec: WorkflowSpec) -> Iterator[tuple[str, str]]:
    """Refuse loops with no way out, and loops made only of choices (they never wait)."""
    if not all(spec.has_step(t) for s in spec.steps for t in successors(spec, s) if t):
        return  # unknown references are reported already
    edges = {s.id: successors(spec, s) for s in spec.steps}
    can_end: set[str] = set()
    changed = True
    while changed:
        changed = False
        for sid, targets in edges.items():
            if sid not in can_end and any(t is None or t in can_end for t in targets):
                can_end.add(sid)
                changed = True
    for i, step in enumerate(spec.steps):
        if step.id not in can_end:
            yield (
                f"steps[{i}]({step.id})",
                "cycle without exit: no path from this step reaches the end of the workflow; "
                "add end: true, a next that leaves the loop, or a choice default that exits",
            )
    choices = {s.id for s in spec.steps if s.kind is StepKind.CHOICE}
    for i, step in enumerate(spec.steps):
        if step.id in choices and _on_choice_cycle(step.id, edges, choices):
            yield (
                f"steps[{i}]({step.id})",
                "cycle made only of choice steps: it would loop without ever waiting; "
                "put a task, wait_event or sleep inside the loop",
            )


def _on_choice_cycle(start: str, edges: Mapping[str, list[str | None]], choices: set[str]) -> bool:
    seen: set[str] = set()
    stack = [t for t in edges[start] if t in choices]
    while stack:
        node = stack.pop()
        if node == start:
            return True
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(t for t in edges[node] if t in choices)
    return False


def check_input(
    schema: Mapping[str, str], value: Any, prefix: str, strict: bool = False
) -> tuple[str, str] | None:
    """Check ``value`` against a flat ``{field: type}`` schema; return (path, problem) or None.
    ``strict`` refuses a field the schema does not declare (when it declares any)."""
    if not isinstance(value, Mapping):
        return prefix, f"expected an object, got {type(value).__name__}"
    if strict and schema:
        for name in value:
            if name not in schema:
                hint = _did_you_mean(str(name), list(schema))
                return (
                    f"{prefix}.{name}",
                    f"field {str(name)!r} is not declared{hint}; the spec declares "
                    f"{', '.join(schema)} (strict_input: false accepts others)",
                )
    for name, type_name in schema.items():
        optional = type_name.endswith("?")
        base = type_name.rstrip("?")
        if name not in value or value[name] is None:
            if not optional:
                return f"{prefix}.{name}", f"required {base} is missing"
            continue
        if not _is_type(value[name], base):
            got = type(value[name]).__name__
            return f"{prefix}.{name}", f"expected {base}, got {got} {value[name]!r:.40}"
    return None


def _is_type(value: Any, type_name: str) -> bool:
    if type_name == "any":
        return True
    if type_name == "string":
        return isinstance(value, str)
    if type_name == "boolean":
        return isinstance(value, bool)
    if type_name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if type_name == "object":
        return isinstance(value, Mapping)
    if type_name == "array":
        return isinstance(value, list | tuple)
    return False
