"""tests/browser: JupyterLab and Notebook 7 in a real browser (Debian's chromium driven by playwright), marked
``browser``.

It runs in ``make test``, which installs chromium as root. Without chromium (or playwright, jupyterlab or
notebook) the tests are skipped on a developer's machine and fail, saying what is missing, where ``CI`` is
set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1200, "height": 3000}  # tall: JupyterLab skips painting cells that are off-screen
WAIT_MS = 60_000  # the longest any one wait may take
# Settings that keep JupyterLab from asking about news and update checks (a toast over the page).
NO_NEWS = {"@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"}}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def _missing() -> str | None:
    """Why a browser test cannot run here, or None."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: `apt-get install chromium` (`make test` does it as root)"
    for package in ("playwright", "jupyterlab", "notebook"):
        if importlib.util.find_spec(package) is None:
            return f"the {package} package is missing: `pip install -e '.[dev]'` (`make test` does it)"
    return None


@pytest.hookimpl(tryfirst=True)  # mark before `-m "not browser"` deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in item.path.resolve().parents]
    reason = _missing() if ours else None
    for item in ours:
        item.add_marker(pytest.mark.browser)
        if reason and not _in_ci():
            item.add_marker(pytest.mark.skip(reason=f"needs a browser: {reason}"))


@dataclass
class Lab:
    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path  # the server's root_dir: notebooks written here can be opened
    log: Path  # the server's (and its kernels') stdout and stderr
    app: str = "jupyterlab"  # or "notebook": Notebook 7

    def notebook_url(self, name: str) -> str:
        if self.app == "notebook":
            return f"{self.url}/notebooks/{name}?token={self.token}"
        return f"{self.url}/lab/tree/{name}?token={self.token}&reset"

    def wait_for_an_idle_kernel(self) -> None:
        """Until the notebook's kernel has started and is idle (Run All before that runs nothing)."""
        deadline = time.monotonic() + WAIT_MS / 1000
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.url}/api/kernels?token={self.token}", timeout=5) as reply:
                kernels = json.loads(reply.read())
            if kernels and all(kernel.get("execution_state") == "idle" for kernel in kernels):
                return
            time.sleep(0.5)
        pytest.fail(f"no idle kernel within {WAIT_MS // 1000} s:\n{_tail(self.log)}", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_server(lab: Lab, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"jupyter lab exited with {server.returncode}:\n{_tail(lab.log)}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{lab.url}/api/status?token={lab.token}", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"jupyter lab did not answer within {WAIT_MS // 1000} s:\n{_tail(lab.log)}", pytrace=False)


def _app_options(app: str, settings: Path, work: Path) -> list[str]:
    """The options that keep each app's settings, workspaces and news out of the user's."""
    if app == "notebook":
        return [f"--NotebookApp.user_settings_dir={settings}", f"--NotebookApp.workspaces_dir={work / 'ws'}"]
    return [
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={work / 'workspaces'}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@pytest.fixture(scope="module", params=["jupyterlab", "notebook"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A JupyterLab (or Notebook 7) server on 127.0.0.1 with a token, serving a temporary folder, with this
    venv's kernel."""
    app = request.param
    reason = _missing()
    if reason:  # only reached where CI is set: elsewhere the test was skipped
        pytest.fail(f"CI is set, so the browser test must run, but it cannot: {reason}", pytrace=False)
    work = tmp_path_factory.mktemp("lab")
    root = work / "notebooks"
    root.mkdir()
    settings = work / "settings"
    for name, values in NO_NEWS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    lab = Lab(url=f"http://127.0.0.1:{port}", token=token, root=root, log=work / "jupyter.log", app=app)
    # The kernel imports vram_magic from this tree, as the screenshots script does.
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop("VRAM_MAGIC_WIDGETS", None)  # the kernel decides as in a plain JupyterLab
    env.pop("KAGGLE_KERNEL_RUN_TYPE", None)
    env["JUPYTER_CONFIG_DIR"] = str(work / "config")  # no user configuration
    env["JUPYTER_RUNTIME_DIR"] = str(work / "runtime")
    with lab.log.open("wb") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                app,
                "--no-browser",
                "--allow-root",
                "--ip=127.0.0.1",
                f"--port={port}",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={root}",
                *_app_options(app, settings, work),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_for_server(lab, server)
        yield lab
    finally:
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def lab_page(lab: Lab, tmp_path: Path) -> Iterator[Page]:
    """A page in a headless chromium with a fresh profile; on a failure the test's report gets a screenshot
    of it, the browser console and the end of the server log."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",  # playwright passes it as --user-data-dir
            executable_path=str(CHROMIUM),
            args=FLAGS,
            viewport=VIEWPORT,  # type: ignore[arg-type]
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.set_default_timeout(WAIT_MS)
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"page error: {e}"))
            page.vram_console = console  # type: ignore[attr-defined]
            yield page
        finally:
            browser.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    if report.when != "call" or not report.failed or "lab_page" not in funcargs:
        return
    page, lab = funcargs["lab_page"], funcargs["lab"]
    shot = item.funcargs["tmp_path"] / "failure.png"
    try:
        page.screenshot(path=str(shot), full_page=True)
        report.sections.append(("browser screenshot", str(shot)))
    except Exception as error:
        report.sections.append(("browser screenshot", f"could not take one: {error}"))
    console = getattr(page, "vram_console", [])
    report.sections.append(("browser console", "\n".join(console[-40:]) or "(empty)"))
    report.sections.append(("jupyter server log (end)", _tail(lab.log)))
