"""The web dashboard against a real server: sign-in, roles, CSRF, escaping, and the pages in Debian's chromium."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlencode

import grpc
import pytest

from chronorec.server.core.catalog import Item
from chronorec.server.core.demo import generate_drift_dataset
from chronorec.server.core.store import EventStore
from chronorec.v1 import models_pb2, models_pb2_grpc

pytest.importorskip("aiohttp", reason="the dashboard extra is not installed")

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "reports" / "dashboard"
# The demo catalog as of 2025-12-01 00:00 UTC: its users' interests switch between mid-September
# and early November, so October and November show different topics for many of them.
ANCHOR = 1_764_547_200.0
DAY = 86400.0
OCTOBER_1 = 1_759_276_800.0
READ_TOKEN = "dashboard-read-token-0123456789"
ADMIN_TOKEN = "dashboard-admin-token-0123456789"
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def demo():
    return generate_drift_dataset(seed=7, anchor=ANCHOR)


@pytest.fixture(scope="module")
def dashboard_server(tmp_path_factory, minilm_repo_template, tiny_bert_dir, demo):
    """A server over the demo catalog with MiniLM serving, a second (tiny) version to activate, read
    and admin tokens, the dashboard on a loopback port and one chronorec-eval report to show."""
    from chronorec.server.app import serve
    from chronorec.server.config import ServerConfig
    from chronorec.trainer import evaluate, report
    from chronorec.trainer.export import publish_base_model
    from chronorec.trainer.protocols import Dataset

    root = tmp_path_factory.mktemp("dashboard")
    models = root / "models"
    shutil.copytree(minilm_repo_template, models)
    spare = publish_base_model(tiny_bert_dir, models, activate=False)
    with EventStore(root / "demo.db") as store:
        store.bulk_import(demo.items, demo.events)
    document = evaluate.evaluate(Dataset(demo.items, demo.events), ["temporal"], ["MostPop", "RecentPop-7d"], progress=False)
    report.write_report(document, root / "reports" / "run-1")
    config = ServerConfig(
        host="127.0.0.1", port=0, data_dir=root / "data", db_path=root / "demo.db", models_root=models, demo=False,
        watch_interval_s=0.2, cooccurrence_refresh_s=0, log_json=False,
        inline_tokens=f"read {READ_TOKEN} viewer;admin {ADMIN_TOKEN} operator",
        dashboard_port=0, dashboard_reports=root / "reports",
    )
    running = serve(config)
    try:
        assert running.wait_ready(180), "server did not become ready"
        running.spare_version = spare
        yield running
    finally:
        running.stop(grace=1.0)


def request(server, method: str, path: str, *, token: str | None = None, cookie: str | None = None,
            form: dict | None = None, headers: dict | None = None) -> tuple[int, dict, str]:
    """One plain HTTP request to the dashboard: (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.dashboard.port, timeout=60)
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {token}"
    if cookie:
        sent["Cookie"] = cookie
    body = None
    if form is not None:
        body = urlencode(form)
        sent["Content-Type"] = "application/x-www-form-urlencoded"
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    text = response.read().decode("utf-8", "replace")
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, text


def sign_in(server, token: str) -> tuple[str, str]:
    """A session cookie for `token` and the CSRF secret of its forms."""
    origin = f"http://127.0.0.1:{server.dashboard.port}"
    status, headers, _ = request(server, "POST", "/login", form={"token": token, "next": "/actions"},
                                 headers={"Origin": origin})
    assert status == 303 and headers["location"] == "/actions"
    cookie_header = headers["set-cookie"]
    assert "HttpOnly" in cookie_header and "SameSite=Strict" in cookie_header
    assert "Secure" not in cookie_header  # plain HTTP on loopback; Secure under TLS
    cookie = cookie_header.split(";", 1)[0]
    status, _, body = request(server, "GET", "/actions", cookie=cookie)
    assert status == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
    return cookie, csrf


PAGES = ["/", "/preview", "/preview?user=demo-user-001", "/items/demo-0001", "/evaluation",
         "/evaluation/plots/temporal_ndcg10.png", "/actions", "/no-such-page"]


# ---------------------------------------------------------------- without a browser


def test_every_page_needs_a_token(dashboard_server):
    for path in PAGES:
        status, headers, body = request(dashboard_server, "GET", path)
        assert status == 401, path
        assert "Sign in" in body and 'id="serving-version"' not in body and 'id="recommendations"' not in body
        status, _, _ = request(dashboard_server, "GET", path, token="not-a-configured-token-at-all")
        assert status == 401, path
    status, _, _ = request(dashboard_server, "POST", "/actions/activate", form={"version": "x"})
    assert status == 401
    # A bad sign-in is refused without a cookie.
    origin = f"http://127.0.0.1:{dashboard_server.dashboard.port}"
    status, headers, _ = request(dashboard_server, "POST", "/login", form={"token": "wrong-token-0123456789"},
                                 headers={"Origin": origin})
    assert status == 401 and "set-cookie" not in headers
    # With a read token, every page opens (the made-up path is a 404 page).
    for path in PAGES:
        status, headers, _ = request(dashboard_server, "GET", path, token=READ_TOKEN)
        assert status == (404 if path == "/no-such-page" else 200), path
        if path != "/evaluation/plots/temporal_ndcg10.png":
            assert "default-src 'none'" in headers["content-security-policy"]


def test_cross_site_posts_are_refused(dashboard_server):
    cookie, csrf = sign_in(dashboard_server, ADMIN_TOKEN)
    origin = f"http://127.0.0.1:{dashboard_server.dashboard.port}"
    form = {"version": dashboard_server.spare_version, "csrf": csrf}
    # Another site's page posting with the browser's cookie: its Origin gives it away.
    status, _, body = request(dashboard_server, "POST", "/actions/activate", cookie=cookie, form=form,
                              headers={"Origin": "https://evil.example"})
    assert status == 403 and "cross-site" in body
    # Without the session's CSRF secret (or with another), even from this origin.
    for wrong in ({"version": form["version"]}, {**form, "csrf": "guessed"}):
        status, _, _ = request(dashboard_server, "POST", "/actions/activate", cookie=cookie, form=wrong,
                               headers={"Origin": origin})
        assert status == 403
    # No Origin and no Referer: refused too (a form post from a browser always sends one).
    status, _, _ = request(dashboard_server, "POST", "/actions/activate", cookie=cookie, form=form)
    assert status == 403
    # A sign-in posted from another site is refused as well (login CSRF).
    status, _, _ = request(dashboard_server, "POST", "/login", form={"token": READ_TOKEN},
                           headers={"Origin": "https://evil.example"})
    assert status == 403
    # The same form from this dashboard gets the confirmation page, and nothing changed yet.
    status, _, body = request(dashboard_server, "POST", "/actions/activate", cookie=cookie, form=form,
                              headers={"Origin": origin})
    assert status == 200 and 'name="confirm" value="yes"' in body
    assert dashboard_server.engine.serving_version() != dashboard_server.spare_version


def test_item_text_is_escaped(dashboard_server):
    hostile = Item(
        item_id="hostile-1",
        title='<script>alert("title")</script>',
        text='<img src=x onerror=alert(1)> & "quotes" </td></table>',
        category="<b>cat</b>",
        # Available only after the times the browser test asks for, so it never enters their lists.
        published_at=ANCHOR - 2 * DAY,
        expires_at=ANCHOR + DAY,
        attributes={"<i>key</i>": "<svg onload=alert(2)>"},
    )
    dashboard_server.engine.upsert_items([hostile])
    status, _, body = request(dashboard_server, "GET", f"/items/hostile-1?at={int(ANCHOR)}", token=READ_TOKEN)
    assert status == 200
    for raw in ("<script>alert", "<img src=x", "<svg onload", "<b>cat</b>", "<i>key</i>", "</td></table>"):
        assert raw not in body, raw
    assert "&lt;script&gt;alert(&#34;title&#34;)&lt;/script&gt;" in body
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &#34;quotes&#34;" in body
    # The preview shows it too (as a history item, in the history text the encoder read).
    query = urlencode({"history": f"hostile-1 like {int(ANCHOR - 3600)}", "at": int(ANCHOR), "k": 5})
    status, _, body = request(dashboard_server, "GET", f"/preview?{query}", token=READ_TOKEN)
    assert status == 200 and "<script>alert" not in body and "&lt;script&gt;alert" in body
    # A page name with markup in it is not reflected raw either.
    status, _, body = request(dashboard_server, "GET", "/items/%3Cscript%3Ex%3C%2Fscript%3E", token=READ_TOKEN)
    assert status == 404 and "<script>x" not in body


def test_status_and_evaluation_pages_show_the_server(dashboard_server):
    engine = dashboard_server.engine
    status, _, body = request(dashboard_server, "GET", "/", token=READ_TOKEN)
    assert status == 200
    assert f'id="serving-version">{engine.serving_version()}<' in body
    assert f'id="catalog-items">{len(engine.catalog):,}<' in body
    assert f'id="event-count">{engine.state.event_count:,}<' in body
    assert dashboard_server.spare_version in body  # every version is listed
    status, _, body = request(dashboard_server, "GET", "/evaluation", token=READ_TOKEN)
    assert status == 200 and "MostPop" in body and "RecentPop-7d" in body and "<table" in body
    assert 'src="/evaluation/plots/temporal_ndcg10.png"' in body
    status, headers, _ = request(dashboard_server, "GET", "/evaluation/plots/..%2Freport.json", token=READ_TOKEN)
    assert status == 404


# ---------------------------------------------------------------- in a real browser


def drifting_user(demo):
    """A demo user whose interest switches in October, with enough events on both sides."""
    november = ANCHOR - 3 * DAY
    for user in demo.users:
        events = [e for e in demo.events if e.user_id == user.user_id]
        before = [e for e in events if e.timestamp < OCTOBER_1]
        after = [e for e in events if user.switch_at <= e.timestamp < november]
        if OCTOBER_1 + 3 * DAY < user.switch_at < OCTOBER_1 + 27 * DAY and len(before) >= 12 and len(after) >= 12:
            return user
    raise AssertionError("the demo has no user switching in October")


@pytest.fixture(scope="module")
def browser():
    have = CHROMEDRIVER.exists() and CHROMIUM.exists()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        have = False
    if not have:
        message = "Debian's chromium and chromium-driver (and selenium) are needed for the browser test"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " in CI: .ci/run installs them")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    # The packaged driver, named explicitly: selenium-manager would try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _sign_in(driver, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(base + "/")
    assert "Sign in" in driver.page_source
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    _wait(lambda: driver.find_elements(By.ID, "serving-version"))


def _wait(condition, timeout: float = 60.0):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
        except (StaleElementReferenceException, NoSuchElementException):
            # The page re-rendered (the Status page refreshes itself) between finding an element and
            # reading it: look again.
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the page")


def _text(driver, element_id: str) -> str:
    """An element's text on a page that may re-render while it is read."""
    from selenium.webdriver.common.by import By

    return _wait(lambda: (driver.find_element(By.ID, element_id).text,))[0]


def _top_categories(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [row.get_attribute("data-category") for row in driver.find_elements(By.CSS_SELECTOR, "tr.recommendation")]


def _move_slider(driver, seconds: float) -> None:
    """Set the time slider as a user's drag ends: its value, an input event, then change (which reloads)."""
    from selenium.webdriver.common.by import By

    old = driver.find_element(By.ID, "preview-at").text
    slider = driver.find_element(By.ID, "at-slider")
    driver.execute_script(
        "arguments[0].value = arguments[1];"
        "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));"
        "arguments[0].dispatchEvent(new Event('change', {bubbles: true}));",
        slider, str(int(seconds)),
    )
    _wait(lambda: driver.find_elements(By.ID, "preview-at") and driver.find_element(By.ID, "preview-at").text != old)


def test_in_a_browser(dashboard_server, browser, demo):
    from selenium.webdriver.common.by import By

    driver = browser
    base = f"http://127.0.0.1:{dashboard_server.dashboard.port}"
    _sign_in(driver, base, READ_TOKEN)
    assert _text(driver, "serving-version") == dashboard_server.engine.serving_version()
    driver.save_screenshot(str(SCREENSHOTS / "status.png"))
    # The Status page refreshes itself: a catalog change shows without navigating.
    before = _text(driver, "catalog-items")
    dashboard_server.engine.upsert_items([Item(item_id="refresh-probe", title="Published next year",
                                               published_at=ANCHOR + 365 * DAY)])
    _wait(lambda: driver.find_element(By.ID, "catalog-items").text != before, timeout=20)
    assert driver.current_url.rstrip("/") == base

    # The user preview: the slider moves from October to November and the list follows the drift.
    user = drifting_user(demo)
    driver.get(f"{base}/preview?" + urlencode({"user": user.user_id, "k": 10, "at": int(ANCHOR)}))
    _move_slider(driver, OCTOBER_1 + 12 * 3600)
    assert driver.find_element(By.ID, "preview-at").text.startswith("2025-10-01")
    october = _top_categories(driver)
    october_text = driver.find_element(By.ID, "history-text").text
    driver.save_screenshot(str(SCREENSHOTS / "preview-october.png"))
    _move_slider(driver, ANCHOR - 3 * DAY)
    assert driver.find_element(By.ID, "preview-at").text.startswith("2025-11-28")
    november = _top_categories(driver)
    november_text = driver.find_element(By.ID, "history-text").text
    driver.save_screenshot(str(SCREENSHOTS / "preview-november.png"))
    # The encoder read the newer events in November: its text changed with the slider.
    assert october_text.strip() and november_text.strip() and october_text != november_text
    # What the demo's ground truth says: the topic before the switch leads in October, the topic
    # after it in November: first place, and more places than any other topic (the rest is the
    # demo's noise and fresh or popular items of other topics).
    for top, leading, other in ((october, user.topic_before, user.topic_after),
                                (november, user.topic_after, user.topic_before)):
        runner_up = max((top.count(c) for c in set(top) - {leading}), default=0)
        assert top[0] == leading and top.count(leading) > runner_up and top.count(other) < 3, (user, top)

    # An item page, from the list.
    driver.find_element(By.CSS_SELECTOR, "tr.recommendation a").click()
    _wait(lambda: driver.find_elements(By.ID, "trend"))
    assert driver.find_elements(By.CSS_SELECTOR, "#trend svg rect")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#similar tbody tr")) >= 5
    driver.save_screenshot(str(SCREENSHOTS / "item.png"))

    driver.get(base + "/evaluation")
    assert driver.find_elements(By.CSS_SELECTOR, "#report img")
    assert driver.execute_script("return document.querySelector('#report img').naturalWidth") > 0
    driver.save_screenshot(str(SCREENSHOTS / "evaluation.png"))

    # Activation: refused with the read token ...
    spare = dashboard_server.spare_version
    driver.get(base + "/actions")
    driver.save_screenshot(str(SCREENSHOTS / "actions.png"))
    _choose_and_activate(driver, spare)
    _wait(lambda: driver.find_elements(By.ID, "error-message"))
    assert "needs an admin token" in driver.find_element(By.ID, "error-message").text
    assert dashboard_server.engine.serving_version() != spare

    # ... and done with the admin token, after the confirmation.
    _sign_in(driver, base, ADMIN_TOKEN)
    driver.get(base + "/actions")
    _choose_and_activate(driver, spare)
    _wait(lambda: driver.find_elements(By.ID, "confirm"))
    assert spare in driver.find_element(By.ID, "plan").text
    driver.find_element(By.ID, "confirm").click()
    _wait(lambda: driver.find_elements(By.ID, "outcome"), timeout=120)
    assert spare in driver.find_element(By.ID, "outcome").text
    driver.save_screenshot(str(SCREENSHOTS / "activated.png"))
    channel = grpc.insecure_channel(f"127.0.0.1:{dashboard_server.port}")
    try:
        status = models_pb2_grpc.ModelServiceStub(channel).GetStatus(
            models_pb2.GetStatusRequest(), metadata=[("authorization", f"Bearer {READ_TOKEN}")], timeout=30)
    finally:
        channel.close()
    assert status.serving_version == spare


def _choose_and_activate(driver, version: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "activate-version")).select_by_value(version)
    driver.find_element(By.ID, "activate").click()


# ---------------------------------------------------------------- host rules, TLS, sessions


def test_public_address_needs_tokens(start_server, tiny_repo):
    from chronorec.server.security import SecurityConfigError

    with pytest.raises(SecurityConfigError, match="dashboard"):
        start_server(tiny_repo, dashboard_port=0, dashboard_host="0.0.0.0", wait=False)


def test_loopback_without_tokens_still_needs_the_csrf_secret(start_server, tiny_repo):
    server = start_server(tiny_repo, dashboard_port=0)
    running = server.running
    status, headers, body = request(running, "GET", "/actions")
    assert status == 200 and "unauthenticated@loopback" in body
    cookie = headers["set-cookie"].split(";", 1)[0]
    csrf = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
    origin = f"http://127.0.0.1:{running.dashboard.port}"
    status, _, _ = request(running, "POST", "/actions/rollback", cookie=cookie, form={}, headers={"Origin": origin})
    assert status == 403
    status, _, body = request(running, "POST", "/actions/rollback", cookie=cookie, form={"csrf": csrf},
                              headers={"Origin": origin})
    assert status == 200 and 'name="confirm"' in body


def test_tls_serves_https_with_a_secure_cookie(start_server, tiny_repo, tmp_path):
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    from hardening import make_ca, make_cert

    ca = make_ca(tmp_path / "pki", "ca")
    cert, key = make_cert(tmp_path / "pki", "server", ca, server=True)
    server = start_server(tiny_repo, dashboard_port=0, tls_cert=cert, tls_key=key,
                          inline_tokens=f"read {READ_TOKEN} viewer")
    port = server.running.dashboard.port
    assert server.running.dashboard.url.startswith("https://")
    context = ssl.create_default_context(cafile=str(ca[0]))
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    connection.request("POST", "/login", body=urlencode({"token": READ_TOKEN}),
                       headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": f"https://127.0.0.1:{port}"})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 303
    assert "Secure" in response.getheader("Set-Cookie") and "HttpOnly" in response.getheader("Set-Cookie")
    # Plain HTTP to the TLS port gets no page.
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        plain.request("GET", "/", headers={"Authorization": f"Bearer {READ_TOKEN}"})
        answer = plain.getresponse()
        answer.read()
        status = answer.status
    except (http.client.HTTPException, OSError):
        status = None
    finally:
        plain.close()
    assert status != 200


def test_pages_follow_the_grpc_roles():
    from chronorec.server.dashboard.web import ACTIONS, SAME_AS_RPC
    from chronorec.server.security import REQUIRED_ROLE, Role

    assert all(method in REQUIRED_ROLE for method in SAME_AS_RPC.values())
    assert set(ACTIONS) <= set(SAME_AS_RPC)
    assert {REQUIRED_ROLE[SAME_AS_RPC[name]] for name in ACTIONS} == {Role.ADMIN}
    assert {REQUIRED_ROLE[method] for name, method in SAME_AS_RPC.items() if name not in ACTIONS} == {Role.READ}


def test_sessions_follow_the_tokens_file(tmp_path):
    from chronorec.server.dashboard.sessions import SessionStore
    from chronorec.server.security import Role, TokenTable

    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"admin {ADMIN_TOKEN} operator\nread {READ_TOKEN} viewer\n")
    tokens_file.chmod(0o600)
    now = [1000.0]
    store = SessionStore(TokenTable(tokens_file, reload_interval_s=0.0), lifetime_s=60.0, max_sessions=3,
                         clock=lambda: now[0])
    assert store.sign_in("not-a-configured-token-0000") is None
    admin, principal = store.sign_in(ADMIN_TOKEN)
    assert principal.role == Role.ADMIN and ADMIN_TOKEN not in repr(admin)
    reader, _ = store.sign_in(READ_TOKEN)
    assert store.resolve(admin.session_id)[1].label == "operator"
    # Rotating the admin token out ends its session at once; the reader's stays.
    tokens_file.write_text(f"read {READ_TOKEN} viewer\n")
    os.utime(tokens_file, ns=(time.time_ns() + 10**9,) * 2)
    assert store.resolve(admin.session_id) is None
    assert store.resolve(reader.session_id) is not None
    # Sessions end after their lifetime, and the oldest go first past the bound.
    now[0] += 61.0
    assert store.resolve(reader.session_id) is None
    sessions = [store.sign_in(READ_TOKEN)[0] for _ in range(4)]
    assert len(store) == 3 and store.resolve(sessions[0].session_id) is None
    assert store.csrf_matches(sessions[-1], sessions[-1].csrf) and not store.csrf_matches(sessions[-1], sessions[0].csrf)
