"""Issue 14 in a real browser: `latentforge ui`, Run on the pipeline deployment in the Prefect
UI (tiny preset from params.yaml, one key changed in the Run form's params), then, in the MLflow UI, the generator's registered version
followed back hop by hop to the tokenizer and the prepare run that made its data.

Playwright drives Debian's chromium (`apt-get install -y chromium`, as .ci/run does);
`playwright install` cannot download browsers on these machines. One screenshot per page goes
to tmp_path and to test-artifacts/browser/ (CI keeps that folder; a failed run keeps what it
got so far). 5-7 min on 2 busy cores: ~40 s to start the servers, the pipeline 100 s (idle
cores) to 6 min, ~1 min of browsing; hence slow, in `make test-infra`."""

from __future__ import annotations

import re
import shutil
import time
from contextlib import suppress
from pathlib import Path

import pytest
from conftest import REPO
from servers import api, running_ui
from test_pipeline import TINY

from latentforge import paths
from latentforge.config import SECTIONS

CHROMIUM = "/usr/bin/chromium"
# Without the networking flags chromium keeps dialling Google's hosts, which a closed network
# refuses many times a second; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts" / "browser"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
FORM_MAX_IMAGES = 240  # set in the Run form; params.yaml (TINY) says 300


def require_browser():
    """Playwright's sync API; fails (not skips) with how to install what is missing."""
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("playwright is not installed: `make venv` or `pip install -c "
                    "requirements/constraints.txt -e '.[dev]'` (its browser is Debian's "
                    "chromium: `apt-get install -y chromium`)", pytrace=False)
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: `apt-get install -y chromium` (Debian's package, as "
                    ".ci/run installs it); `playwright install` cannot download browsers here",
                    pytrace=False)
    return sync_api


def tag(page, key: str, value: str = r"\S+") -> str:
    """A tag's value as the page shows it: `key value` in a table, `key: value` as a chip."""
    match = re.search(rf"(?<![\w.]){re.escape(key)}(?:\s*:\s*|\s+)({value})(?:\s|$)",
                      page.inner_text("body"))
    assert match, f"{key} not shown on {page.url}"
    return match.group(1)


class Shots:
    """Numbered full-window screenshots, one per page visited."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def __call__(self, page, name: str) -> None:
        self.count += 1
        page.screenshot(path=self.folder / f"{self.count:02d}-{name}.png")


def press_run(page, expect, prefect: str, shot: Shots) -> str:
    """Deployments -> pipeline -> Run -> Custom run: the form offers every params.yaml section
    and key with its doc; set prepare.max_images there and submit. The new flow run's id, its
    page open."""
    page.goto(f"{prefect}/deployments")
    expect(page.get_by_text(f"{len(paths.STAGES) + 2} Deployments")).to_be_visible()
    shot(page, "prefect-deployments")
    page.get_by_role("link", name="pipeline", exact=True).first.click()
    expect(page.get_by_text("latentforge.flows.pipeline.pipeline")).to_be_visible()
    shot(page, "prefect-pipeline-deployment")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    expect(page.get_by_text("params (Optional)", exact=True)).to_be_visible()
    for section in SECTIONS:  # the params form: a block per section, labelled by its key
        label = re.compile(rf"^{section} \(Optional\)$", re.IGNORECASE)  # Prefect capitalises
        expect(page.get_by_text(label)).to_be_visible()
    # a key: its label, its doc with the default, its type; bounds come from the schema
    key = page.get_by_text("max_images (Optional)", exact=True).locator(
        "xpath=ancestor::*[.//button[normalize-space()='int']][1]")
    expect(key.get_by_text("keep at most this many images, a seeded random subset of all "
                           "classes together, not per class (null = all). Default null")
           ).to_be_visible()
    key.get_by_role("button", name="int", exact=True).click()
    key.locator("input[type=number]").fill(str(FORM_MAX_IMAGES))
    key.scroll_into_view_if_needed()
    shot(page, "prefect-run-form")
    page.get_by_role("button", name="Submit", exact=True).click()
    # back on the deployment's page: the new run's link (the toast's own "View run" button
    # sits under a second copy of the toast, which takes the click)
    run_link = page.locator("a[href*='/runs/flow-run/']").first
    expect(run_link).to_be_visible()
    shot(page, "prefect-run-submitted")
    run_link.click()
    page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"))
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url).group(1)


def wait_for_flow_run(prefect: str, run_id: str, alive, timeout: float = 900) -> str:
    """Poll the REST API until the flow run ends; its final state type."""
    started = time.monotonic()
    state = api(prefect, f"flow_runs/{run_id}")["state_type"]
    while state not in TERMINAL and time.monotonic() - started < timeout:
        alive()
        time.sleep(3)
        state = api(prefect, f"flow_runs/{run_id}")["state_type"]
    print(f"pipeline flow run {state.lower()} after {time.monotonic() - started:.0f} s")
    return state


def show_completed_run(page, expect, shot: Shots) -> None:
    """The flow run's page: Completed, and a subflow run per stage."""
    page.reload()
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
    page.wait_for_timeout(2_000)  # the run graph is a canvas: no text to wait for
    shot(page, "prefect-flow-run-completed")
    page.get_by_text("Subflow Runs", exact=True).click()
    expect(page.get_by_text(f"{len(paths.STAGES)} Flow runs")).to_be_visible()
    for stage in paths.STAGES:
        expect(page.get_by_role("link", name=stage, exact=True).first).to_be_visible()
    # the run's own badge and one per subflow run
    expect(page.get_by_text("Completed", exact=True)).to_have_count(len(paths.STAGES) + 1)
    shot(page, "prefect-subflow-runs")


def click_through(page, link):
    """Click a link and return the page it opened: MLflow opens the links of a rendered
    description in a new tab (target=_blank)."""
    if link.get_attribute("target") != "_blank":
        link.click()
        return page
    with page.expect_popup() as popup:
        link.click()
    opened = popup.value
    opened.set_viewport_size({"width": 1440, "height": 1200})
    opened.wait_for_load_state()
    return opened


def follow_lineage(page, expect, error, mlflow: str, shot: Shots) -> None:
    """MLflow: generator version -> its run and inputs -> tokenizer version and run -> the
    prepare run, checking at each hop that the digests and run ids agree."""
    page.goto(f"{mlflow}/#/experiments")
    page.get_by_role("link", name="latentforge", exact=True).click()
    for popup in ("Got it", "Close"):  # first-visit guidance; the Assistant panel
        with suppress(error):
            page.get_by_role("button", name=popup, exact=True).click(timeout=5_000)
    page.get_by_role("link", name="Training runs").click()
    pipeline_cell = page.get_by_role("gridcell").filter(
        has=page.get_by_role("link", name="pipeline", exact=True))
    pipeline_cell.get_by_role("button").first.click()  # show its child runs, one per stage
    for stage in paths.STAGES:
        expect(page.get_by_role("link", name=stage, exact=True)).to_be_visible()
    expect(page.get_by_text(f"{len(paths.STAGES) + 1} matching runs")).to_be_visible()
    shot(page, "mlflow-experiment-runs")

    # the generator run's registered version, from the table's Models column (the link
    # opens a new tab: follow its address in this one)
    model_link = page.locator("a[href*='#/models/latentforge-generator/versions/']").first
    page.goto(f"{mlflow}/{model_link.get_attribute('href')}")
    expect(page.get_by_text("Trained by the generator stage")).to_be_visible()
    generator_version = page.url
    tokenizer = tag(page, "latentforge.upstream.tokenizer", r"latentforge-tokenizer/\d+")
    tokenizer_sha = tag(page, "latentforge.tokenizer_sha256", "[0-9a-f]{64}")
    data_sha = tag(page, "latentforge.prepared_sha256", "[0-9a-f]{64}")
    prepare_run = tag(page, "latentforge.upstream.prepared_run", "[0-9a-f]{32}")
    page.get_by_text("latentforge.upstream.tokenizer", exact=True).scroll_into_view_if_needed()
    shot(page, "mlflow-generator-version")

    # its source run: the same upstream tags, and the prepared data among its inputs
    page.locator("a[href*='/runs/']").first.click()
    expect(page.get_by_text("About this run")).to_be_visible()
    experiment = re.search(r"#/experiments/([^/]+)/runs/", page.url).group(1)
    assert tag(page, "latentforge.stage") == "generator"
    assert tag(page, "latentforge.upstream.tokenizer") == tokenizer
    assert tag(page, "latentforge.upstream.prepared_run") == prepare_run
    expect(page.locator("a[href*='#/models/latentforge-generator/versions/']").first).to_be_visible()
    shot(page, "mlflow-generator-run")
    page.get_by_text(re.compile(r"^\+\d+$")).click()  # the inputs beyond the first
    page.get_by_text("prepared (").first.click()
    expect(page.get_by_text(data_sha).first).to_be_visible()
    page.wait_for_timeout(1_000)  # the drawer slides in from the right
    shot(page, "mlflow-generator-inputs")
    page.keyboard.press("Escape")

    # the tokenizer version: a link in the generator version's description (tag values are
    # text, not links)
    page.goto(generator_version)  # back to the page already visited
    expect(page.get_by_text("Trained by the generator stage")).to_be_visible()
    page = click_through(page, page.get_by_role("link", name=tokenizer, exact=True))
    expect(page.get_by_text("Trained by the tokenizer stage")).to_be_visible()
    tokenizer_version = page.url
    assert tag(page, "latentforge.weights_sha256") == tokenizer_sha
    assert tag(page, "latentforge.upstream.prepared_run") == prepare_run
    page.get_by_text("latentforge.upstream.prepared_run", exact=True).scroll_into_view_if_needed()
    shot(page, "mlflow-tokenizer-version")
    page.locator("a[href*='/runs/']").first.click()
    expect(page.get_by_text("About this run")).to_be_visible()
    assert tag(page, "latentforge.stage") == "tokenizer"
    shot(page, "mlflow-tokenizer-run")

    # the prepare run both versions name (a link in the description): it produced exactly
    # the generator's data
    page.goto(tokenizer_version)
    expect(page.get_by_text("Trained by the tokenizer stage")).to_be_visible()
    page = click_through(page, page.get_by_role("link", name=prepare_run, exact=True))
    page.wait_for_url(re.compile(rf"#/experiments/{experiment}/runs/{prepare_run}"))
    expect(page.get_by_text("About this run")).to_be_visible()
    assert tag(page, "latentforge.stage") == "prepare"
    assert tag(page, "latentforge.output.prepared.sha256") == data_sha
    assert tag(page, "prepare.source") == TINY["prepare"]["source"]
    assert tag(page, "prepare.max_images") == str(FORM_MAX_IMAGES)  # from the Run form
    assert "workflowType=machine_learning" in page.url  # not the GenAI view
    shot(page, "mlflow-prepare-run")


@pytest.mark.slow
def test_run_button_then_lineage_links_in_mlflow(make_project, tmp_path):
    sync_api = require_browser()
    expect = sync_api.expect
    expect.set_options(timeout=60_000)  # first loads of both UIs on 2 busy cores
    root = make_project(TINY)  # params.yaml holds the tiny preset: a plain Run uses it
    shot = Shots(tmp_path / "browser")
    shot.folder.mkdir()
    print(f"screenshots: {shot.folder} (copied to {ARTIFACTS})")
    try:
        with running_ui(root, tmp_path) as (prefect, mlflow, lines, proc), \
                sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1200})
            page.set_default_timeout(60_000)

            def alive() -> None:
                assert proc.poll() is None, "\n".join(lines[-60:])

            run_id = press_run(page, expect, prefect, shot)
            state = wait_for_flow_run(prefect, run_id, alive)
            assert state == "COMPLETED", "\n".join(lines[-60:])
            show_completed_run(page, expect, shot)
            follow_lineage(page, expect, sync_api.Error, mlflow, shot)
            browser.close()
    finally:
        expect.set_options(timeout=5_000)  # Playwright's default, for any later test
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
        shutil.copytree(shot.folder, ARTIFACTS)
