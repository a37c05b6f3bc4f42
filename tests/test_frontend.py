"""widget_frontend(): live widgets only where they render. Colab and Kaggle are faked (cannot run here)."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Any

import IPython
import pytest

import vram_magic.render._frontend as fe
from vram_magic.render._frontend import widget_frontend


class ZMQInteractiveShell:
    """Stands in for ipykernel's shell: only the class name is checked."""


class ColabShell(ZMQInteractiveShell):
    pass


class TerminalInteractiveShell:
    pass


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VRAM_MAGIC_WIDGETS", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("google", "google.colab", "google.colab.output"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(fe, "_colab_ready", None)
    shell(monkeypatch, None)


def shell(monkeypatch: pytest.MonkeyPatch, obj: Any) -> None:
    monkeypatch.setattr(IPython, "get_ipython", lambda: obj)


def fake_colab(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[str]:
    calls: list[str] = []

    def enable_custom_widget_manager() -> None:
        calls.append("enable")
        if fail:
            raise RuntimeError("not in a Colab frontend")

    output = types.ModuleType("google.colab.output")
    output.enable_custom_widget_manager = enable_custom_widget_manager  # type: ignore[attr-defined]
    colab = types.ModuleType("google.colab")
    colab.output = output  # type: ignore[attr-defined]
    google = types.ModuleType("google")
    google.colab = colab  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    return calls


def test_no_shell_means_text() -> None:
    assert widget_frontend() is False


def test_terminal_ipython_means_text(monkeypatch: pytest.MonkeyPatch) -> None:
    shell(monkeypatch, TerminalInteractiveShell())
    assert widget_frontend() is False


def test_kernel_shell_means_widgets(monkeypatch: pytest.MonkeyPatch) -> None:
    shell(monkeypatch, ZMQInteractiveShell())
    assert widget_frontend() is True
    shell(monkeypatch, ColabShell())  # a subclass counts too
    assert widget_frontend() is True


def test_kernel_without_ipywidgets_means_text(monkeypatch: pytest.MonkeyPatch) -> None:
    shell(monkeypatch, ZMQInteractiveShell())
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import now raises ImportError
    assert widget_frontend() is False


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_env_override_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    shell(monkeypatch, ZMQInteractiveShell())
    monkeypatch.setenv("VRAM_MAGIC_WIDGETS", value)
    assert widget_frontend() is False


def test_env_override_on_without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAM_MAGIC_WIDGETS", "1")
    assert widget_frontend() is True


def test_kaggle_batch_means_text_and_interactive_widgets(monkeypatch: pytest.MonkeyPatch) -> None:
    shell(monkeypatch, ZMQInteractiveShell())
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert widget_frontend() is False
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert widget_frontend() is True


def test_colab_enables_custom_widget_manager_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_colab(monkeypatch)
    shell(monkeypatch, ColabShell())
    assert widget_frontend() is True
    assert widget_frontend() is True
    assert calls == ["enable"]


def test_colab_failing_manager_means_text(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_colab(monkeypatch, fail=True)
    shell(monkeypatch, ColabShell())
    assert widget_frontend() is False
    assert widget_frontend() is False
    assert calls == ["enable"]


def test_env_off_wins_over_colab(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_colab(monkeypatch)
    monkeypatch.setenv("VRAM_MAGIC_WIDGETS", "0")
    assert widget_frontend() is False
    assert calls == []


def test_check_imports_neither_ipykernel_nor_ipython() -> None:
    code = (
        "import sys, vram_magic.render._frontend as f\n"
        "print(f.widget_frontend(), 'ipykernel' in sys.modules, 'IPython' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]
