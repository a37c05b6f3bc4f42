"""Every fix, through the rescue's checks, on 105 of other people's notebook cells (tests/real_cells.py).

The cells are copied as their authors wrote them (tests/fixtures/real_cells/README.md says from where); a
careful engineer's verdict on each fix for each cell is in the fixture. What a user would notice is pinned
here: no fix crashes or hands back broken code, each does what its title says, none is offered where the
engineer would not offer it, and the cells where we offer nothing although the engineer would are exactly
those listed below, each with its reason.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import pytest

from tests.real_cells import Judgement, judge, load_cells

# Offered by the engineer, not by us: why, for each.
KNOWN_FALSE_REFUSALS = {
    ("trl-bestofn-01", "bf16"): "lvwerra/gpt2-imdb-pos-v2's config is not here offline: no figures say it "
    "loads in float32 (in a real rescue the load that failed left its config in the Hugging Face cache)",
    ("peft-seqcls-lora-02", "bf16"): "roberta-large's config is not here offline (as above)",
    ("peft-seqcls-lora-04", "bf16"): "roberta-large's config is not here offline (as above)",
    ("whisper-librispeech-02", "cpu"): "openai-whisper's whisper.load_model() is not a load vram_magic reads",
}


@pytest.fixture(scope="module")
def judgement() -> Iterator[Judgement]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # no config is fetched: the estimator says what it knows
        yield judge()


def test_the_corpus_is_other_peoples_varied_cells_with_their_provenance() -> None:
    import json

    from tests.real_cells import CELLS

    entries = json.loads(CELLS.read_text())
    assert len(entries) >= 40
    assert len({entry["repo"] for entry in entries}) >= 15
    assert all(entry["url"].startswith("https://github.com/") and entry["license"] for entry in entries)
    kinds = collections.Counter(entry["kind"] for entry in entries)
    assert all(kinds[kind] >= 5 for kind in ("load", "training", "merge", "generation")), kinds
    assert len(load_cells()) == len(entries)


def test_no_fix_crashes_hands_back_broken_code_or_breaks_its_meaning(judgement: Judgement) -> None:
    assert [(o.cell, o.fix, o.problem) for o in judgement.problems] == []
    assert sum(o.applied for o in judgement.outcomes) >= 80  # the fixes do apply where they should


def test_no_fix_is_offered_where_a_careful_engineer_would_not(judgement: Judgement) -> None:
    assert [(o.cell, o.fix) for o in judgement.wrong_applications] == []


def test_the_fixes_we_do_not_offer_where_the_engineer_would_are_the_known_ones(judgement: Judgement) -> None:
    refused = {(o.cell, o.fix): o.reason for o in judgement.false_refusals}
    assert set(refused) == set(KNOWN_FALSE_REFUSALS), refused
