"""The README's examples are fixtures: every YAML block is a spec that deploys (or, marked
``# notify.yaml``, delivery settings that load; marked ``# limits.yaml``, a limits
document that deploys), and the refusal it shows is the one the engine gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from engine.api.hooks import parse_hooks
from engine.core.errors import SpecError
from engine.core.limits import LimitsError, load_limits_yaml
from engine.core.spec import load_spec_yaml
from engine.notify import load_settings
from engine.runtime.schedule_spec import load_schedule_yaml
from tests.notify.servers import new_secret

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
YAML_BLOCKS = re.findall(r"^```ya?ml\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
SETTINGS_MARK = "# notify.yaml"
HOOKS_MARK = "# hooks.yaml"
LIMITS_MARK = "# limits.yaml"
SCHEDULE_MARK = "# schedule.yaml"
SPECS = [
    block
    for block in YAML_BLOCKS
    if not block.startswith((SETTINGS_MARK, HOOKS_MARK, LIMITS_MARK, SCHEDULE_MARK))
]
HOOKS = [block for block in YAML_BLOCKS if block.startswith(HOOKS_MARK)]
SETTINGS = [block for block in YAML_BLOCKS if block.startswith(SETTINGS_MARK)]
LIMITS = [block for block in YAML_BLOCKS if block.startswith(LIMITS_MARK)]
SCHEDULES = [block for block in YAML_BLOCKS if block.startswith(SCHEDULE_MARK)]

# What the README says it changed in its first spec to get the refusal it shows.
BROKEN = (
    ("initial: 1s", "initial: 1x"),
    ("AMOUNT_OVER_LIMIT: {goto: escalate}", "AMOUNT_OVER_LIMIT: {goto: nowhere}"),
    ("{order_id: input.order_id}", "{order_id: inputs.order_id}"),
)


def test_the_readme_has_yaml_blocks() -> None:
    assert YAML_BLOCKS, "no ```yaml block found in README.md"


@pytest.mark.parametrize("block", SPECS, ids=lambda b: b.split("\n", 1)[0])
def test_every_yaml_block_is_a_valid_spec(block: str) -> None:
    try:
        load_spec_yaml(block)
    except SpecError as exc:
        pytest.fail(f"a README spec does not deploy:\n{exc}")


def test_the_refusal_shown_is_the_one_given() -> None:
    spec = SPECS[0]
    for before, after in BROKEN:
        assert spec.count(before) == 1, f"the README spec no longer has {before!r}"
        spec = spec.replace(before, after)
    with pytest.raises(SpecError) as refused:
        load_spec_yaml(spec)
    shown = README.split("refuses invalid specs", 1)[1].split("```\n", 2)[1]
    assert str(refused.value) + "\n" == shown


@pytest.mark.parametrize("block", SETTINGS, ids=lambda b: b.split("\n", 1)[0])
def test_every_settings_block_loads(block: str, tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "ops-webhook-old").write_text(new_secret())
    path = tmp_path / "notify.yaml"
    path.write_text(block)
    settings = load_settings(path, {"OPS_WEBHOOK_SECRET": new_secret(), "SMTP_PASSWORD": "pw"})
    assert settings.routes


@pytest.mark.parametrize("block", HOOKS, ids=lambda b: b.split("\n", 1)[0])
def test_every_hooks_block_loads(block: str) -> None:
    names = set(re.findall(r"env:([A-Z_]+)", block))
    env = {name: "whsec_" + "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0" for name in names}
    hooks = parse_hooks(yaml.safe_load(block), "README", environ=env)
    assert hooks.hooks


@pytest.mark.parametrize("block", LIMITS, ids=lambda b: b.split("\n", 1)[0])
def test_every_limits_block_deploys(block: str) -> None:
    try:
        load_limits_yaml(block)
    except LimitsError as exc:
        pytest.fail(f"a README limits document does not deploy:\n{exc}")


def test_the_limits_refusal_shown_is_the_one_given() -> None:
    shown = README.split("refuses a bad limits document", 1)[1].split("```\n", 2)[1]
    bad = (
        LIMITS[0]
        .replace("concurrency: 8", "concurrency: eight")
        .replace("timezone: Europe/Berlin", "timezone: Berlin")
    )
    with pytest.raises(LimitsError) as refused:
        load_limits_yaml(bad)
    assert str(refused.value) + "\n" == shown


def test_the_readme_shows_a_schedule() -> None:
    assert SCHEDULES, "no ```yaml block marked # schedule.yaml in README.md"


@pytest.mark.parametrize("block", SCHEDULES, ids=lambda b: b.split("\n", 1)[0])
def test_every_schedule_block_loads(block: str) -> None:
    spec = load_schedule_yaml(block)
    assert spec.cron or spec.interval
