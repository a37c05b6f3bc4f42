"""Out-of-memory detection and message parsing, against every message in tests/fixtures/oom_messages/."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from vram_magic._oom import exception_text, is_oom, oom_from_exception, parse_oom_message
from vram_magic._types import OOMInfo

FIXTURES = Path(__file__).parent / "fixtures" / "oom_messages"
FIELDS = (
    "kind",
    "device_index",
    "requested_bytes",
    "total_bytes",
    "free_bytes",
    "allocated_bytes",
    "reserved_bytes",
    "process_bytes",
    "allowed_bytes",
)


def _expected() -> dict[str, dict[str, Any]]:
    expected: dict[str, dict[str, Any]] = {}
    for name in ("expected.json", "expected_extra.json"):
        for file_name, values in json.loads((FIXTURES / name).read_text()).items():
            assert file_name not in expected, f"{file_name} is described twice"
            expected[file_name] = values
    return expected


EXPECTED = _expected()
CASES = sorted(EXPECTED)
OOM_CASES = [name for name in CASES if EXPECTED[name]["oom"]]


def _text(name: str) -> str:
    return (FIXTURES / name).read_text()


def _message(text: str) -> str:
    """The exception's own message: the text without its leading "TypeName: "."""
    match = re.match(r"[\w.]+: ", text)
    assert match, "every fixture starts with the exception type, as a user sees it"
    return text[match.end() :]


def test_every_fixture_file_has_expected_values_and_the_reverse() -> None:
    on_disk = {path.name for path in FIXTURES.glob("*.txt")}
    assert on_disk == set(EXPECTED)
    # the shared set is copied whole, so this suite stands alone
    shared = Path(__file__).parents[2] / "shared" / "oom-messages"
    if shared.is_dir():
        for path in shared.iterdir():
            assert (FIXTURES / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("name", CASES)
def test_is_oom_on_runtime_and_value_errors_follows_the_message(name: str) -> None:
    message = _message(_text(name))
    assert is_oom(RuntimeError(message)) is EXPECTED[name]["oom"]
    assert is_oom(ValueError(message)) is EXPECTED[name]["oom"]


@pytest.mark.parametrize("name", CASES)
def test_a_torch_oom_is_an_oom_whatever_it_says(name: str) -> None:
    # except when the kernel ran out of shared memory ("out of resource: ..."), which torch also raises as one
    exc = torch.OutOfMemoryError(_message(_text(name)))
    if not EXPECTED[name].get("oom_as_torch_oom", True):
        assert not is_oom(exc)
        return
    assert is_oom(exc) is True
    info = oom_from_exception(exc)
    assert info is not None
    assert info.message == exception_text(exc)
    assert info.message.startswith("torch.OutOfMemoryError: ")


@pytest.mark.parametrize("name", CASES)
def test_parse_reads_every_field(name: str) -> None:
    text = _text(name)
    expected = EXPECTED[name]
    info = parse_oom_message(text)
    if not expected["oom"]:
        assert info is None
        return
    assert info is not None
    assert info.message == text
    for field in FIELDS:
        assert getattr(info, field) == expected.get(field), field
    assert [list(pair) for pair in info.other_processes] == expected.get("other_processes", [])


@pytest.mark.parametrize("name", OOM_CASES)
def test_oom_from_exception_matches_parsing_the_text(name: str) -> None:
    message = _message(_text(name))
    exc = RuntimeError(message)
    assert oom_from_exception(exc) == parse_oom_message("RuntimeError: " + message)


def test_torch2_reserved_is_allocated_plus_reserved_but_unallocated() -> None:
    info = parse_oom_message(_text("torch2_1_other_process.txt"))
    assert info is not None
    assert info.unallocated_reserved_bytes == round(455.37 * 2**20)


def test_mps_sizes_in_gb_are_binary_units() -> None:
    info = parse_oom_message(_text("mps_watermark_gb.txt"))
    assert info is not None
    assert info.requested_bytes == 256 * 2**20
    assert info.allowed_bytes == round(18.13 * 2**30)


def test_missing_values_are_none_never_minus_one() -> None:
    info = parse_oom_message(_text("cuda_error_out_of_memory.txt"))
    assert info == OOMInfo(kind="cuda", message=_text("cuda_error_out_of_memory.txt"))


def test_parse_needs_no_type_name() -> None:
    text = _text("torch2_11_h100_capped.txt")
    with_name = parse_oom_message(text)
    without_name = parse_oom_message(_message(text))
    assert with_name is not None and without_name is not None
    assert without_name.allowed_bytes == with_name.allowed_bytes == 4 * 2**30


def _oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(_message(_text("torch2_11_h100_plain.txt")))


def test_explicit_cause_is_followed() -> None:
    try:
        try:
            raise _oom()
        except torch.OutOfMemoryError as oom:
            raise RuntimeError("wrapper") from oom
    except RuntimeError as wrapper:
        caught = wrapper
    assert is_oom(caught)
    info = oom_from_exception(caught)
    assert info is not None and info.requested_bytes == 200 * 2**30


def test_implicit_context_is_followed() -> None:
    try:
        try:
            raise RuntimeError(_message(_text("seed_qlora_torch1.txt")))
        except RuntimeError:
            raise KeyError("while handling it") from None
    except KeyError as outer:
        caught = outer
    assert caught.__cause__ is None and caught.__context__ is not None
    assert is_oom(caught)
    info = oom_from_exception(caught)
    assert info is not None and info.total_bytes == 16 * 2**30
    # Unless the notebook's own code caught the OOM: what its handler raised is a failure of its own.
    assert oom_from_exception(caught, caught_by_user=lambda error: error is caught.__context__) is None


def test_a_chain_without_oom_is_not_oom() -> None:
    inner = RuntimeError(_message(_text("not_oom_device_assert.txt")))
    outer = ValueError("wrapper")
    outer.__cause__ = inner
    assert not is_oom(outer)
    assert oom_from_exception(outer) is None


def _within_seconds(seconds: float, call: Callable[[], bool]) -> bool | None:
    """``call()``, or None when it is still running after ``seconds`` (a hang fails instead of blocking)."""
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else None


def test_a_cycle_in_context_ends() -> None:
    first = RuntimeError("first")
    second = ValueError("second")
    first.__context__ = second
    second.__context__ = first
    assert _within_seconds(5, lambda: is_oom(first)) is False
    oom = RuntimeError(_message(_text("torch2_11_h100_plain.txt")))
    third = ValueError("third")
    second.__cause__ = third
    third.__context__ = oom
    oom.__context__ = first
    assert _within_seconds(5, lambda: is_oom(first)) is True


def test_the_first_oom_in_the_chain_is_reported() -> None:
    outer = RuntimeError(_message(_text("seed_from_pretrained_torch1.txt")))
    outer.__context__ = _oom()
    info = oom_from_exception(outer)
    assert info is not None and info.total_bytes == round(11.17 * 2**30)


def test_a_torch_oom_with_an_odd_message_is_an_oom_of_kind_cuda() -> None:
    exc = torch.OutOfMemoryError("allocation refused")
    assert is_oom(exc)
    expected = OOMInfo(kind="cuda", message="torch.OutOfMemoryError: allocation refused")
    assert oom_from_exception(exc) == expected
    assert is_oom(torch.cuda.OutOfMemoryError())


def test_a_torch_oom_raised_for_kernel_shared_memory_is_not_an_oom() -> None:
    exc = torch.OutOfMemoryError(
        "out of resource: triton_tem_fused_0 Required: 147456 Hardware limit:101376 "
        "Reducing block sizes or `num_stages` may help."
    )
    assert not is_oom(exc)


def test_a_class_named_like_torchs_is_not_an_oom_by_type() -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    assert not is_oom(OutOfMemoryError("allocation refused"))


def test_host_memory_error_is_a_cpu_oom() -> None:
    info = oom_from_exception(MemoryError())
    assert info == OOMInfo(kind="cpu", message="MemoryError")


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(1)])
def test_interrupt_and_exit_are_never_oom(exc: BaseException) -> None:
    exc.__context__ = _oom()
    assert not is_oom(exc)
    assert oom_from_exception(exc) is None


def test_exception_text_names_the_type_as_tracebacks_do() -> None:
    assert exception_text(RuntimeError("boom")) == "RuntimeError: boom"
    assert exception_text(torch.OutOfMemoryError("boom")) == "torch.OutOfMemoryError: boom"
    assert exception_text(ValueError()) == "ValueError"
    assert exception_text(KeyError("x")) == "KeyError: 'x'"
    text = _text("cublas_alloc_failed.txt")
    assert exception_text(RuntimeError(_message(text))) == text


def test_exception_text_survives_a_broken_str() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise TypeError("no")

    assert exception_text(Broken()).endswith("Broken: <exception str() failed>")


def _run_fresh(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_importing_the_module_imports_neither_torch_nor_ipython() -> None:
    out = _run_fresh(
        "import sys, vram_magic._oom\nprint(sorted(m for m in ('torch', 'IPython') if m in sys.modules))"
    )
    assert out == "[]"


def test_detection_by_message_works_without_torch_and_does_not_import_it() -> None:
    message = _message(_text("torch2_1_other_process.txt"))
    out = _run_fresh(
        "import sys\nfrom vram_magic._oom import is_oom\n"
        f"print(is_oom(RuntimeError({message!r})), is_oom(RuntimeError('boom')), 'torch' in sys.modules)"
    )
    assert out == "True False False"


def test_numpys_unable_to_allocate_is_a_cpu_oom_with_its_size() -> None:
    text = (
        "numpy._core._exceptions._ArrayMemoryError: Unable to allocate 728. TiB for an array with shape "
        "(100000000000000,) and data type float64"
    )
    info = parse_oom_message(text)
    assert info is not None and info.kind == "cpu"
    assert info.requested_bytes == 728 * 2**40


def test_an_error_the_users_handler_raises_from_an_oom_is_not_the_oom() -> None:
    import torch

    def handled_by_the_user(error: BaseException) -> bool:
        return isinstance(error, torch.OutOfMemoryError)

    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError as oom:
            raise ValueError("pick a smaller model") from oom
    except ValueError as error:
        assert oom_from_exception(error, caught_by_user=handled_by_the_user) is None
        assert oom_from_exception(error) is not None  # a library's `raise ... from` still counts
