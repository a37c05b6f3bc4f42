"""What a user reads: the text wording, the widget tree, and the display bundle."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import vram_magic.render._widget as rw
from vram_magic._types import (
    Cause,
    CellAnalysis,
    Cleanup,
    CpuMemory,
    Fix,
    GpuSnapshot,
    Holder,
    OOMInfo,
    ProcessMemory,
    Report,
    Snapshot,
)
from vram_magic.render._text import (
    details_text,
    format_bytes,
    render_cleanup,
    render_holders,
    render_report,
    render_snapshot,
    summary_line,
)

GiB = 2**30
MiB = 2**20
OOM_DIR = Path(__file__).resolve().parents[2] / "shared" / "oom-messages"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def message(name: str, fallback: str) -> str:
    path = OOM_DIR / name
    return path.read_text().strip() if path.exists() else fallback


CPU = CpuMemory(total_bytes=125 * GiB, available_bytes=100 * GiB, process_rss_bytes=int(2.5 * GiB))

# torch2_11_h100_from_pretrained_capped.txt, figures as expected.json reads them.
CAPPED_OOM = OOMInfo(
    kind="cuda",
    message=message("torch2_11_h100_from_pretrained_capped.txt", "Tried to allocate 1.59 GiB."),
    device_index=0,
    requested_bytes=1707249500,
    total_bytes=85018877624,
    free_bytes=81142669640,
    allocated_bytes=3221225472,
    reserved_bytes=3221225472,
    process_bytes=3865470566,
    allowed_bytes=1610612736,
)
H100 = GpuSnapshot(
    index=0,
    name="NVIDIA H100 80GB HBM3",
    total_bytes=85018877624,
    free_bytes=84460531876,
    allocated_bytes=0,
    reserved_bytes=0,
    process_bytes=543162368,
    cap_bytes=1610612736,
    others_bytes=15183380,
    others_are_remainder=True,
)
TRACEBACK = (
    "Cell In[3], line 4\n"
    "      2 from transformers import AutoModelForCausalLM\n"
    "----> 4 model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map='cuda')\n"
    "File modeling_utils.py:4890, in caching_allocator_warmup\n"
    "OutOfMemoryError: CUDA out of memory. Tried to allocate 1.59 GiB."
)


def capped_report(**changes: Any) -> Report:
    fields: dict[str, Any] = dict(
        error_text="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.59 GiB.",
        oom=CAPPED_OOM,
        cell="import torch\nfrom transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM...",
        analysis=CellAnalysis(
            kind="load",
            failed_line=4,
            failed_statement="model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)",
            assigned_names=("model",),
        ),
        snapshot=Snapshot(gpus=(H100,), cpu=CPU),
        holders=(
            Holder("base_model", "LlamaForCausalLM", int(1.59 * GiB), int(1.59 * GiB), ("peft_model",)),
            Holder("peft_model", "PeftModelForCausalLM", int(1.62 * GiB), int(1.59 * GiB), ("base_model",)),
            Holder("cache", "dict", 518 * MiB),
        ),
        cleanup=Cleanup(
            released=("sys.last_traceback", "InteractiveTB.tb"),
            reclaimed_bytes=3 * GiB,
            freed_tensor_bytes=3 * GiB,
        ),
        causes=(
            Cause("over_cap", "The model needs 1.59 GiB in bf16, more than the 1.50 GiB cap allows."),
            Cause("stale", "base_model and peft_model still hold a copy of the weights."),
        ),
        fixes=(
            Fix(
                "quant4",
                "Load in 4-bit (NF4)",
                "Weights shrink to about a quarter.",
                "from transformers import BitsAndBytesConfig\n"
                "model = AutoModelForCausalLM.from_pretrained(\n"
                "    path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))",
                rewritten_cell="model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q)\n",
            ),
            Fix(
                "offload",
                "Offload layers to CPU",
                "Keeps what fits under the cap on the GPU.",
                "if torch.cuda.mem_get_info()[0] < 2 * 2**30:\n    device_map = 'auto'",
            ),
        ),
        traceback_text=TRACEBACK,
        notes=("The cap was set with torch.cuda.set_per_process_memory_fraction.",),
    )
    fields.update(changes)
    return Report(**fields)


# torch2_1_other_process.txt: another process holds 1.10 GiB of a T4.
OTHER_OOM = OOMInfo(
    kind="cuda",
    message=message("torch2_1_other_process.txt", "CUDA out of memory. Tried to allocate 172.00 MiB."),
    device_index=0,
    requested_bytes=180355072,
    total_bytes=15837691904,
    free_bytes=43054531,
    allocated_bytes=13862006948,
    reserved_bytes=14339497001,
    process_bytes=14602888806,
    other_processes=((20417, 1181116006),),
)
T4 = GpuSnapshot(
    index=0,
    name="Tesla T4",
    total_bytes=15837691904,
    free_bytes=43054531,
    allocated_bytes=13862006948,
    reserved_bytes=14339497001,
    process_bytes=14602888806,
    other_processes=(ProcessMemory(20417, 1181116006),),
    others_bytes=1181116006,
)


def other_report() -> Report:
    return Report(
        error_text="torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 172.00 MiB.",
        oom=OTHER_OOM,
        cell="trainer.train()",
        analysis=CellAnalysis(kind="training", failed_line=1, failed_statement="trainer.train()"),
        snapshot=Snapshot(gpus=(T4,), cpu=CPU),
        holders=(),
        cleanup=Cleanup(released=(), reclaimed_bytes=0, freed_tensor_bytes=0),
        causes=(Cause("other_process", "Process 20417 holds 1.10 GiB of this GPU."),),
        fixes=(
            Fix(
                "batch",
                "Halve the batch size",
                "Activations scale with the batch.",
                "args.per_device_train_batch_size = 2",
            ),
        ),
    )


NO_GPU = Snapshot(
    gpus=(),
    cpu=CPU,
    problems=("torch.cuda.is_available() is False (CPU-only torch build)", "NVML library not found"),
)


# --- text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "unknown"),
        (0, "0 B"),
        (512, "512 B"),
        (3 * GiB, "3.00 GiB"),
        (518 * MiB, "518.00 MiB"),
        (1707249500, "1.59 GiB"),
        (43054531, "41.06 MiB"),
        (2 * 2**40, "2.00 TiB"),
    ],
)
def test_format_bytes(n: int | None, text: str) -> None:
    assert format_bytes(n) == text


def test_summary_line_capped_load() -> None:
    assert summary_line(capped_report()) == (
        "CUDA out of memory in a model load: asked for 1.59 GiB with 0 B free under a 1.50 GiB cap; "
        "freed 3.00 GiB."
    )


def test_summary_line_other_process_says_nothing_freed_and_no_cap() -> None:
    assert summary_line(other_report()) == (
        "CUDA out of memory in a training step: asked for 172.00 MiB with 41.06 MiB free."
    )


def test_summary_line_without_parsed_figures() -> None:
    r = capped_report(oom=None, cleanup=Cleanup((), None, 0))
    assert summary_line(r) == "Out of memory in a model load."


def test_report_text_figures_and_sections_in_order() -> None:
    text = render_report(capped_report())
    lines = text.splitlines()
    assert lines[0].startswith("CUDA out of memory in a model load")
    for label, value in [
        ("requested", "1.59 GiB"),
        ("free on the GPU", "75.57 GiB"),
        ("total", "79.18 GiB"),
        ("allowed (cap)", "1.50 GiB"),
        ("PyTorch allocated", "3.00 GiB"),
        ("reserved but unallocated", "0 B"),
        ("this process", "3.60 GiB"),
    ]:
        assert any(ln.split() == [*label.split(), *value.split()] for ln in lines), (label, value)
    assert "other processes" not in text  # the capped message names none
    assert "Freed 3.00 GiB held by the failed cell (released: sys.last_traceback, InteractiveTB.tb)." in text
    assert "Failed at line 4 of a model load cell:" in text
    other = CellAnalysis(kind="other", failed_line=2, failed_statement="x = f()")
    assert "Failed at line 2 of the cell:" in render_report(capped_report(analysis=other))
    assert "Failed at line 2 of the cell:" in rw._failed_html(capped_report(analysis=other))
    assert "    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)" in lines
    order = [
        "Memory when it failed (GPU 0)",
        "Freed",
        "Failed at",
        "What holds memory",
        "Why",
        "Fixes",
        "Notes",
        "Details",
    ]
    positions = [text.index(word) for word in order]
    assert positions == sorted(positions)
    assert text.rstrip().endswith("\n  OutOfMemoryError: CUDA out of memory. Tried to allocate 1.59 GiB.")
    assert text.count("Tried to allocate 1.59 GiB.") == 1  # the error is not repeated after its traceback
    assert "\x1b" not in text


def test_report_text_other_process_pid_and_unknowns_omitted() -> None:
    text = render_report(other_report())
    assert "pid 20417: 1.10 GiB" in text
    assert "172.00 MiB" in text and "41.06 MiB" in text and "14.75 GiB" in text
    assert "reserved but unallocated" in text and "455.37 MiB" in text
    assert "allowed" not in text and "unknown" not in text
    assert "Freed" not in text  # nothing was freed, so no claim that something was
    error = "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 172.00 MiB."
    assert text.endswith(f"Details\n  {error}")  # no traceback: the error itself closes the report


def test_report_text_numbers_fixes_and_indents_code() -> None:
    lines = render_report(capped_report()).splitlines()
    assert (
        "Fixes (most promising first; run one with %vram fix N, see its change with %vram fix N --diff)"
        in lines
    )
    assert "  1. Load in 4-bit (NF4)" in lines
    assert "  2. Offload layers to CPU (by hand)" in lines  # advice only: it has no cell to run
    i = lines.index("  1. Load in 4-bit (NF4)")
    assert lines[i + 1] == "     Weights shrink to about a quarter."
    assert lines[i + 2] == "       from transformers import BitsAndBytesConfig"
    assert lines[i + 4] == "           path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))"
    assert "  1. The model needs 1.59 GiB in bf16, more than the 1.50 GiB cap allows." in lines
    assert "  2. base_model and peft_model still hold a copy of the weights." in lines


def test_report_text_holders_by_name_with_sharing() -> None:
    lines = render_report(capped_report()).splitlines()
    base = next(ln for ln in lines if ln.strip().startswith("base_model "))
    assert base.split()[:3] == ["base_model", "LlamaForCausalLM", "1.59"]
    assert base.endswith("shares 1.59 GiB with peft_model")
    cache = next(ln for ln in lines if ln.strip().startswith("cache "))
    assert "518.00 MiB" in cache and "shares" not in cache


def test_details_text_does_not_repeat_the_error_after_its_traceback() -> None:
    assert details_text(capped_report()) == TRACEBACK  # it ends with the error already
    error = "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 172.00 MiB."
    assert details_text(other_report()) == error  # no traceback: the error alone
    elsewhere = capped_report(traceback_text="Cell In[3], line 4\n----> 4 model = load()")
    assert details_text(elsewhere) == f"Cell In[3], line 4\n----> 4 model = load()\n{elsewhere.error_text}"


def test_render_holders_for_vram_who() -> None:
    text = render_holders(capped_report().holders, "cuda")
    lines = text.splitlines()
    assert lines[0] == "Names holding cuda memory"
    assert [ln.split()[0] for ln in lines[1:]] == ["base_model", "peft_model", "cache"]
    assert lines[2].endswith("shares 1.59 GiB with base_model")
    assert render_holders((), "cuda") == "No name in the notebook holds cuda memory."


def test_render_cleanup_for_vram_free() -> None:
    assert render_cleanup(Cleanup(("model",), 3 * GiB, 0)) == "Freed 3.00 GiB (released: model)."
    assert render_cleanup(Cleanup((), None, 518 * MiB)) == "Freed 518.00 MiB."  # no CUDA: tensors seen dying
    nothing = render_cleanup(Cleanup(("sys.last_value",), 0, 0))
    assert nothing == "Nothing was freed (released: sys.last_value)."


def test_snapshot_text_capped_gpu_with_remainder() -> None:
    text = render_snapshot(Snapshot(gpus=(H100,), cpu=CPU))
    lines = text.splitlines()
    assert lines[0] == "GPU 0: NVIDIA H100 80GB HBM3"
    assert any(ln.split() == ["total", "79.18", "GiB"] for ln in lines)
    assert any(ln.split() == ["free", "78.66", "GiB"] for ln in lines)
    assert any(ln.split() == ["this", "process", "518.00", "MiB"] for ln in lines)
    assert any(ln.split() == ["non-PyTorch", "518.00", "MiB"] for ln in lines)
    others = next(ln for ln in lines if ln.strip().startswith("other processes"))
    assert others.split() == [
        "other",
        "processes",
        "14.48",
        "MiB",
        "(remainder:",
        "total",
        "-",
        "free",
        "-",
        "this",
        "process)",
    ]
    assert any(ln.split() == ["cap", "on", "this", "process", "1.50", "GiB"] for ln in lines)
    assert "CPU RAM" in lines
    assert any(ln.split() == ["this", "process", "(RSS)", "2.50", "GiB"] for ln in lines)
    assert any(ln.split() == ["available", "100.00", "GiB", "of", "125.00", "GiB"] for ln in lines)


def test_snapshot_text_lists_other_processes_by_pid() -> None:
    text = render_snapshot(Snapshot(gpus=(T4,), cpu=CPU, problems=("psutil not installed",)))
    lines = text.splitlines()
    assert any(ln.split() == ["pid", "20417", "1.10", "GiB"] for ln in lines)
    assert "remainder" not in text and "cap" not in text
    assert "  - psutil not installed" in lines


def test_snapshot_text_without_gpus_names_the_missing_piece() -> None:
    text = render_snapshot(NO_GPU)
    paragraph = text.split("\n\n")[0].replace("\n", " ")
    assert paragraph.startswith("No GPU figures: torch.cuda.is_available() is False")
    assert "NVML library not found" in paragraph
    assert "%%oomsafe still catches out-of-memory errors" in paragraph
    assert "GPU 0" not in text
    assert "CPU RAM" in text and "100.00 GiB of 125.00 GiB" in text
    assert str(NO_GPU) == text


# --- widgets -------------------------------------------------------------------------------------


def walk(widget: Any) -> list[Any]:
    found = [widget]
    for child in getattr(widget, "children", ()):
        found += walk(child)
    return found


def html_of(widget: Any) -> str:
    return "\n".join(w.value for w in walk(widget) if type(w).__name__ == "HTML")


def test_report_widget_tree() -> None:
    ipywidgets = pytest.importorskip("ipywidgets")
    r = capped_report()
    view = rw.report_widget(r)
    assert isinstance(view, ipywidgets.VBox)
    first = view.children[0]
    assert first.value == f'<div style="line-height:1.4"><b>{summary_line(r)}</b></div>'
    html = html_of(view)
    assert "GPU 0 when it failed" in html and "vram-cap" in html
    assert "<li>The model needs 1.59 GiB in bf16" in html
    assert "<b>1. Load in 4-bit (NF4)</b>" in html and "<b>2. Offload layers to CPU</b>" in html
    assert "peft_model</code> (1.59 GiB)" in html
    accordions = [w for w in walk(view) if isinstance(w, ipywidgets.Accordion)]
    assert len(accordions) == 1 and accordions[0].titles == ("Details",)
    details = html_of(accordions[0])
    assert "Tried to allocate 1.59 GiB" in details and "caching_allocator_warmup" in details


def html_values(widget: Any) -> list[str]:
    return [w.value for w in walk(widget) if type(w).__name__ == "HTML"]


def test_widgets_follow_the_theme_with_light_fallbacks() -> None:
    pytest.importorskip("ipywidgets")
    r = capped_report(causes=(Cause("stale", "`old_model` still holds 64.00 MiB."),))
    html = html_of(rw.report_widget(r)) + html_of(rw.snapshot_widget(Snapshot(gpus=(H100,), cpu=CPU)))
    for variable in (
        "var(--jp-layout-color2,#f6f6f6)",
        "var(--jp-content-font-color2,#444)",
        "var(--jp-border-color1,#999)",
        "var(--jp-ui-font-color0,#000)",
    ):
        assert variable in html, variable
    bare = re.sub(r"var\([^)]*\)", "", html)  # colours left outside a theme variable
    for colour in ("#f6f6f6", "#444", "#555", "#000", "#999"):
        assert colour not in bare, colour


def test_every_html_value_has_a_readable_line_height() -> None:
    pytest.importorskip("ipywidgets")
    views = [
        rw.report_widget(capped_report()),
        rw.report_widget(other_report()),
        rw.snapshot_widget(Snapshot(gpus=(T4,), cpu=CPU, problems=("psutil not installed",))),
        rw.snapshot_widget(NO_GPU),
    ]
    for view in views:
        for value in html_values(view):
            assert value.startswith('<div style="line-height:1.4'), value[:80]


def test_code_keeps_its_lines_and_messages_wrap_between_words() -> None:
    pytest.importorskip("ipywidgets")
    view = rw.report_widget(capped_report())
    pres = re.findall(r'<pre style="([^"]*)">', html_of(view))
    assert len(pres) == 4  # the failed statement, two fixes' code, and the details
    code, text = pres[:3], pres[3]
    for style in code:
        assert "white-space:pre;" in style and "overflow-x:auto" in style, style
    assert "white-space:pre-wrap" in text and "word-break:normal" in text and "overflow-wrap:anywhere" in text


def test_backticked_names_become_code() -> None:
    pytest.importorskip("ipywidgets")
    r = capped_report(
        causes=(Cause("stale", "`old_model` (Linear) still holds 64.00 MiB; `a<b` too."),),
        fixes=(
            Fix("free", "Free `old_model`, then run the cell again", "Frees `old_model`.", "del old_model"),
        ),
        notes=("Set `PYTORCH_CUDA_ALLOC_CONF` first.",),
    )
    html = html_of(rw.report_widget(r))
    prose = re.sub(r"<pre.*?</pre>", "", html, flags=re.S)  # code blocks keep what they say
    assert "`" not in prose
    code = re.compile(r"<code[^>]*>([^<]*)</code>")
    assert code.findall(html).count("old_model") >= 3  # the cause, the fix title and its why
    assert "a&lt;b" in code.findall(html)  # escaped first, then made code
    assert "PYTORCH_CUDA_ALLOC_CONF" in code.findall(html)
    assert re.search(r"<b>1\. Free <code[^>]*>old_model</code>, then run the cell again</b>", html)


def test_holders_table_has_a_header_row_and_padding() -> None:
    pytest.importorskip("ipywidgets")
    html = html_of(rw.report_widget(capped_report()))
    table = html[html.index("<table") : html.index("</table>")]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert headers == ["name", "type", "size", "shared with"]
    assert "<thead>" in table and table.count("<tr>") == 4  # the header and three holders
    assert all("padding:" in style for style in re.findall(r'<t[dh] style="([^"]*)"', table))


def test_report_widget_details_show_the_error_once() -> None:
    ipywidgets = pytest.importorskip("ipywidgets")
    for r, once in (
        (capped_report(), "Tried to allocate 1.59 GiB."),
        (other_report(), "Tried to allocate 172.00 MiB."),
    ):
        accordion = next(w for w in walk(rw.report_widget(r)) if isinstance(w, ipywidgets.Accordion))
        assert html_of(accordion).count(once) == 1, r.error_text


def test_sections_share_one_heading_and_list_spacing() -> None:
    pytest.importorskip("ipywidgets")
    html = html_of(rw.report_widget(capped_report()))
    headings = re.findall(r'<div style="([^"]*)"><b>(What holds|Why|Fixes|Notes|GPU 0)', html)
    assert len(headings) == 5 and len({style for style, _ in headings}) == 1
    lists = re.findall(r'<[ou]l style="([^"]*)">', html)
    assert len(lists) == 2 and len(set(lists)) == 1


def test_fix_row_escapes_code_and_is_a_box() -> None:
    ipywidgets = pytest.importorskip("ipywidgets")
    fix = Fix("x", "Use <auto> placement", "Because a < b & c", "if free < 2 * 2**30:\n    x = '<cpu>'")
    row = rw.fix_row(3, fix)
    assert isinstance(row, ipywidgets.Box)
    html = html_of(row)
    assert "<b>3. Use &lt;auto&gt; placement</b>" in html
    assert "a &lt; b &amp; c" in html
    assert "if free &lt; 2 * 2**30:" in html and "&#x27;&lt;cpu&gt;&#x27;" in html
    assert "free < 2" not in html and "<auto>" not in html


def test_report_widget_escapes_every_text() -> None:
    pytest.importorskip("ipywidgets")
    r = capped_report(
        holders=(Holder("<lambda>", "dict[str, <Tensor>]", GiB),),
        causes=(Cause("k", "x < y"),),
        traceback_text="File <ipython-input-1>",
    )
    html = html_of(rw.report_widget(r))
    assert "&lt;lambda&gt;" in html and "&lt;Tensor&gt;" in html and "x &lt; y" in html
    assert "&lt;ipython-input-1&gt;" in html
    assert "<lambda>" not in html and "<ipython-input-1>" not in html


def test_snapshot_widget_bar_segments_and_cap() -> None:
    pytest.importorskip("ipywidgets")
    html = html_of(rw.snapshot_widget(Snapshot(gpus=(T4,), cpu=CPU)))
    assert "Tesla T4" in html
    assert 'title="PyTorch allocated: 12.91 GiB"' in html
    assert 'title="other processes: 1.10 GiB"' in html and "pid 20417: 1.10 GiB" in html
    assert "vram-cap" not in html  # no cap set on this GPU
    capped = html_of(rw.snapshot_widget(Snapshot(gpus=(H100,), cpu=CPU)))
    assert "vram-cap" in capped and "cap on this process 1.50 GiB" in capped


def test_bar_segments_have_a_minimum_width_and_fill_the_bar() -> None:
    pytest.importorskip("ipywidgets")
    tiny = GpuSnapshot(
        index=0,
        name=None,
        total_bytes=100 * GiB,
        free_bytes=MiB,  # far under a pixel in proportion
        allocated_bytes=90 * GiB,
        reserved_bytes=90 * GiB,
        process_bytes=90 * GiB,
        others_bytes=5 * GiB,
    )
    html = rw.bar_html(tiny)
    segments = re.findall(r'<div title="([^"]*)" style="flex:([0-9.]+) 1 0px;min-width:3px;', html)
    assert [title.split(":")[0] for title, _ in segments] == ["PyTorch allocated", "other processes", "free"]
    grow = [float(g) for _, g in segments] + [
        float(g) for g in re.findall(r'<div style="flex:([0-9.]+) 1 0px;">', html)
    ]
    assert sum(grow) == pytest.approx(100, abs=0.01)  # the unaccounted remainder is a spacer: the bar is full


def test_snapshot_widget_without_gpus_explains() -> None:
    pytest.importorskip("ipywidgets")
    html = html_of(rw.snapshot_widget(NO_GPU))
    assert "NVML library not found" in html and "CPU RAM" in html
    assert re.search(r"<code[^>]*>%%oomsafe</code> still catches", html)


# --- the bundle ----------------------------------------------------------------------------------


def test_mimebundle_with_widgets_carries_our_text(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ipywidgets")
    monkeypatch.setattr(rw, "widget_frontend", lambda: True)
    r = capped_report()
    bundle = r._repr_mimebundle_()
    assert bundle[WIDGET_VIEW]["model_id"]
    assert bundle["text/plain"] == render_report(r) == str(r)
    snap = Snapshot(gpus=(H100,), cpu=CPU)
    bundle = snap._repr_mimebundle_()
    assert WIDGET_VIEW in bundle and bundle["text/plain"] == render_snapshot(snap)


def test_mimebundle_without_widgets_is_text_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_widgets(_: object) -> None:
        raise AssertionError("a widget was built without a widget frontend")

    monkeypatch.setattr(rw, "widget_frontend", lambda: False)
    monkeypatch.setattr(rw, "report_widget", no_widgets)
    monkeypatch.setattr(rw, "snapshot_widget", no_widgets)
    r = other_report()
    assert rw.mimebundle(r) == {"text/plain": render_report(r)}
    assert NO_GPU._repr_mimebundle_() == {"text/plain": render_snapshot(NO_GPU)}


def test_fix_buttons_have_tooltips_and_a_readable_insert_label() -> None:
    import ipywidgets as w

    fix = Fix("half-batch", "Halve the batch", "why", "--- cell", rewritten_cell="batch_size = 4\n")
    row = rw.fix_row(2, fix, rerun=lambda number: None)
    bar = next(c for c in row.children if isinstance(c, w.HBox))
    buttons = [c for c in bar.children if isinstance(c, (w.Button, w.ToggleButton))]
    assert [b.description for b in buttons] == ["Re-run", "Diff", "Insert as new cell"]
    assert all(b.tooltip for b in buttons)
    assert buttons[2].layout.width == "auto"
