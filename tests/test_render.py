"""What a user reads: a report and a snapshot as text, as static HTML, as a widget, and the display bundle
that carries them. Everything goes through the public surface (``str()``, ``_repr_mimebundle_`` and
``vram_magic.render``), with causes and fixes as the diagnosis makes them: keys and figures."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import vram_magic.render as render
from vram_magic import (
    Cause,
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
from vram_magic._types import Attempt, CellAnalysis, Preflight, facts
from vram_magic._units import format_bytes

GiB = 2**30
MiB = 2**20
OOM_DIR = Path(__file__).parent / "fixtures" / "oom_messages"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

CPU = CpuMemory(total_bytes=125 * GiB, available_bytes=100 * GiB, process_rss_bytes=int(2.5 * GiB))

# torch2_11_h100_from_pretrained_capped.txt, figures as expected.json reads them.
CAPPED_OOM = OOMInfo(
    kind="cuda",
    message=(OOM_DIR / "torch2_11_h100_from_pretrained_capped.txt").read_text().strip(),
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
FOUR_BIT = Fix(
    "4bit",
    "from transformers import BitsAndBytesConfig\n"
    "model = AutoModelForCausalLM.from_pretrained(\n"
    "    path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))",
    rewritten_cell="model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q)\n",
    change=facts(model=None, count=1),
)
OFFLOAD_ADVICE = Fix("offload", "if torch.cuda.mem_get_info()[0] < 2 * 2**30:\n    device_map = 'auto'")


def holder_cause(name: str, type_name: str, size: int, staying: tuple[str, ...] = ()) -> Cause:
    return Cause(
        "holder", facts(name=name, type_name=type_name, total_bytes=size, rebound=False, staying=staying)
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
            Cause("cap", facts(cap=1610612736)),
            holder_cause("base_model", "LlamaForCausalLM", int(1.59 * GiB), ("peft_model",)),
        ),
        fixes=(FOUR_BIT, OFFLOAD_ADVICE),
        traceback_text=TRACEBACK,
    )
    fields.update(changes)
    return Report(**fields)


# torch2_1_other_process.txt: another process holds 1.10 GiB of a T4.
OTHER_OOM = OOMInfo(
    kind="cuda",
    message=(OOM_DIR / "torch2_1_other_process.txt").read_text().strip(),
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
        causes=(Cause("other-process", facts(pid=20417, used_bytes=1181116006)),),
        fixes=(Fix("half-batch", "args.per_device_train_batch_size = 2"),),
    )


NO_GPU = Snapshot(
    gpus=(),
    cpu=CPU,
    problems=("torch.cuda.is_available() is False (CPU-only torch build)", "NVML library not found"),
)


def html_report(report: Report) -> str:
    return str(report._repr_mimebundle_(include={"text/html"})["text/html"])


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
    assert render.summary_line(capped_report()) == (
        "CUDA out of memory in a model load: asked for 1.59 GiB with 0 B free under a 1.50 GiB cap; "
        "freed 3.00 GiB."
    )


def test_summary_line_other_process_says_nothing_freed_and_no_cap() -> None:
    assert render.summary_line(other_report()) == (
        "CUDA out of memory in a training step: asked for 172.00 MiB with 41.06 MiB free."
    )


def test_summary_line_without_parsed_figures() -> None:
    r = capped_report(oom=None, cleanup=Cleanup((), None, 0))
    assert render.summary_line(r) == "Out of memory in a model load."


def test_report_text_figures_and_sections_in_order() -> None:
    text = str(capped_report())
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
    assert "Failed at line 2 of the cell:" in str(capped_report(analysis=other))
    assert "Failed at line 2 of the cell:" in html_report(capped_report(analysis=other))
    assert "    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)" in lines
    order = [
        "Memory when it failed (GPU 0)",
        "Freed",
        "Failed at",
        "What holds memory",
        "Why",
        "Fixes",
        "Details",
    ]
    positions = [text.index(word) for word in order]
    assert positions == sorted(positions)
    assert text.rstrip().endswith("\n  OutOfMemoryError: CUDA out of memory. Tried to allocate 1.59 GiB.")
    assert text.count("Tried to allocate 1.59 GiB.") == 1  # the error is not repeated after its traceback
    assert "\x1b" not in text


def test_report_text_other_process_pid_and_unknowns_omitted() -> None:
    text = str(other_report())
    assert "pid 20417: 1.10 GiB" in text
    assert "172.00 MiB" in text and "41.06 MiB" in text and "14.75 GiB" in text
    assert "reserved but unallocated" in text and "455.37 MiB" in text
    assert "allowed" not in text and "unknown" not in text
    assert "Freed" not in text  # nothing was freed, so no claim that something was
    assert "  1. Process 20417 holds 1.10 GiB on this GPU (another program)." in text.splitlines()
    error = "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 172.00 MiB."
    assert text.endswith(f"Details\n  {error}")  # no traceback: the error itself closes the report


def test_report_text_numbers_fixes_and_indents_code() -> None:
    lines = str(capped_report()).splitlines()
    assert (
        "Fixes (most promising first; run one with %vram fix N, see its change with %vram fix N --diff)"
        in lines
    )
    assert "  1. Load the model in 4-bit (NF4)" in lines
    assert "  2. Offload what does not fit to CPU RAM (by hand)" in lines  # advice: no cell to run
    i = lines.index("  1. Load the model in 4-bit (NF4)")
    assert (
        lines[i + 1]
        == "     A quarter of a 16-bit model's weights; the usual QLoRA setting; some quality loss."
    )
    assert lines[i + 2] == "       from transformers import BitsAndBytesConfig"
    assert lines[i + 4] == "           path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))"
    why = lines.index("Why")
    assert lines[why + 1].startswith("  1. A per-process cap of 1.50 GiB is set")
    assert lines[why + 3].startswith(
        "  2. `base_model` (LlamaForCausalLM) from an earlier cell still holds 1.59"
    )


def test_what_the_checks_found_is_said_with_the_fix() -> None:
    too_big = Fix("8bit", "diff", rewritten_cell="x\n", needed_bytes=20 * GiB, fits=False)
    assert too_big.why.endswith("Estimated not to fit: needs about 20.00 GiB.")
    assert "LLM.int8 computes in float16" in too_big.why
    elsewhere = Fix("half-batch", "code", by_hand="the batch size is set in an earlier cell")
    assert elsewhere.why.endswith("(Apply it by hand: the batch size is set in an earlier cell.)")
    no_ram = Fix("cpu", "diff", fits=False, ram_bytes=(40 * GiB, 8 * GiB))
    assert "it needs about 40.00 GiB of CPU RAM and 8.00 GiB is free" in no_ram.why
    free = Fix(
        "free",
        "%vram free a b",
        free_names=("a", "b"),
        change=facts(freed_bytes=GiB, shortfall_bytes=2 * GiB),
    )
    assert free.title == "Free `a` and `b`, then run the cell again"
    assert (
        free.why == "Together they hold about 1.00 GiB that this cell does not need. "
        "Not enough alone: the cell was 2.00 GiB short."
    )


def test_a_half_batch_fix_says_its_sizes() -> None:
    def title(**change: Any) -> str:
        return Fix("half-batch", "", change=facts(**change)).title

    assert title(role="train", old=16, new=8, multiplier=2, accumulation=(1, 2)) == (
        "Halve the batch (16 → 8) and double gradient accumulation (1 → 2): the same effective batch"
    )
    assert title(role="train", old=3, new=1, multiplier=3, accumulation=True) == (
        "Shrink the batch (3 → 1) and multiply by 3 gradient accumulation: the same effective batch"
    )
    assert (
        title(role="eval", old=8, new=4, multiplier=2, accumulation=None)
        == "Halve the evaluation batch (8 → 4)"
    )
    assert title(role="inference", old=8, new=4, multiplier=2, accumulation=None).endswith(
        ": the same results, in more steps"
    )


def test_report_text_holders_by_name_with_sharing() -> None:
    lines = str(capped_report()).splitlines()
    base = next(ln for ln in lines if ln.strip().startswith("base_model "))
    assert base.split()[:3] == ["base_model", "LlamaForCausalLM", "1.59"]
    assert base.endswith("shares 1.59 GiB with peft_model")
    cache = next(ln for ln in lines if ln.strip().startswith("cache "))
    assert "518.00 MiB" in cache and "shares" not in cache


def test_details_do_not_repeat_the_error_after_its_traceback() -> None:
    def details(report: Report) -> str:
        return str(report).split("\nDetails\n", 1)[1]

    assert (
        details(capped_report()).count("Tried to allocate 1.59 GiB.") == 1
    )  # it ends with the error already
    error = "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 172.00 MiB."
    assert details(other_report()) == f"  {error}"  # no traceback: the error alone
    elsewhere = capped_report(traceback_text="Cell In[3], line 4\n----> 4 model = load()")
    assert details(elsewhere).splitlines()[-1] == f"  {elsewhere.error_text}"


def test_attempts_are_one_run_a_line() -> None:
    label = "Halve the batch (4 → 2) and double gradient accumulation (1 → 2): the same effective batch"
    attempts = (Attempt("the cell as written", 1.25, False), Attempt(label, 2.5, True))
    lines = str(replace(other_report(), attempts=attempts)).splitlines()
    assert "Attempts by --auto (2 runs, 3.8 s)" in lines
    assert "  1. the cell as written: out of memory (1.2 s)" in lines
    assert f"  2. {label}: worked (2.5 s)" in lines


def test_render_holders_for_vram_who() -> None:
    text = render.render_holders(capped_report().holders, "cuda")
    lines = text.splitlines()
    assert lines[0] == "Names holding cuda memory"
    assert [ln.split()[0] for ln in lines[1:]] == ["base_model", "peft_model", "cache"]
    assert lines[2].endswith("shares 1.59 GiB with base_model")
    assert render.render_holders((), "cuda") == "No name in the notebook holds cuda memory."


def test_render_cleanup_for_vram_free() -> None:
    assert render.render_cleanup(Cleanup(("model",), 3 * GiB, 0)) == "Freed 3.00 GiB (released: model)."
    assert (
        render.render_cleanup(Cleanup((), None, 518 * MiB)) == "Freed 518.00 MiB."
    )  # no CUDA: tensors seen dying
    nothing = render.render_cleanup(Cleanup(("sys.last_value",), 0, 0))
    assert nothing == "Nothing was freed (released: sys.last_value)."


def test_snapshot_text_capped_gpu_with_remainder() -> None:
    text = str(Snapshot(gpus=(H100,), cpu=CPU))
    lines = text.splitlines()
    assert lines[0] == "GPU 0: NVIDIA H100 80GB HBM3"
    assert any(ln.split() == ["total", "79.18", "GiB"] for ln in lines)
    assert any(ln.split() == ["free", "78.66", "GiB"] for ln in lines)
    assert any(ln.split() == ["this", "process", "518.00", "MiB"] for ln in lines)
    assert any(ln.split() == ["non-PyTorch", "518.00", "MiB"] for ln in lines)
    others = next(ln for ln in lines if ln.strip().startswith("other processes"))
    assert " ".join(others.split()) == "other processes 14.48 MiB (remainder: total - free - this process)"
    assert any(ln.split() == ["cap", "on", "this", "process", "1.50", "GiB"] for ln in lines)
    assert "CPU RAM" in lines
    assert any(ln.split() == ["this", "process", "(RSS)", "2.50", "GiB"] for ln in lines)
    assert any(ln.split() == ["available", "100.00", "GiB", "of", "125.00", "GiB"] for ln in lines)


def test_snapshot_text_lists_other_processes_by_pid() -> None:
    text = str(Snapshot(gpus=(T4,), cpu=CPU, problems=("psutil not installed",)))
    lines = text.splitlines()
    assert any(ln.split() == ["pid", "20417", "1.10", "GiB"] for ln in lines)
    assert "remainder" not in text and "cap" not in text
    assert "  - psutil not installed" in lines


def test_snapshot_text_without_gpus_names_the_missing_piece() -> None:
    text = str(NO_GPU)
    paragraph = " ".join(text.split("\n\n")[0].split())
    assert paragraph.startswith("No GPU figures: torch.cuda.is_available() is False")
    assert "NVML library not found" in paragraph
    assert "`%%oomsafe` still catches out-of-memory errors" in paragraph
    assert "GPU 0" not in text
    assert "CPU RAM" in text and "100.00 GiB of 125.00 GiB" in text


# --- static HTML -----------------------------------------------------------------------------------


def test_static_html_says_what_the_text_says() -> None:
    r = capped_report()
    html = html_report(r)
    assert html.startswith('<div style="line-height:1.4"><b>CUDA out of memory in a model load')
    for said in (
        "Memory when it failed (GPU 0)",
        "Freed 3.00 GiB held by the failed cell",
        "What holds memory",
    ):
        assert said in html, said
    assert "<li>A per-process cap of 1.50 GiB is set" in html
    assert "<b>1. Load the model in 4-bit (NF4)</b>" in html
    assert "<b>2. Offload what does not fit to CPU RAM</b> <i>(by hand)</i>" in html
    assert (
        "from transformers import BitsAndBytesConfig" in html
    )  # the fix's code is shown, not behind a button
    assert "<details><summary>Details</summary>" in html and "caching_allocator_warmup" in html
    assert "<script" not in html and "<button" not in html  # nothing that needs a live kernel


def test_static_html_of_a_snapshot_draws_the_bar() -> None:
    html = Snapshot(gpus=(H100,), cpu=CPU)._repr_mimebundle_(exclude={"text/plain"})["text/html"]
    assert "vram-cap" in html and "cap on this process 1.50 GiB" in html
    assert "CPU RAM" in html and "100.00 GiB of 125.00 GiB" in html


def test_every_section_has_a_readable_line_height() -> None:
    pytest.importorskip("ipywidgets")
    views = [
        render.report_widget(capped_report()),
        render.report_widget(other_report()),
        render.snapshot_widget(Snapshot(gpus=(T4,), cpu=CPU, problems=("psutil not installed",))),
        render.snapshot_widget(NO_GPU),
    ]
    for view in views:
        for value in html_values(view):
            assert value.startswith('<div style="line-height:1.4'), value[:80]
    pieces = re.findall(r'<div style="line-height:1\.4[^"]*">', html_report(capped_report()))
    assert len(pieces) == 8  # one per section


def test_html_follows_the_theme_with_light_fallbacks() -> None:
    r = capped_report(causes=(holder_cause("old_model", "Linear", 64 * MiB),))
    html = html_report(r) + Snapshot(gpus=(H100,), cpu=CPU)._repr_mimebundle_()["text/html"]
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


def test_code_keeps_its_lines_and_messages_wrap_between_words() -> None:
    pres = re.findall(r'<pre style="([^"]*)">', html_report(capped_report()))
    assert len(pres) == 4  # the failed statement, two fixes' code, and the details
    code, text = pres[:3], pres[3]
    for style in code:
        assert "white-space:pre;" in style and "overflow-x:auto" in style, style
    assert "white-space:pre-wrap" in text and "word-break:normal" in text and "overflow-wrap:anywhere" in text


def test_backticked_names_become_code() -> None:
    r = capped_report(
        causes=(holder_cause("old_model", "Linear", 64 * MiB, ("a<b",)),),
        fixes=(Fix("free", "del old_model", free_names=("old_model",), change=facts(freed_bytes=64 * MiB)),),
    )
    html = html_report(r)
    prose = re.sub(r"<pre.*?</pre>", "", html, flags=re.S)  # code blocks keep what they say
    assert "`" not in prose
    code = re.compile(r"<code[^>]*>([^<]*)</code>")
    assert code.findall(html).count("old_model") >= 2  # the cause and the fix title
    assert "a&lt;b" in code.findall(html)  # escaped first, then made code
    assert re.search(r"<b>1\. Free <code[^>]*>old_model</code>, then run the cell again</b>", html)


def test_holders_table_has_a_header_row_and_padding() -> None:
    html = html_report(capped_report())
    table = html[html.index("<table", html.index("What holds")) : html.rindex("</table>")]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert headers == ["name", "type", "size", "shared with"]
    assert "<thead>" in table and table.count("<tr>") == 4  # the header and three holders
    assert all("padding:" in style for style in re.findall(r'<t[dh] style="([^"]*)"', table))
    assert "peft_model</code> (1.59 GiB)" in table


def test_sections_share_one_heading_and_list_spacing() -> None:
    html = html_report(capped_report())
    headings = re.findall(r'<div style="([^"]*)"><b>(What holds|Why|Fixes|Memory when)', html)
    assert len(headings) == 4 and len({style for style, _ in headings}) == 1


def test_html_escapes_every_text() -> None:
    r = capped_report(
        holders=(Holder("<lambda>", "dict[str, <Tensor>]", GiB),),
        causes=(Cause("unknown", facts(message="x < y")),),
        fixes=(Fix("offload", "if free < 2 * 2**30:\n    x = '<cpu>'"),),
        traceback_text="File <ipython-input-1>",
    )
    html = html_report(r)
    assert "&lt;lambda&gt;" in html and "&lt;Tensor&gt;" in html and "x &lt; y" in html
    assert "&lt;ipython-input-1&gt;" in html
    assert "if free &lt; 2 * 2**30:" in html and "&#x27;&lt;cpu&gt;&#x27;" in html
    assert "<lambda>" not in html and "<ipython-input-1>" not in html and "free < 2" not in html


def test_bar_segments_and_cap() -> None:
    html = str(Snapshot(gpus=(T4,), cpu=CPU)._repr_mimebundle_()["text/html"])
    assert "Tesla T4" in html
    assert 'title="PyTorch allocated: 12.91 GiB"' in html
    assert 'title="other processes: 1.10 GiB"' in html and "pid 20417: 1.10 GiB" in html
    assert "vram-cap" not in html  # no cap set on this GPU


def test_bar_segments_have_a_minimum_width_and_fill_the_bar() -> None:
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
    html = str(Snapshot(gpus=(tiny,), cpu=CPU)._repr_mimebundle_()["text/html"])
    segments = re.findall(r'<div title="([^"]*)" style="flex:([0-9.]+) 1 0px;min-width:3px;', html)
    assert [title.split(":")[0] for title, _ in segments] == ["PyTorch allocated", "other processes", "free"]
    grow = [float(g) for _, g in segments] + [
        float(g) for g in re.findall(r'<div style="flex:([0-9.]+) 1 0px;">', html)
    ]
    assert sum(grow) == pytest.approx(100, abs=0.01)  # the unaccounted remainder is a spacer: the bar is full


def test_snapshot_html_without_gpus_explains() -> None:
    html = str(NO_GPU._repr_mimebundle_()["text/html"])
    assert "NVML library not found" in html and "CPU RAM" in html
    assert re.search(r"<code[^>]*>%%oomsafe</code> still catches", html)


# --- widgets -------------------------------------------------------------------------------------


def walk(widget: Any) -> list[Any]:
    found = [widget]
    for child in getattr(widget, "children", ()):
        found += walk(child)
    return found


def html_values(widget: Any) -> list[str]:
    return [w.value for w in walk(widget) if type(w).__name__ == "HTML"]


def html_of(widget: Any) -> str:
    return "\n".join(html_values(widget))


def test_report_widget_shows_the_sections_of_the_static_html() -> None:
    ipywidgets = pytest.importorskip("ipywidgets")
    r = capped_report()
    view = render.report_widget(r)
    assert isinstance(view, ipywidgets.VBox)
    assert view.children[0].value == f'<div style="line-height:1.4"><b>{render.summary_line(r)}</b></div>'
    html = html_of(view)
    assert "Memory when it failed (GPU 0)" in html and "vram-cap" in html
    assert "Freed 3.00 GiB held by the failed cell" in html
    assert "<li>A per-process cap of 1.50 GiB is set" in html
    assert (
        "<b>1. Load the model in 4-bit (NF4)</b>" in html
        and "<b>2. Offload what does not fit to CPU RAM</b>" in html
    )
    accordions = [w for w in walk(view) if isinstance(w, ipywidgets.Accordion)]
    assert len(accordions) == 1 and accordions[0].titles == ("Details",)
    details = html_of(accordions[0])
    assert details.count("Tried to allocate 1.59 GiB.") == 1 and "caching_allocator_warmup" in details


def test_fix_buttons_have_tooltips_and_a_readable_insert_label() -> None:
    import ipywidgets as w

    fix = Fix("half-batch", "--- cell", rewritten_cell="batch_size = 4\n")
    view = render.report_widget(replace(other_report(), fixes=(fix,)), rerun=print)
    bar = next(c for c in walk(view) if isinstance(c, w.HBox))
    buttons = [c for c in bar.children if isinstance(c, (w.Button, w.ToggleButton))]
    assert [b.description for b in buttons] == ["Re-run", "Diff", "Insert as new cell"]
    assert buttons[0].tooltip == fix.title and all(b.tooltip for b in buttons)
    assert buttons[2].layout.width == "auto"
    textarea = next(c for c in walk(view) if isinstance(c, w.Textarea))
    assert textarea.value == "%%oomsafe\nbatch_size = 4\n"


# --- the bundle ----------------------------------------------------------------------------------


def test_bundle_with_widgets_carries_our_text_and_html(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ipywidgets")
    monkeypatch.setattr(render, "widget_frontend", lambda: True)
    r = capped_report()
    bundle = r._repr_mimebundle_()
    assert bundle[WIDGET_VIEW]["model_id"]
    assert bundle["text/plain"] == str(r)
    assert bundle["text/html"] == html_report(r)
    snap = Snapshot(gpus=(H100,), cpu=CPU)
    bundle = snap._repr_mimebundle_()
    assert WIDGET_VIEW in bundle and bundle["text/plain"] == str(snap)


def test_bundle_without_widgets_builds_none(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_widgets(*_: object) -> None:
        raise AssertionError("a widget was built without a widget frontend")

    monkeypatch.setattr(render, "widget_frontend", lambda: False)
    monkeypatch.setattr(render, "report_widget", no_widgets)
    monkeypatch.setattr(render, "snapshot_widget", no_widgets)
    r = other_report()
    assert set(r._repr_mimebundle_()) == {"text/plain", "text/html"}
    assert set(NO_GPU._repr_mimebundle_()) == {"text/plain", "text/html"}


def test_bundle_honours_include_and_exclude(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_widgets(*_: object) -> None:
        raise AssertionError("a widget was built though it was not wanted")

    monkeypatch.setattr(render, "widget_frontend", lambda: True)
    monkeypatch.setattr(render, "report_widget", no_widgets)
    r = other_report()
    assert set(r._repr_mimebundle_(include={"text/plain"})) == {"text/plain"}
    assert set(r._repr_mimebundle_(exclude={WIDGET_VIEW, "text/html"})) == {"text/plain"}
    assert set(r._repr_mimebundle_(include={"text/html", WIDGET_VIEW}, exclude={WIDGET_VIEW})) == {
        "text/html"
    }


def test_a_preflight_on_a_gpu_says_the_room_is_what_this_process_can_still_use() -> None:
    """The room counts PyTorch's cached, unallocated blocks beside the driver's free memory: the line says
    what it is, not "free"."""
    report = capped_report(oom=None, preflight=Preflight(3 * GiB, 2 * GiB, on_gpu=True))
    assert render.summary_line(report) == (
        "Not run: the model load would need about 3.00 GiB at its peak, more than the 2.00 GiB this process "
        "can still use on this GPU."
    )
