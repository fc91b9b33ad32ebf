"""The dashboard in a real Chromium (Debian's package, driven by Playwright) against a real HTTP
server, Postgres, Redis and a Celery CPU worker running stand-in train.py scripts; and the
morning report that beat writes.

Without Chromium the browser tests skip, naming the install command; with REQUIRE_BROWSER=1
(CI) they fail instead. Screenshots of every page go to the test's tmp_path and to
$DASHBOARD_SCREENSHOTS (default state/test-screenshots)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
import redis
import requests
from conftest_data import registration
from sqlalchemy import text
from test_workers import summary_script, wait_until
from werkzeug.serving import make_server

from app import control
from app.config import PROJECT_ROOT, load_settings
from app.db import transaction
from app.models import LIVE_STATUSES, Experiment
from app.stack import Stack, settings_env
from app.web import create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine notes say: without the background-networking flags Chromium keeps dialling
# Google's hosts, which a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
INSTALL_HINT = "apt-get install chromium chromium-driver (and pip install -e '.[dev]' for playwright)"
GPU_INDEX = 7  # a queue of its own: test_workers' workers use 0, 1 and 5
TOKEN = "dashboard-token-" + uuid.uuid4().hex[:8]
UI_TIMEOUT_MS = 30_000


def slow_progress_script(steps: int = 400, every_s: float = 0.3) -> str:
    """A stand-in train.py that reports progress slowly (step, percent and a falling loss), then
    prints the summary block: for pages that must show a run while it trains."""
    loop = textwrap.dedent(f"""
        import time
        for step in range(1, {steps} + 1):
            print(f"step {{step}} | progress {{100 * step / {steps}:.1f}}% | loss {{5 / (1 + 0.02 * step):.4f}} | "
                  f"lrm 1.00 | dt 300ms | tok/s 1000 | mfu 0.0% | remaining {{({steps} - step) * {every_s}:.0f}}s", flush=True)
            time.sleep({every_s})
    """)
    return loop + summary_script(progress=False)


# --- the browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    required = os.environ.get("REQUIRE_BROWSER") == "1"
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed"
    if missing is None and not Path(CHROMIUM).exists():
        missing = f"Chromium is not installed ({CHROMIUM})"
    if missing:
        message = f"{missing}: {INSTALL_HINT}"
        if required:
            pytest.fail(f"REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message)
    with sync_playwright() as playwright:
        # Playwright gives every launch a fresh, empty profile directory of its own.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    tab = context.new_page()
    errors = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    # A poll that fails logs its error; the browser's own line for a refused (401) fetch is expected.
    tab.on("console", lambda message: message.type == "error" and not message.text.startswith("Failed to load resource")
           and errors.append(message.text))
    yield tab
    context.close()
    assert not errors, f"the page raised or logged: {errors}"


def screenshot(page, tmp_path: Path, name: str) -> None:
    keep = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or PROJECT_ROOT / "state" / "test-screenshots")
    keep.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    shutil.copy(tmp_path / f"{name}.png", keep / f"{name}.png")


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


# --- the stack --------------------------------------------------------------------------------

class Server:
    """The Flask app behind werkzeug's threaded HTTP server, on a free port."""

    def __init__(self, settings):
        self.http = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def api(self, method: str, path: str, token: str | None = None, **kwargs):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def post(self, path: str, body: dict) -> dict:
        response = self.api("POST", path, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self):
        self.http.shutdown()
        self.thread.join()


@pytest.fixture(scope="module")
def stack(database_url, redis_url, tiny_cache, tmp_path_factory):
    """One CPU worker (GPU index 7), the app on a real HTTP server, and the same app with
    API_TOKEN set on a second one."""
    state = tmp_path_factory.mktemp("dashboard-state")
    settings = dataclasses.replace(
        load_settings({}), database_url=database_url, broker_url=redis_url, result_backend=redis_url,
        external_database=True, external_broker=True, state_dir=state, cache_dir=tiny_cache,
        default_profile="tiny", kill_timeout=300.0, heartbeat_interval=1.0, stale_after=4.0,
        trusted_scoring=False,  # stand-in train.py files: their printed number stands
    )
    redis.Redis.from_url(redis_url).flushdb()
    gpu_id = f"dash{uuid.uuid4().hex[:6]}-gpu{GPU_INDEX}"
    workers = Stack(settings, state / "logs")
    workers.start_gpu_worker(GPU_INDEX, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
    server = Server(settings)
    guarded = Server(dataclasses.replace(settings, api_token=TOKEN))
    try:
        wait_until(lambda: any(w["id"] == gpu_id and w["status"] == "idle"
                               for w in server.api("GET", "/api/pool/list").json()["workers"]), 60, "the worker")
        yield {"server": server, "guarded": guarded, "gpu_id": gpu_id, "settings": settings}
    finally:
        workers.stop_all()
        server.stop()
        guarded.stop()


def new_tag(server: Server) -> str:
    tag = f"dash{uuid.uuid4().hex[:8]}"
    assert server.api("POST", "/api/experiment/setup", json={"tag": tag, "profile": "tiny"}).status_code == 200
    return tag


def submit(server: Server, tag: str, source: str, description: str, **extra) -> str:
    response = server.api("POST", "/api/experiment/submit", json={
        **registration(tag, description=description, commit_sha=uuid.uuid4().hex[:12]), "train_py": source,
        "gpu_index": GPU_INDEX, **extra})
    assert response.status_code == 200, response.text
    return response.json()["experiment_id"]


def record(server: Server, experiment_id: str) -> dict:
    return server.api("GET", f"/api/experiment/{experiment_id}").json()


def verdict(server: Server, experiment_id: str, timeout_s: float = 120) -> dict:
    """The record once the experiment has ended (a first experiment also runs baseline replicates)."""
    return wait_until(lambda: (r := server.post("/api/experiment/wait", {"experiment_id": experiment_id, "timeout_s": 5}))
                      ["status"] not in LIVE_STATUSES and r, timeout_s, f"{experiment_id} to end")


def finish(server: Server, experiment_id: str) -> dict:
    """Cancel the experiment if it still goes, and wait until it has ended: the worker is free again."""
    if record(server, experiment_id)["status"] in LIVE_STATUSES:
        server.api("POST", "/api/experiment/cancel", json={"experiment_id": experiment_id})
    return verdict(server, experiment_id, timeout_s=60)


# --- pages ------------------------------------------------------------------------------------

def test_overview_shows_a_training_gpu_and_updates_its_progress_without_a_reload(page, stack, tmp_path):
    server, gpu_id = stack["server"], stack["gpu_id"]
    tag = new_tag(server)
    experiment_id = submit(server, tag, slow_progress_script(), "slow progress on the overview")
    try:
        page.goto(server.url + "/")
        row = page.locator(f'#gpus tr[data-gpu="{gpu_id}"]')
        expect(row.locator(".badge")).to_have_text("training")
        expect(row.locator(".current-run a").first).to_have_text("slow progress on the overview")
        # The first progress line comes once train.py has started: seconds on a loaded 2-core machine.
        expect(row.locator("td.step")).to_have_text(re.compile(r"^\d+$"), timeout=30_000)
        first_step = int(row.locator("td.step").inner_text())
        first_percent = float(row.locator('[role="progressbar"]').get_attribute("aria-valuenow"))
        page.evaluate("window.stillTheSamePage = true")
        wait_until(lambda: int(row.locator("td.step").inner_text()) > first_step, 30, "the step to advance")
        assert float(row.locator('[role="progressbar"]').get_attribute("aria-valuenow")) > first_percent
        assert page.evaluate("window.stillTheSamePage") is True  # updated in place, never reloaded
        tag_row = page.locator(f'#tags tr[data-tag="{tag}"]')
        expect(tag_row).to_contain_text("tiny")
        expect(tag_row.locator("td.running")).to_have_text("1")
        screenshot(page, tmp_path, "overview")
    finally:
        finish(server, experiment_id)


def manual_results(post, database_url: str, tag: str, results: list[tuple[str, float | None]], *,
                   sources: list[str] | None = None, gpu_id: str | None = None) -> list[str]:
    """Experiments recorded the seed's manual way through the API: (category, val_bpb, or None
    for a crash). `post(path, body)` answers the JSON; `sources` are the train.py of each, stored
    as submit would have."""
    ids = []
    for number, (category, value) in enumerate(results):
        experiment_id = post("/api/experiment/register", registration(
            tag, commit_sha=f"{number:07x}", description=f"idea {number}", hypothesis=f"hypothesis {number}",
            category=category, gpu_id=gpu_id))["experiment_id"]
        if sources is not None:
            with transaction(database_url) as session:
                session.get(Experiment, experiment_id).train_py = sources[number]
        if value is None:
            post("/api/experiment/crash", {"experiment_id": experiment_id, "error": "boom"})
        else:
            post("/api/experiment/complete", {"experiment_id": experiment_id, "val_bpb": value, "training_seconds": 5.0})
        ids.append(experiment_id)
    return ids


def column_values(page, css_class: str) -> list[str]:
    return page.locator(f"#experiments tbody td.{css_class}").all_inner_texts()


def test_tag_page_sorts_and_filters_the_experiments(page, stack, tmp_path):
    server = stack["server"]
    tag = new_tag(server)
    results = [("optimizer", 1.30), ("architecture", 1.25), ("optimizer", 1.27), ("architecture", None),
               ("regularization", 1.20), ("optimizer", 1.22)]
    manual_results(server.post, stack["settings"].database_url, tag, results)
    page.goto(f"{server.url}/tag/{tag}")
    rows = page.locator("#experiments tbody tr")
    expect(rows).to_have_count(len(results))
    expect(page.locator("#progress-chart canvas")).to_have_count(1)

    def bpb_order() -> list[float]:
        return [float(v) for v in page.locator("#experiments tbody td.bpb").evaluate_all(
            "cells => cells.map(c => c.dataset.value)") if v != ""]

    scored = sorted(v for _, v in results if v is not None)
    page.locator('#experiments th[data-key="val_bpb"]').click()
    assert bpb_order() == scored
    page.locator('#experiments th[data-key="val_bpb"]').click()
    assert bpb_order() == scored[::-1]
    page.locator('#experiments th[data-key="category"]').click()
    categories = column_values(page, "category")
    assert categories == sorted(categories)

    # Keeps: 1.30, then 1.25, then 1.20 (each beat the best before it); 1.27 and 1.22 were discards.
    page.select_option("#status-filter", "keep")
    expect(rows).to_have_count(3)
    assert set(page.locator("#experiments tbody tr").evaluate_all("rows => rows.map(r => r.dataset.status)")) == {"keep"}
    page.select_option("#category-filter", "optimizer")
    expect(rows).to_have_count(1)
    assert column_values(page, "category") == ["optimizer"]
    page.select_option("#status-filter", "")
    expect(rows).to_have_count(3)
    # The filters hold while the page keeps polling.
    page.wait_for_timeout(2500)
    expect(rows).to_have_count(3)
    expect(page.locator("#strategy")).to_contain_text("explore")
    screenshot(page, tmp_path, "tag")


def test_experiment_page_shows_the_diffs_and_the_live_curve(page, stack, tmp_path):
    server = stack["server"]
    tag = new_tag(server)
    parent = submit(server, tag, summary_script(), "the parent")
    finished = verdict(server, parent)
    assert finished["status"] == "keep"
    # A finished experiment shows the stored curve of each of its runs.
    page.goto(f"{server.url}/experiment/{parent}")
    expect(page.locator("#runs tbody tr")).to_have_count(len(finished["runs"]))
    stored = page.locator("#loss-chart")
    expect(stored.locator("canvas")).to_have_count(1)
    assert int(stored.get_attribute("data-points")) == sum(len(run["curve"] or []) for run in finished["runs"]) > 0
    expect(page.locator("#log")).to_contain_text("val_bpb:")
    screenshot(page, tmp_path, "experiment-finished")
    child_source = slow_progress_script(every_s=0.25)
    child = submit(server, tag, child_source, "the child", parent_id=parent)
    try:
        page.goto(f"{server.url}/experiment/{child}")
        expect(page.locator("#description")).to_have_text("the child")
        added = page.locator("#diff-parent span.add")
        expect(added.first).to_be_visible()
        assert any("for step in range(1, 400 + 1):" in line for line in added.all_inner_texts())
        # The parent is the tag's best, so the diff against the best shows the same change.
        expect(page.locator("#diff-best span.add").first).to_be_visible()
        assert page.locator("#diff-best span.add").all_inner_texts() == added.all_inner_texts()
        expect(page.locator("#best-delta a")).to_have_text(parent)
        # The loss curve grows while the run trains.
        chart = page.locator("#loss-chart")
        expect(chart.locator("canvas")).to_have_count(1)
        wait_until(lambda: int(chart.get_attribute("data-points") or 0) >= 3, 30, "three points on the curve")
        expect(page.locator("#log")).to_contain_text("progress")
        screenshot(page, tmp_path, "experiment")
    finally:
        finish(server, child)


def test_cancel_from_the_page_cancels_the_run(page, stack, tmp_path):
    server, gpu_id = stack["server"], stack["gpu_id"]
    tag = new_tag(server)
    experiment_id = submit(server, tag, slow_progress_script(), "to be cancelled from the page")
    try:
        page.goto(f"{server.url}/experiment/{experiment_id}")
        expect(page.locator("#facts .badge")).to_have_text("running")
        page.once("dialog", lambda dialog: dialog.accept())
        page.locator("#cancel").click()
        expect(page.locator("#facts .badge")).to_have_text("cancelled")
        expect(page.locator("#cancel")).to_be_hidden()
        screenshot(page, tmp_path, "experiment-cancelled")
    finally:
        ended = finish(server, experiment_id)
    assert ended["status"] == "cancelled"
    wait_until(lambda: any(w["id"] == gpu_id and w["status"] == "idle"
                           for w in server.api("GET", "/api/pool/list").json()["workers"]), 30, "the GPU idle again")


def test_with_api_token_set_nothing_is_shown_without_the_token(page, stack, tmp_path):
    guarded, gpu_id = stack["guarded"], stack["gpu_id"]
    tag = new_tag_with_token(guarded)
    assert guarded.api("GET", "/api/pool/list").status_code == 401
    for path in ("/", f"/tag/{tag}"):
        page.goto(guarded.url + path)
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#content")).to_be_hidden()
        text = page.locator("body").inner_text()
        assert gpu_id not in text and "training" not in text and "idle" not in text
    screenshot(page, tmp_path, "token-required")

    page.goto(guarded.url + "/")
    page.fill("#token-input", "wrong")
    page.locator("#login button[type=submit]").click()
    expect(page.locator("#login-error")).to_be_visible()
    expect(page.locator("#content")).to_be_hidden()

    page.fill("#token-input", TOKEN)
    page.locator("#login button[type=submit]").click()
    expect(page.locator(f'#gpus tr[data-gpu="{gpu_id}"]')).to_be_visible()
    expect(page.locator(f'#tags tr[data-tag="{tag}"]')).to_be_visible()
    assert TOKEN not in page.url
    # Kept for this tab only: a reload still shows data, a new browser context asks again.
    page.goto(f"{guarded.url}/tag/{tag}")
    expect(page.locator("#tag-facts")).to_contain_text("tiny")
    assert TOKEN not in page.url
    screenshot(page, tmp_path, "token-accepted")
    fresh = page.context.browser.new_page()
    try:
        fresh.goto(guarded.url + "/")
        expect(fresh.locator("#login")).to_be_visible()
        expect(fresh.locator("#content")).to_be_hidden()
    finally:
        fresh.close()


def new_tag_with_token(server: Server) -> str:
    tag = f"dash{uuid.uuid4().hex[:8]}"
    response = server.api("POST", "/api/experiment/setup", token=TOKEN, json={"tag": tag, "profile": "tiny"})
    assert response.status_code == 200
    return tag


# --- the numbers behind the pages -------------------------------------------------------------

def test_overview_numbers_count_live_experiments_and_verdicts_per_gpu_hour(settings, database_url):
    client = create_app(settings).test_client()

    def post(path: str, body: dict) -> dict:
        response = client.post(path, json=body)
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    tag = f"numbers{uuid.uuid4().hex[:6]}"
    post("/api/experiment/setup", {"tag": tag, "profile": "tiny"})
    manual_results(post, database_url, tag, [("optimizer", 1.3), ("optimizer", 1.2), ("other", None), ("other", 1.4)])
    post("/api/experiment/register", registration(tag, description="still training"))
    row = next(t for t in client.get("/api/report/overview").get_json()["tags"] if t["name"] == tag)
    assert (row["total_experiments"], row["kept_experiments"], row["crashed_experiments"]) == (4, 2, 1)
    assert row["running"] == 1 and row["queued"] == 0 and row["verdicts"] == 4
    # GPU time is what the runs held from claim to end: the running one holds on and is not counted yet.
    with transaction(database_url) as session:
        held = session.scalar(text(
            "SELECT sum(extract(epoch FROM r.finished_at - r.claimed_at)) FROM runs r "
            "JOIN experiments e ON e.id = r.experiment_id WHERE e.tag = :tag"), {"tag": tag})
    assert row["gpu_hours"] == pytest.approx(float(held) / 3600) and row["gpu_hours"] > 0
    assert row["experiments_per_gpu_hour"] == pytest.approx(4 / row["gpu_hours"])
    assert set(row["noise"]) == {"sigma", "runs"}

    points = client.get(f"/api/report/progress?tag={tag}").get_json()["points"]
    assert [(p["status"], p["val_bpb"], p["best"]) for p in points] == [
        ("keep", 1.3, 1.3), ("keep", 1.2, 1.2), ("crash", None, 1.2), ("discard", 1.4, 1.2)]
    assert client.get("/api/report/progress?tag=nosuchtag").status_code == 404


# --- the morning report -----------------------------------------------------------------------

def test_morning_report_is_written_self_contained_with_kept_diffs(settings, database_url, monkeypatch, browser, tmp_path):
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    client = create_app(settings).test_client()

    def post(path: str, body: dict) -> dict:
        response = client.post(path, json=body)
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    tag = f"morning{uuid.uuid4().hex[:6]}"
    post("/api/experiment/setup", {"tag": tag, "profile": "tiny"})
    base = "LR = 0.04\nDEPTH = 4\n"
    sources = [base, base.replace("0.04", "0.05"), base.replace("0.04", "0.05").replace("4\n", "6\n"), base]
    results = [("optimizer", 1.30), ("optimizer", 1.25), ("architecture", 1.20), ("optimizer", 1.26)]
    manual_results(post, database_url, tag, results, sources=sources, gpu_id="gpu7@morning")

    written = control.write_reports()
    report = Path(written[tag]) / "report.html"
    html = report.read_text()
    # Kept changes in order with their gains and diffs; the discard is not among them.
    assert re.findall(r"<h3>\d+\. (idea \d)</h3>", html) == ["idea 0", "idea 1", "idea 2"]
    assert html.count("gain 0.050000") == 2 and "idea 3" not in html
    assert '<span class="del">-LR = 0.04</span>' in html and '<span class="add">+LR = 0.05</span>' in html
    assert '<span class="add">+DEPTH = 6</span>' in html
    assert "gpu7@morning" in html
    # Self-contained: no scripts, no stylesheets or images fetched from anywhere.
    assert "<script" not in html and "<link" not in html
    assert re.findall(r'\b(?:src|href)="(?!data:)', html) == []
    assert html.count('src="data:image/png;base64,') == 1

    # Opened from disk in Chromium, it asks for nothing but itself, and its chart decodes.
    context = browser.new_context()
    fetched = []
    context.route("**/*", lambda route: (fetched.append(route.request.url), route.continue_()))
    tab = context.new_page()
    tab.goto(report.as_uri())
    assert tab.evaluate("document.querySelector('img.chart').naturalWidth") > 100
    screenshot(tab, tmp_path, "morning-report")
    context.close()
    assert [url for url in fetched if not url.startswith("data:")] == [report.as_uri()]


def test_a_worker_on_another_host_shows_its_log_and_curve(page, stack, tmp_path):
    """A worker with a state folder of its own (another machine, as far as files go) and its own
    --gpu-id: its run's log tail and loss curve come from the database, so the API and the page
    show them after the worker's files are gone."""
    server, settings = stack["server"], stack["settings"]
    remote_state = tmp_path / "remote-host"
    gpu_id = f"remote{uuid.uuid4().hex[:6]}@elsewhere"
    remote = Stack(dataclasses.replace(settings, state_dir=remote_state), remote_state / "logs")
    remote.start_gpu_worker(8, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id.split('@')[0]}@%h")
    try:
        wait_until(lambda: any(w["id"] == gpu_id for w in server.api("GET", "/api/pool/list").json()["workers"]),
                   60, "the remote worker")
        tag = new_tag(server)
        experiment_id = submit(server, tag, slow_progress_script(steps=12, every_s=0.3), "on another host",
                               gpu_index=None, gpu_id=gpu_id)
        finished = verdict(server, experiment_id)
    finally:
        remote.stop_all()
    assert finished["gpu_id"] == gpu_id and finished["status"] == "keep", (finished["status"], finished["error"], [
        (r["status"], r["gpu_id"], r["error"]) for r in finished["runs"]])
    shutil.rmtree(remote_state / "runs")  # nothing of the run is left on disk
    log = server.api("GET", f"/api/experiment/{experiment_id}/log").json()["log"]
    assert "val_bpb:" in log and "step 12 |" in log
    for run in finished["runs"]:  # a tag's first experiment: its baseline replicates
        assert run["gpu_id"] == gpu_id
        assert len(run["curve"]) >= 2 and run["curve"][-1]["step"] > run["curve"][0]["step"]
    page.goto(f"{server.url}/experiment/{experiment_id}")
    expect(page.locator("#log")).to_contain_text("val_bpb:")
    chart = page.locator("#loss-chart")
    expect(chart.locator("canvas")).to_have_count(1)
    assert int(chart.get_attribute("data-points")) == sum(len(run["curve"]) for run in finished["runs"])
    screenshot(page, tmp_path, "experiment-remote-host")
