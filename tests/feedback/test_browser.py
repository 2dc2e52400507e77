"""A real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
Selenium signs in, labels pairwise and ranking items with the keyboard and the mouse,
undoes a vote, and the database is checked; an item whose prompt and response hold
``<script>`` / ``onerror`` HTML must show them as text and run nothing.

Skipped when Chromium or its driver is missing, unless FASTRLHF_REQUIRE_BROWSER=1 (CI
installs both and sets it, so there the test cannot silently skip).
FASTRLHF_SCREENSHOT=path saves a screenshot of the labeling page (docs/feedback.png).
"""

from __future__ import annotations

import os
import shutil

import pytest

from fastrlhf.feedback.simulate import ServerProcess
from fastrlhf.feedback.store import Item, active_votes, add_annotator, add_items, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
XSS_PROMPT = "Repeat: <script>window.__pwned = 'prompt'</script>"
XSS_RESPONSE = "<img src=x onerror=\"window.__pwned='img'\"><script>window.__pwned=1</script>"


def _need_browser():
    missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        if os.environ.get("FASTRLHF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FASTRLHF_REQUIRE_BROWSER=1 but missing: {missing}")
        pytest.skip(f"no browser: missing {missing} (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser(tmp_path):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


ITEMS = [
    Item("p-xss", XSS_PROMPT, ["I will not.", XSS_RESPONSE]),
    Item("p-2", "2+2=", ["4", "5"]),
    Item("p-3", "Capital of France?", ["Paris", "Lyon"]),
    Item("r-1", "Sort: 3 1 2", ["1 2 3", "3 2 1", "1 3 2"]),
    Item("r-2", "Name a prime", ["7", "8", "9", "10"]),
]


def _wait(driver, cond, timeout=10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(cond)


_READ_PAGE = """
const done = document.getElementById("done");
if (done) return {done: true};
const t = document.getElementById("task");
if (!t || document.readyState !== "complete") return null;
const sel = t.dataset.kind === "pair" ? "#task .response pre" : "#ranking .rank-row pre";
return {done: false, item: t.dataset.item, kind: t.dataset.kind, vote: t.dataset.voteId,
        shown: Array.from(document.querySelectorAll(sel)).map(e => e.textContent)};
"""


def _item_page(driver, previous_vote_id=None):
    """Wait for a label page showing a new item (another server-issued vote id than
    ``previous_vote_id``); returns ("done",) or (item id, kind, shown texts, vote id)."""

    def ready(d):
        page = d.execute_script(_READ_PAGE)
        if page is None or (not page["done"] and page["vote"] == previous_vote_id):
            return False
        return page

    page = _wait(driver, ready)
    if page["done"]:
        return ("done",)
    return page["item"], page["kind"], page["shown"], page["vote"]


def test_label_with_keyboard_and_mouse_then_undo(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    db = tmp_path / "fb.db"
    conn = connect(db, create=True)
    add_items(conn, ITEMS)
    token = add_annotator(conn, "alice")
    responses = {it.id: it.responses for it in ITEMS}
    server = ServerProcess(db, args=["--gold-rate", "0", "--overlap", "0"])
    with server:
        d = browser
        d.get(server.url + "/")
        d.find_element(By.ID, "name").send_keys("alice")
        d.find_element(By.ID, "token").send_keys("wrong-token")
        d.find_element(By.ID, "signin").click()
        assert "wrong token" in _wait(d, lambda d: d.find_element(By.ID, "error")).text
        d.find_element(By.ID, "token").clear()
        d.find_element(By.ID, "token").send_keys(token)
        d.find_element(By.ID, "name").clear()
        d.find_element(By.ID, "name").send_keys("alice")
        d.find_element(By.ID, "signin").click()

        expected = {}  # item id -> ranking (response indices, best first)
        pair_n = rank_n = 0
        vote_id = None
        undone_checked = False
        while True:
            page = _item_page(d, vote_id)
            if page[0] == "done":
                break
            item_id, kind, shown, vote_id = page
            order = [responses[item_id].index(t) for t in shown]  # display pos -> index
            assert d.execute_script("return window.__pwned === undefined")
            if item_id == "p-xss":
                assert d.find_element(By.ID, "prompt").get_attribute("textContent") == XSS_PROMPT
                assert XSS_RESPONSE in shown  # shown verbatim, as text
                assert d.find_elements(By.CSS_SELECTOR, "#task img, #task pre script") == []
                if os.environ.get("FASTRLHF_SCREENSHOT"):
                    d.save_screenshot(os.environ["FASTRLHF_SCREENSHOT"])
            body = d.find_element(By.TAG_NAME, "body")
            if kind == "pair":
                if pair_n % 2 == 0:  # keyboard: strength 3, flag "unsure", B better
                    body.send_keys("3")
                    body.send_keys("s")
                    body.send_keys("b")
                    expected[item_id] = ([order[1], order[0]], 3, ["unsure"])
                else:  # mouse: strength 2 and "A is better"
                    d.find_element(By.ID, "strength-2").click()
                    d.find_element(By.ID, "choose-A").click()
                    expected[item_id] = ([order[0], order[1]], 2, [])
                pair_n += 1
            else:
                k = len(shown)
                if rank_n % 2 == 0:  # keyboard: move the first row to the bottom, Enter
                    for _ in range(k - 1):
                        ActionChains(d).key_down(Keys.SHIFT).send_keys(Keys.ARROW_DOWN).key_up(
                            Keys.SHIFT
                        ).perform()
                    positions = list(range(1, k)) + [0]
                    ActionChains(d).send_keys(Keys.ENTER).perform()
                else:  # mouse: drag the last row's handle onto the first row, then a button
                    rows = d.find_elements(By.CSS_SELECTOR, "#ranking .rank-row")
                    handle = rows[-1].find_element(By.CSS_SELECTOR, ".handle")
                    first = rows[0]
                    ActionChains(d).click_and_hold(handle).move_to_element_with_offset(
                        first, 0, -first.size["height"] // 2 + 3
                    ).release().perform()
                    shown_now = [
                        e.get_attribute("data-pos")
                        for e in d.find_elements(By.CSS_SELECTOR, "#ranking .rank-row")
                    ]
                    assert shown_now[0] == str(k - 1), shown_now  # the drag moved it up
                    # then the second row goes down one with its button
                    d.find_elements(By.CSS_SELECTOR, "#ranking .rank-row")[1].find_element(
                        By.CSS_SELECTOR, ".down"
                    ).click()
                    positions = [int(p) for p in shown_now]
                    positions[1], positions[2] = positions[2], positions[1]
                    d.find_element(By.ID, "submit-ranking").click()
                expected[item_id] = ([order[p] for p in positions], None, [])
                rank_n += 1
            if not undone_checked and len(expected) == 3:
                # undo the third vote with the keyboard: the same item comes back
                page = _item_page(d, vote_id)
                vote_id = page[3] if page[0] != "done" else None
                d.find_element(By.TAG_NAME, "body").send_keys("u")
                back = _item_page(d, vote_id)
                assert back[0] == item_id
                vote_id = back[3]
                stored = {v.item_id for v in active_votes(connect(db))}
                assert item_id not in stored and len(stored) == 2
                del expected[item_id]
                undone_checked = True
                # label it again with the mouse (tie for a pair, "can't tell" for a ranking)
                if back[1] == "pair":
                    d.find_element(By.ID, "choose-tie").click()
                    expected[item_id] = ("tie", None, [])
                else:
                    d.find_element(By.ID, "choose-cant").click()
                    expected[item_id] = ("cant_tell", None, [])
        assert "All done" in d.page_source
        assert d.execute_script("return window.__pwned === undefined")

    votes = {v.item_id: v for v in active_votes(connect(db))}
    assert set(votes) == {it.id for it in ITEMS}
    assert pair_n >= 2 and rank_n >= 2
    for item_id, (want, strength, flags) in expected.items():
        v = votes[item_id]
        if want == "tie":
            assert v.tie and v.ranking is None
        elif want == "cant_tell":
            assert v.cant_tell and v.ranking is None
        else:
            assert v.ranking == want, item_id
            assert v.strength == strength and v.flags == flags, item_id
        assert v.time_ms is not None and v.time_ms >= 0
        assert v.shown_order is not None
    undone = connect(db).execute("SELECT COUNT(*) FROM votes WHERE undone IS NOT NULL")
    assert undone.fetchone()[0] == 1
