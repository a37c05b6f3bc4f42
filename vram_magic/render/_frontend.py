"""Can this frontend show live ipywidgets? Decides between the widget view and plain text.

Order: ``VRAM_MAGIC_WIDGETS=0/1`` wins; Kaggle "Batch" runs (Save & Run All: the saved viewer has no live
widgets) get text; Colab gets widgets once its custom widget manager is enabled (ipywidgets 8 needs it);
otherwise widgets only under an ipykernel kernel (Kaggle "Interactive" is one) with ipywidgets importable.
"""

from __future__ import annotations

import importlib
import os
import sys

ENV_OVERRIDE = "VRAM_MAGIC_WIDGETS"
_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}

_colab_ready: bool | None = None  # result of enabling Colab's widget manager, cached


def widget_frontend() -> bool:
    """True when a widget view will render live here; False means show text."""
    override = os.environ.get(ENV_OVERRIDE, "").strip().lower()
    if override in _OFF:
        return False
    if override in _ON:
        return _ipywidgets_ok()
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") == "Batch":
        return False
    if "google.colab" in sys.modules:
        return _ipywidgets_ok() and _enable_colab()
    return _in_kernel() and _ipywidgets_ok()


def _in_kernel() -> bool:
    """Is the running shell an ipykernel ``ZMQInteractiveShell``? Imports neither IPython nor ipykernel."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if get_ipython is not None else None
    if shell is None:
        return False
    return any(cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)


def _ipywidgets_ok() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _enable_colab() -> bool:
    """Call ``google.colab.output.enable_custom_widget_manager()`` once; remember whether it worked."""
    global _colab_ready
    if _colab_ready is None:
        try:
            importlib.import_module("google.colab.output").enable_custom_widget_manager()
            _colab_ready = True
        except Exception:
            _colab_ready = False
    return _colab_ready
