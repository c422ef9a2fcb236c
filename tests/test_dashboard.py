"""The live dashboard (issue 7): the engine-side snapshot, the read-only endpoints, and the page end to
end in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) against the
session's `pagedllm serve`; with several engine cores (data parallelism), against the dashboard routes
on a fake engine that answers with real snapshots of small in-process engine cores."""

import os
import shutil
import threading
import time

import pytest
from engine_fakes import InstantExecutor, dummy_config
from server_fixtures import free_port, server  # noqa: F401 - session fixture (one process for the whole suite)

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from pagedllm.config import SchedulerConfig
from pagedllm.core_types import EngineCoreRequest
from pagedllm.engine.client import EngineDeadError
from pagedllm.engine.core import EngineCore
from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.snapshot import FIRST_COLOUR, NUM_COLOURS, ColourBook, block_states
from pagedllm.entrypoints.dashboard import add_dashboard_routes, engines_state
from pagedllm.sampling_params import SamplingParams

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


# ---- the snapshot, on the bookkeeping alone -----------------------------------------------------------
def _admit(kv: KVCacheManager, scheduler: Scheduler, rid: str, prompt: list[int]) -> Request:
    r = Request(rid, prompt, SamplingParams(max_tokens=8), 8)
    cached = kv.find_cached_prefix(r)
    assert kv.allocate_slots(r, r.num_tokens - len(cached) * kv.block_size, cached)
    r.num_computed_tokens = r.num_tokens
    kv.cache_blocks(r)
    scheduler.requests[rid] = r
    scheduler.running.append(r)
    return r


def test_block_states_free_cached_in_use_shared():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64), kv)
    prefix = list(range(100, 108))                       # two full blocks, shared by a and b
    a = _admit(kv, scheduler, "a", prefix + [1, 2, 3, 4, 5])
    b = _admit(kv, scheduler, "b", prefix + [6, 7, 8])
    cache: dict = {}
    colours = ColourBook()
    colours.update(scheduler.requests)
    states, cell = block_states(kv, scheduler.requests, colours, id_cache=cache)
    assert cell == 1 and len(states) == 32
    shared = set(a.block_ids) & set(b.block_ids)
    assert len(shared) == 2 and all(states[i] == "2" for i in shared)
    for r in (a, b):
        own = int(states[next(i for i in r.block_ids if i not in shared)], 36)
        assert own == FIRST_COLOUR + colours.colour(r.request_id)
    assert states.count("0") == 32 - len(set(a.block_ids) | set(b.block_ids))
    # b ends: its partial block goes back, the shared prefix stays a's
    scheduler.running.remove(b)
    del scheduler.requests["b"]
    kv.free(b)
    states, _ = block_states(kv, scheduler.requests, colours, id_cache=cache)
    assert "b" not in cache
    assert all(int(states[i], 36) == FIRST_COLOUR + colours.colour("a") for i in a.block_ids)
    scheduler.running.remove(a)
    kv.free(a)
    states, _ = block_states(kv, {}, colours, id_cache=cache)
    assert set(states) == {"0", "1"} and states.count("1") == len(kv.pool.cached) == 3


def test_block_states_groups_large_pools():
    kv = KVCacheManager(num_blocks=10_000, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096, max_model_len=4096), kv)
    r = _admit(kv, scheduler, "big", list(range(4000)))  # 1000 blocks
    colours = ColourBook()
    colours.update(scheduler.requests)
    states, cell = block_states(kv, scheduler.requests, colours, max_cells=4096)
    assert cell == 3 and len(states) == 3334
    used = sum(1 for ch in states if ch not in "01")
    assert abs(used - len(r.block_ids) / 3) <= 2


def test_running_requests_get_distinct_colours_that_stay_put():
    book = ColourBook()
    book.update(["a", "b", "c#0", "c#1"])                # a request's n sequences share one colour
    first = {r: book.colour(r) for r in ("a", "b", "c#0", "c#1")}
    assert first["c#0"] == first["c#1"] and len({first["a"], first["b"], first["c#0"]}) == 3
    book.update(["b", "c#0", "c#1", "d"])                 # a ends, d arrives: the others keep theirs
    assert book.colour("b") == first["b"] and book.colour("c#1") == first["c#1"]
    assert book.colour("d") not in (first["b"], first["c#0"])
    ids = [f"r{i}" for i in range(NUM_COLOURS)]
    book.update(ids)                                      # as many requests as colours: all distinct
    assert len({book.colour(r) for r in ids}) == NUM_COLOURS
    book.update(ids + ["extra"])                          # one more: it shares a colour, nothing breaks
    assert 0 <= book.colour("extra") < NUM_COLOURS


# ---- the endpoints -----------------------------------------------------------------------------------
def test_dashboard_endpoints_are_open_and_bounded(server):  # noqa: F811
    for path in ("/", "/dashboard"):
        r = httpx.get(server.url + path, timeout=30)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        assert "/dashboard/state" in r.text and "<canvas" in r.text and "://" not in r.text  # no CDN
    r = httpx.get(server.url + "/dashboard/state", timeout=30)     # no API key needed
    assert r.status_code == 200
    snap = r.json()
    assert snap["server"]["model"] == server.model and snap["server"]["auth_required"] is True
    blocks = snap["blocks"]
    assert len(blocks["states"]) == blocks["num_blocks"] and blocks["cell_size"] == 1
    kv = snap["kv"]
    assert kv["kv_bytes_per_token"] > 0 and kv["token_capacity"] == kv["num_blocks"] * kv["block_size"]
    assert kv["max_concurrency_at_max_model_len"] > 0
    assert {"generation_tokens", "prefix_cache_hits", "prefix_cache_queries", "num_running",
            "kv_usage"} <= set(snap["counters"])
    assert len(r.content) < 64 << 10
    assert httpx.post(server.url + "/dashboard/state", timeout=30).status_code in (404, 405)
    [engine] = snap["engines"]                                     # one core: the top level, once more
    assert engine["index"] == 0 and engine["alive"] is True and "error" not in engine
    assert engine["kv"] == kv and engine["blocks"]["num_blocks"] == blocks["num_blocks"]
    assert set(engine) == set(snap) - {"engines", "server"} | {"index", "alive"}


# ---- several engine cores, on a fake engine ------------------------------------------------------------
LOST = "the engine core's process exited"


@pytest.fixture(scope="module")
def core_snapshots() -> list[dict]:
    """Real snapshots of two small engine cores (no model): the first runs three requests, the second
    has a smaller pool and is idle."""
    cores = [EngineCore(dummy_config(), InstantExecutor(num_blocks=n)) for n in (256, 128)]
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    cores[0].add_requests([EngineCoreRequest(f"r{i}", list(range(100 * i, 100 * i + 40)), params, time.monotonic())
                           for i in range(3)])
    for _ in range(4):
        cores[0].step()
    snaps = [core.snapshot() for core in cores]
    for core in cores:
        core.shutdown()
    return snaps


class FakeEngine:
    """What the dashboard routes use of AsyncLLM, answering with canned per-core snapshots."""
    is_healthy = True

    def __init__(self, snapshots: list[dict]) -> None:
        self.set(snapshots)

    def set(self, snapshots: list[dict]) -> None:
        self.results, self.errors = list(snapshots), [None] * len(snapshots)

    def lose(self, index: int) -> None:
        self.results[index] = self.errors[index] = EngineDeadError(LOST)

    async def call_each(self, method: str) -> list:
        assert method == "snapshot"
        return list(self.results)

    async def call_utility(self, method: str):
        return next(r for r in self.results if isinstance(r, dict))

    def core_errors(self) -> list:
        return list(self.errors)


@pytest.fixture()
def fake_server(core_snapshots):
    """The dashboard routes on a FakeEngine, served by uvicorn in a thread: (url, engine)."""
    import uvicorn
    from fastapi import FastAPI
    engine = FakeEngine(core_snapshots)
    app = FastAPI()
    add_dashboard_routes(app, engine, "fake-model", api_key_required=False)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    _wait(lambda: uv.started, 20, "the fake server to start")
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        uv.should_exit = True
        thread.join(10)


def test_state_lists_every_engine_core(fake_server, core_snapshots):
    url, engine = fake_server
    snap = httpx.get(url + "/dashboard/state", timeout=30).json()
    assert [(e["index"], e["alive"]) for e in snap["engines"]] == [(0, True), (1, True)]
    for entry, expected in zip(snap["engines"], core_snapshots):
        assert {k: v for k, v in entry.items() if k not in ("index", "alive")} == expected
    assert snap["counters"] == core_snapshots[0]["counters"] and len(snap["running"]) == 3
    assert snap["server"]["model"] == "fake-model" and snap["server"]["auth_required"] is False

    engine.lose(0)                         # the first core is lost: the second one is the top level
    snap = httpx.get(url + "/dashboard/state", timeout=30).json()
    assert snap["engines"][0] == {"index": 0, "alive": False, "error": LOST}
    assert snap["engines"][1]["alive"] is True and snap["kv"] == core_snapshots[1]["kv"]
    assert snap["blocks"] == core_snapshots[1]["blocks"] and snap["running"] == []


def test_state_of_cores_that_did_not_answer(core_snapshots):
    failed = RuntimeError("engine core call failed: boom")           # a live core whose call failed
    state = engines_state([failed, core_snapshots[1]], [None, None])
    assert state["engines"][0] == {"index": 0, "alive": True, "error": str(failed)}
    assert state["kv"] == core_snapshots[1]["kv"]
    dead = EngineDeadError(LOST)
    with pytest.raises(EngineDeadError):                              # none answered: as call_utility
        engines_state([dead, dead], [dead, dead])


# ---- the page, in a real browser ---------------------------------------------------------------------
@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed: `make test` installs them with "
                    "apt-get, which needs root")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1200", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _grid(driver) -> dict:
    data = driver.execute_script("return Object.assign({}, document.getElementById('grid-summary').dataset)")
    return {k: int(v) for k, v in data.items()}


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _idle(server) -> bool:  # noqa: F811
    c = httpx.get(server.url + "/dashboard/state", timeout=30).json()["counters"]
    return c["num_running"] == 0 and c["num_waiting"] == 0 and c["blocks_in_use"] == 0


SYSTEM = ("You are a helpful assistant for a museum of old machines. Answer in plain words, kindly and "
          "briefly, and never make up facts about the machines or their makers. ") * 3


def test_dashboard_in_browser(server, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    _wait(lambda: _idle(server), 30, "the server to be idle")
    browser.get(server.url + "/dashboard?interval=200")
    _wait(lambda: _grid(browser).get("polls", 0) >= 2, 20, "the page to poll the state")
    assert browser.find_element(By.ID, "model").text.startswith(server.model)
    grid = _grid(browser)
    assert grid["cells"] > 0 and grid["used"] == 0
    assert browser.find_element(By.CSS_SELECTOR, "#kv-list").text.count("\n") >= 10

    # two API requests sharing a long system prompt, and one from the page's own chat box
    errors: list = []

    def ask(i: int) -> None:
        try:
            r = httpx.post(server.base_url + "/chat/completions", timeout=120,
                           headers={"Authorization": f"Bearer {server.api_key}"},
                           json={"model": server.model, "max_tokens": 48, "ignore_eos": True,
                                 "messages": [{"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": f"Tell me about machine number {i}."}]})
            assert r.status_code == 200, r.text
        except Exception as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    key = browser.find_element(By.ID, "chat-key")
    assert key.is_displayed()               # the server has an API key: the page asks for it
    key.send_keys(server.api_key)
    box = browser.find_element(By.ID, "chat-input")
    box.clear()
    box.send_keys("Write a long poem about paged attention.")
    maxt = browser.find_element(By.ID, "chat-max")
    maxt.clear()
    maxt.send_keys("48")
    browser.find_element(By.ID, "chat-send").click()

    during = _wait(lambda: (g := _grid(browser))["used"] > 0 and g, 60, "in-use cells during generation")
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#running tbody tr[data-id]")) >= 1, 30,
          "a running request in the table")
    try:   # for a telling screenshot: all three requests decoding (not asserted: timing varies)
        _wait(lambda: browser.execute_script(
            "const r = window.dashboard.last.running; return r.length >= 3 && r.every(x => x.generated_tokens > 8)"),
            10, "three requests decoding")
    except AssertionError:
        pass
    browser.save_screenshot(str(tmp_path / "dashboard-during.png"))
    for t in threads:
        t.join(120)
    assert not errors, errors
    _wait(lambda: browser.find_element(By.ID, "chat-out").get_attribute("data-done") == "1", 60,
          "the chat box's stream to finish")
    assert browser.find_element(By.ID, "chat-out").text.strip()
    assert "finished" in browser.find_element(By.ID, "chat-status").text

    # all requests over: every cell free or cached-and-free, on the page itself
    after = _wait(lambda: (g := _grid(browser))["used"] == 0 and g["polls"] > during["polls"] + 1 and g,
                  20, "every block to be free again")
    assert after["free"] + after["cached"] == after["cells"]
    assert after["cached"] > 0                  # the finished prompts' full blocks stay reusable
    history = browser.execute_script("return window.dashboard.history")
    assert max(p["tps"] or 0 for p in history) > 0 and max(p["batch"] for p in history) >= 1
    assert browser.find_elements(By.CSS_SELECTOR, "#running tbody td.empty")
    browser.save_screenshot(str(tmp_path / "dashboard-after.png"))
    assert (tmp_path / "dashboard-after.png").stat().st_size > 10_000
    out = os.environ.get("PAGEDLLM_DASHBOARD_SCREENSHOT")   # docs/dashboard.png is made this way
    if out:
        shutil.copy(tmp_path / "dashboard-during.png", out)


def _panels(driver) -> list[dict]:
    """Each engine panel as the page shows it: title, error, its grid's counts, its running rows."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#engines .engine')].map((p) => ({
          title: p.querySelector('.title').textContent, error: p.querySelector('.error').textContent,
          lost: p.classList.contains('lost'), shown: p.offsetParent !== null,
          body: p.querySelector('.body').offsetParent !== null,
          grid: Object.assign({}, p.querySelector('[data-role="grid-summary"]').dataset),
          rows: p.querySelectorAll('[data-role="running"] tbody tr[data-id]').length}));""")


def _shown(driver, element_id: str) -> bool:
    return driver.execute_script(f"return document.getElementById('{element_id}').offsetParent !== null")


def test_dashboard_in_browser_with_two_engine_cores(fake_server, core_snapshots, browser, tmp_path):
    from selenium.webdriver.common.by import By
    url, engine = fake_server
    browser.get(url + "/dashboard?interval=200")
    _wait(lambda: browser.execute_script("return window.dashboard.polls") >= 2, 20, "the page to poll the state")
    panels = _panels(browser)
    assert [p["title"].split(" ·")[0].strip() for p in panels] == ["engine 0", "engine 1"]
    assert all(p["shown"] and p["body"] and not p["lost"] and not p["error"] for p in panels)
    assert not _shown(browser, "blocks") and not _shown(browser, "queues")   # the one-core sections give way
    grids = [{k: int(v) for k, v in p["grid"].items() if k != "role"} for p in panels]
    assert [g["cells"] for g in grids] == [256, 128] and grids[0]["used"] == 9 and grids[1]["used"] == 0
    assert [p["rows"] for p in panels] == [3, 0] and "3 running" in panels[0]["title"]
    assert "2 engines" in browser.find_element(By.ID, "summary").text
    assert browser.execute_script("return window.dashboard.history.at(-1).batch") == 3   # summed over the cores
    assert browser.find_element(By.ID, "health").get_attribute("class") == "ok"
    browser.save_screenshot(str(tmp_path / "dashboard-two-cores.png"))

    engine.lose(1)
    lost = _wait(lambda: (p := _panels(browser)[1])["lost"] and p, 20, "engine 1 to show as lost")
    assert "lost" in lost["title"] and lost["error"] == LOST and not lost["body"]
    assert browser.find_element(By.ID, "health").get_attribute("class") == "warn"
    assert "(1 lost)" in browser.find_element(By.ID, "summary").text
    browser.save_screenshot(str(tmp_path / "dashboard-one-lost.png"))

    engine.set(core_snapshots[:1])         # back to one core: the one-core page again
    _wait(lambda: _shown(browser, "blocks") and not _shown(browser, "engines"), 20, "the one-core page")
    assert _grid(browser)["cells"] == 256 and _shown(browser, "queues")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#running tbody tr[data-id]")) == 3
