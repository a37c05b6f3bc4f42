"""Realistic failing cells (tests/advice_scenarios.py) on the simulated small GPU: fix 1 and ``--auto``.

What a user notices: after the report, ``%vram fix 1`` leaves the notebook working, and ``%%oomsafe --auto``
ends in a working state. One scenario is pinned as fix 1 not being enough: a loop of 16-prompt batches needs
a quarter of the batch, and fix 1 halves it (``--auto`` goes on to a quarter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.advice_scenarios import SCENARIOS, Scenario, build_checkpoints, measure
from tests.stack import BITSANDBYTES_QUANTIZES_HERE, NO_BITSANDBYTES_HERE

FIX_1_NOT_ENOUGH = {"a loop of prompt batches (batch_size = 16)"}


@pytest.fixture(scope="module")
def names(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_checkpoints(tmp_path_factory.mktemp("scenarios"))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.name for scenario in SCENARIOS])
def test_fix_1_leaves_the_notebook_working(
    ip: Any, names: dict[str, str], offline: None, scenario: Scenario
) -> None:
    if scenario.quantizes and not BITSANDBYTES_QUANTIZES_HERE:
        pytest.skip(NO_BITSANDBYTES_HERE)
    measured = measure(ip, scenario, names, "fix 1")
    if scenario.name in FIX_1_NOT_ENOUGH:
        assert not measured.worked and "out of memory" in measured.detail, measured
        assert measured.fix.startswith("Run the batch in 2 chunks")
    else:
        assert measured.worked, measured
        assert measured.runs == 2  # the cell as written, then fix 1


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.name for scenario in SCENARIOS])
def test_auto_ends_in_a_working_state(
    ip: Any, names: dict[str, str], offline: None, scenario: Scenario
) -> None:
    if scenario.quantizes and not BITSANDBYTES_QUANTIZES_HERE:
        pytest.skip(NO_BITSANDBYTES_HERE)
    measured = measure(ip, scenario, names, "auto")
    assert measured.worked, measured
    assert measured.runs <= 3


def test_the_scenarios_cover_what_users_hit() -> None:
    cells = "\n".join(scenario.cell for scenario in SCENARIOS)
    for written in (
        "**model_kwargs",
        ".half().cuda()",
        '{"": 0}',
        "model.merge_and_unload()\n",
        "PeftModel.from_pretrained(base, adapter).merge_and_unload()",
        "TrainingArguments(**{",
        "batch_size=batch_size",
        "model.generate(**inputs",
        "outputs = model(**inputs)",
    ):
        assert written in cells, written
    assert len(SCENARIOS) >= 12
    assert Path(__file__).with_name("advice_scenarios.py").exists()
