"""%vram track / %vram log / vram_magic.timeline(): what each cell did to memory, as a user reads it.

On CPU the figures are the process's RSS with real allocations; the GPU's figures (PyTorch's peak statistics
and NVML) are checked for real in tests/gpu/test_timeline_gpu.py.
"""

from __future__ import annotations

import base64
import importlib.util
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

import vram_magic
from vram_magic import _timeline
from vram_magic._timeline import Timeline, Tracker, first_line, growers
from vram_magic._types import CellRecord
from vram_magic.render import timeline_bundle
from vram_magic.render._timeline import timeline_text

MiB = 2**20


def _cpu(records: list[CellRecord]) -> list[CellRecord]:
    return [record for record in records if record.device == "cpu"]


def test_tracking_is_off_until_asked_and_says_its_state(ip: Any) -> None:
    _timeline.TRACKER.records.clear()
    ip.run_cell("x = 1", store_history=True)
    assert vram_magic.timeline() == []
    with capture_output() as state:
        ip.run_line_magic("vram", "track")
    assert state.stdout.startswith("Tracking is off (0 cells recorded")
    with capture_output() as on:
        ip.run_line_magic("vram", "track on")
    assert on.stdout.startswith("Tracking is on")
    ip.run_cell("y = 2", store_history=True)
    with capture_output() as off:
        ip.run_line_magic("vram", "track off")
    assert off.stdout.startswith("Tracking is off (1 cells recorded")
    ip.run_cell("z = 3", store_history=True)
    assert [record.source for record in vram_magic.timeline()] == ["y = 2"]
    with capture_output():
        ip.run_line_magic("vram", "track clear")
    assert vram_magic.timeline() == []


def test_a_wrong_word_is_one_line_that_says_what_to_type(ip: Any) -> None:
    with pytest.raises(UsageError, match=r"Type `%vram track on`, `%vram track off`"):
        ip.run_line_magic("vram", "track yes")
    with pytest.raises(UsageError, match="type `%vram log` alone"):
        ip.run_line_magic("vram", "log everything")


def test_a_cell_that_keeps_memory_and_one_that_frees_it_read_as_they_did(tracked: Any) -> None:
    ip = tracked
    ip.run_cell("import time, torch", store_history=True)
    ip.run_cell("kept = torch.ones(256 * 2**20, dtype=torch.uint8)", store_history=True)
    # A temporary 512 MiB, held 50 ms (ten samples) and dropped: a peak with no change at the end.
    ip.run_cell(
        "scratch = torch.ones(512 * 2**20, dtype=torch.uint8)\ntime.sleep(0.05)\ndel scratch",
        store_history=True,
    )
    records = _cpu(vram_magic.timeline())
    assert [r.source for r in records] == [
        "import time, torch",
        "kept = torch.ones(256 * 2**20, dtype=torch.uint8)",
        "scratch = torch.ones(512 * 2**20, dtype=torch.uint8)",
    ]
    kept, scratch = records[1], records[2]
    assert 250 * MiB <= kept.delta_bytes <= 300 * MiB
    assert kept.peak_bytes >= kept.end_bytes
    assert scratch.peak_bytes - scratch.start_bytes >= 500 * MiB
    assert abs(scratch.delta_bytes) < 64 * MiB
    assert kept.cell is not None and scratch.cell == kept.cell + 1
    assert all(r.seconds >= 0 for r in records) and scratch.seconds >= 0.05
    del ip.user_ns["kept"]


def test_the_timeline_has_the_fields_the_docs_name_and_goes_to_pandas(tracked: Any) -> None:
    tracked.run_cell("a = [0] * 1000", store_history=True)
    timeline = vram_magic.timeline()
    assert isinstance(timeline, Timeline) and len(timeline) == 1
    record = timeline[0]
    assert (record.source, record.device) == ("a = [0] * 1000", "cpu")
    assert record.delta_bytes == record.end_bytes - record.start_bytes
    frame = timeline.to_pandas()
    assert list(frame.columns)[:7] == [
        "cell",
        "source",
        "device",
        "peak_bytes",
        "end_bytes",
        "delta_bytes",
        "seconds",
    ]
    assert frame.loc[0, "source"] == "a = [0] * 1000"


def test_log_draws_a_plot_and_a_table(tracked: Any) -> None:
    ip = tracked
    ip.run_cell("import torch\nblock = torch.ones(64 * 2**20, dtype=torch.uint8)", store_history=True)
    ip.run_cell("other = 1", store_history=True)
    with capture_output() as shown:
        ip.run_line_magic("vram", "log")
    (bundle,) = [output.data for output in shown.outputs]
    text = bundle["text/plain"]
    assert "cpu (RSS of this process), 2 cells" in text
    assert "import torch" in text and "other = 1" in text
    assert "Grew cpu most since it was lowest:" in text
    assert importlib.util.find_spec("matplotlib") is not None  # a dev dependency: the plot is tested here
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    assert bundle["text/html"].startswith('<img src="data:image/png;base64,')
    del ip.user_ns["block"]


def test_log_without_matplotlib_is_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    timeline = Timeline([CellRecord(3, "x = f()", "cpu", 900 * MiB, 800 * MiB, 100 * MiB, 0.5)])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a),
    )
    bundle = timeline_bundle(timeline, vram_magic.snapshot(), tracking=True)
    assert set(bundle) == {"text/plain"}
    assert "[3]  900.00 MiB  800.00 MiB  +100.00 MiB" in bundle["text/plain"]


def test_log_with_nothing_recorded_says_how_to_start() -> None:
    assert "type `%vram track on` first" in timeline_text(Timeline(), tracking=False)


def _record(cell: int, start: int, delta: int, device: str = "cuda:0") -> CellRecord:
    return CellRecord(cell, f"cell {cell}", device, start + max(delta, 0), start + delta, delta, 0.1)


def test_growers_count_from_the_last_time_memory_was_lowest() -> None:
    GiB = 2**30
    records = [
        _record(1, 0, 5 * GiB),  # grew, then all of it was freed by cell 2: not a cause now
        _record(2, 5 * GiB, -5 * GiB),
        _record(3, 0, 1 * GiB),
        _record(4, 1 * GiB, 9 * GiB),  # the trainer
        _record(5, 10 * GiB, -1 * GiB),
        _record(6, 9 * GiB, 2 * GiB),
        _record(7, 0, 3 * GiB, device="cpu"),
    ]
    assert [r.cell for r in growers(records, "cuda:0")] == [4, 6, 3]
    assert [r.cell for r in growers(records, "cuda:0", limit=1)] == [4]
    assert [r.cell for r in growers(records, "cpu")] == [7]
    assert growers(records, "cuda:1") == []


def test_an_oom_report_names_the_cells_that_grew_memory(
    tracked: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import CAPPED_LOAD_OOM

    ip = tracked
    ip.run_cell("import torch\nkept = torch.ones(200 * 2**20, dtype=torch.uint8)", store_history=True)
    ip.run_cell("small = 1", store_history=True)
    ip.user_ns["MESSAGE"] = CAPPED_LOAD_OOM
    with capture_output() as shown:
        ip.run_cell("%%oomsafe\nraise torch.OutOfMemoryError(MESSAGE)", store_history=True)
    text = shown.outputs[0].data["text/plain"]
    assert "Cells that grew memory most since it was lowest (%vram track)" in text
    assert "`import torch` added" in text
    del ip.user_ns["kept"]


def test_first_line_is_what_the_cell_says() -> None:
    assert first_line("%%oomsafe --auto\n\nmodel = load()\nmore()") == "model = load()"
    assert first_line("   \n") == ""
    assert first_line("x = '" + "a" * 200 + "'").endswith("…")


class FakeGpus:
    """Stands for PyTorch's counters on one GPU: 1 GiB held at the start, a 3 GiB peak, 2 GiB at the end."""

    def start(self) -> dict[int, int]:
        return {0: 2**30}

    def end(self) -> dict[int, tuple[int, int, int | None]]:
        return {0: (3 * 2**30, 2 * 2**30, 5 * 2**30)}


def test_a_gpu_is_recorded_beside_cpu_ram() -> None:
    tracker = Tracker(read_rss=lambda: 100 * MiB, gpus=FakeGpus())
    tracker.on = True
    tracker.begin("out = model(batch)")
    tracker.end(12)
    gpu, cpu = tracker.records
    assert (gpu.device, gpu.cell, gpu.source) == ("cuda:0", 12, "out = model(batch)")
    assert (gpu.peak_bytes, gpu.end_bytes, gpu.delta_bytes) == (3 * 2**30, 2 * 2**30, 2**30)
    assert gpu.device_used_bytes == 5 * 2**30
    assert (cpu.device, cpu.delta_bytes) == ("cpu", 0)


def test_a_cell_that_began_before_tracking_is_not_recorded() -> None:
    tracker = Tracker(read_rss=lambda: 100 * MiB, gpus=FakeGpus())
    tracker.begin("%vram track on")  # off: nothing noted
    tracker.on = True
    tracker.end(1)
    assert tracker.records == []


def _process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def test_where_linux_keeps_the_peak_even_a_brief_one_is_exact() -> None:
    import torch

    if _timeline._KernelPeak.opened() is None:
        pytest.skip("this kernel keeps no resettable peak RSS (/proc/self/clear_refs): the sampler is used")
    tracker = Tracker()
    tracker.on = True
    tracker.begin("brief = torch.ones(...); del brief")
    brief = torch.ones(256 * MiB, dtype=torch.uint8)  # a few milliseconds: a sampler may miss it
    del brief
    tracker.end(1)
    (cpu,) = tracker.records
    assert cpu.peak_bytes - cpu.start_bytes >= 250 * MiB
    assert abs(cpu.delta_bytes) < 32 * MiB


def test_elsewhere_the_sampler_sees_a_peak_held_for_a_few_samples() -> None:
    import time

    import torch

    tracker = Tracker(read_rss=_process_rss)  # the path taken where Linux's peak cannot be reset
    tracker.on = True
    tracker.begin("held = torch.ones(...); sleep; del held")
    held = torch.ones(256 * MiB, dtype=torch.uint8)
    time.sleep(20 * _timeline.SAMPLE_SECONDS)
    del held
    tracker.end(1)
    (cpu,) = tracker.records
    assert cpu.peak_bytes - cpu.start_bytes >= 250 * MiB
    assert abs(cpu.delta_bytes) < 32 * MiB


def test_a_tracker_that_cannot_read_memory_stops_without_breaking_the_cell(ip: Any) -> None:
    def broken() -> int:
        raise OSError("no /proc here")

    tracker = Tracker(read_rss=broken, gpus=FakeGpus())
    tracker.on = True
    tracker.begin("x = 1")  # never raises: it runs before every cell
    tracker.end(1)
    assert (tracker.on, tracker.records) == (False, [])
    assert tracker.problem == "OSError: no /proc here"
    magics = ip.magics_manager.registry["VramMagics"]
    real = magics.session.tracker
    magics.session.tracker = tracker
    try:
        result = ip.run_cell("y = 2")
        assert result.success and ip.user_ns["y"] == 2
        with capture_output() as state:
            ip.run_line_magic("vram", "track")
        assert state.stdout.startswith("Tracking is off: it stopped by itself (OSError: no /proc here)")
    finally:
        magics.session.tracker = real
