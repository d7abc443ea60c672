"""Promotion in a real browser: headless Debian Chromium (driven by playwright, never a downloaded
browser build) against the `mlflow server` that `make ui` starts, on a private copy of the tiny registry.

The test opens the registered model, sees its versions, aliases and the version's description, moves
`champion` to another version through the UI's alias editor, then checks with the MLflow client that
`models:/<name>@champion` is that version and that its pyfunc edits an image. The model page is saved
as artifacts/test-ui/model-page.png. Without Chromium or playwright it skips and says why;
`make test-ui` (COLLECTIONLORA_REQUIRE_BROWSER=1) turns that skip into a failure.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# headless on a closed network: no sandbox (root in CI), no GPU, and none of Chromium's background traffic
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "test-ui"


def _browser_missing() -> str:
    """Why the browser test cannot run here, or '' when it can."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no {CHROMIUM} (Debian package `chromium`: apt-get install -y chromium; .ci/run does this when it can)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing (it is in requirements.lock: make setup)"
    return ""


MISSING = _browser_missing()
if MISSING and os.environ.get("COLLECTIONLORA_REQUIRE_BROWSER") == "1":
    pytest.fail(f"COLLECTIONLORA_REQUIRE_BROWSER=1 but the browser test cannot run: {MISSING}", pytrace=False)
pytestmark = [pytest.mark.ui, pytest.mark.skipif(bool(MISSING), reason=f"registry UI browser test: {MISSING}")]


def test_champion_is_set_in_the_ui_and_serves_edits(tiny_registry: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    from collectionlora.registry.server import MlflowServer, free_port, local_store

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    name, versions, champion = tiny_registry["model_name"], tiny_registry["versions"], tiny_registry["champion"]
    assert len(versions) >= 2
    target = next(v for v in reversed(versions) if v != champion)  # the UI moves champion here
    client = mlflow.MlflowClient(tracking_uri=tiny_registry["tracking_uri"])
    aliases = client.get_registered_model(name).aliases  # alias -> version, before the UI changes them
    assert "challenger" in aliases
    description = client.get_model_version(name, target).description
    heading = next(line.lstrip("#").strip() for line in description.splitlines() if line.startswith("#"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    store = local_store(tiny_registry["tracking_uri"], tiny_registry["artifacts"])
    with MlflowServer(store, free_port()) as server, sync_playwright() as playwright:
        print(f"mlflow server up in {time.monotonic() - started:.1f} s at {server.url}")
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})  # a fresh temporary profile
        page.set_default_timeout(60_000)

        # the version page: the description (the model card) rendered, with its aliases
        page.goto(f"{server.url}/#/models/{name}/versions/{target}")
        expect(page.get_by_text(heading, exact=True).first).to_be_visible()

        # the model page: every version, and challenger/champion on the versions they are on
        page.goto(f"{server.url}/#/models/{name}")
        for version in versions:
            expect(page.get_by_role("link", name=f"Version {version}", exact=True)).to_be_visible()
        for alias, version in aliases.items():
            expect(_aliases_cell(page, str(version))).to_contain_text(alias)
        page.screenshot(path=str(SCREENSHOTS / "model-page-before.png"), full_page=True)

        # the alias editor of the target's row: type the alias, Enter, save
        _aliases_cell(page, target).get_by_role("button").click()
        dialog = page.get_by_role("dialog", name=f"Add/Edit alias for model version {target}")
        combobox = dialog.get_by_role("combobox")
        combobox.fill("champion")
        combobox.press("Enter")
        if champion is not None:  # the UI warns that the alias leaves the other version
            expect(dialog).to_contain_text(re.compile(rf"also being used on version {champion}"))
        dialog.get_by_role("button", name="Save aliases").click()
        expect(dialog).to_be_hidden()

        page.reload()  # the table keeps its old aliases until it reloads
        expect(_aliases_cell(page, target)).to_contain_text("champion")
        if champion is not None:
            expect(_aliases_cell(page, champion)).not_to_contain_text("champion")
        _close_assistant(page)
        page.set_viewport_size({"width": 1400, "height": 1800})  # the page scrolls inside a panel: show both versions
        page.screenshot(path=str(SCREENSHOTS / "model-page.png"), full_page=True)
        browser.close()
        print(f"UI part took {time.monotonic() - started:.1f} s; screenshot {SCREENSHOTS / 'model-page.png'}")

    assert str(client.get_model_version_by_alias(name, "champion").version) == target  # an int from a sqlite store
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    edited = model.predict(tiny_registry["predict_input"])
    source = Image.open(tiny_registry["image"])
    result = Image.open(io.BytesIO(base64.b64decode(edited["image"][0])))
    assert result.size == source.size
    print(f"whole test took {time.monotonic() - started:.1f} s")


def _aliases_cell(page, version: str):
    """The Aliases cell of one version's row in the model page's versions table (found by header text)."""
    link = page.get_by_role("link", name=f"Version {version}", exact=True)
    link.wait_for()  # the table is drawn once the registry API answered
    headers = [h.inner_text().strip() for h in page.get_by_role("columnheader").all()]
    row = page.get_by_role("row").filter(has=link)
    return row.get_by_role("cell").nth(headers.index("Aliases"))


def _close_assistant(page) -> None:
    """Fold the MLflow Assistant side panel away so the screenshot shows the registry at full width."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() == 1:
        close.click()
