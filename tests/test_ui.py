"""The chat page at GET /: served as it is, and driven in a real headless Chromium (Debian's chromium and
chromedriver, through selenium) against a real `flatstack serve` on loopback with a small random model.

The browser tests skip, with the reason, where chromium, chromedriver or selenium is missing (`make install`
installs Debian's packages where apt-get runs as root). One browser serves every test and one server
each configuration (no key; --api-key with a queue of 2), started side by side. Set
FLATSTACK_UI_SCREENSHOT=docs/chat.png to write the mid-answer screenshot the README shows."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from serving import AUTH, KEY, MODEL, H, idle, metric, post, running_server, tiny_checkpoint

from flatstack import LLM
from flatstack.server import ServerConfig, create_app

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the page's own tests below still run
    webdriver = None

PAGE_LIMIT = 100_000  # bytes: the bound on the page's weight
# An answer the page must show as text: if any of it ran, window.__pwned would be set.
HOSTILE = ('<script>window.__pwned = "script"</script> <img src=x onerror="window.__pwned = \'img\'"> '
           '[click](javascript:window.__pwned=1) **bold <b onmouseover=alert(1)>b</b>**\n'
           '```html\n<script>window.__pwned = "code"</script>\n```\n<svg onload="window.__pwned=2"></svg>')


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # the tests' slow model (25M parameters): a 200-token answer lasts long enough to be stopped mid-way
    return tiny_checkpoint(tmp_path_factory.mktemp("ui"), d_model=512, n_layers=8, ffn_dim=2048)


@pytest.fixture(scope="module")
def servers(checkpoint):
    """Two servers, started and stopped side by side (each takes seconds to import torch and load): one
    without a key, one with --api-key whose queue one request of 2 sequences, run one at a time, fills."""
    contexts = [running_server(checkpoint, "--enforce-eager", key=None),
                running_server(checkpoint, "--enforce-eager", "--max-queue", "2", "--max-num-seqs", "1")]
    with ThreadPoolExecutor(2) as pool:
        started = [pool.submit(c.__enter__) for c in contexts]
        try:
            yield [f.result() for f in started]
        finally:  # leaving the pool waits for both to stop
            for c, f in zip(contexts, started, strict=True):
                if f.exception() is None:
                    pool.submit(c.__exit__, None, None, None)


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def keyed(servers):
    return servers[1]


@pytest.fixture(scope="module")
def browser():
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium and chromedriver on PATH: `make install` installs Debian's chromium and "
                    "chromium-driver where apt-get runs as root")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,860",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # and were selenium-manager ever asked, it may not download anything
        d = webdriver.Chrome(service=Service(driver), options=options)  # a driver path given: no selenium-manager
    yield d
    d.quit()


# ---------------------------------------------------------------------------------------------
# the page as served (no browser)


def test_the_page_is_one_small_self_contained_file(server, keyed):
    r = httpx.get(f"{server}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert len(r.content) < PAGE_LIMIT, len(r.content)
    html = r.text
    assert "http://" not in html and "https://" not in html and "//cdn" not in html  # nothing fetched from outside
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "connect-src 'self'" in policy
    # with --api-key the page is open and carries no secret; the API is not open
    page = httpx.get(f"{keyed}/")
    assert page.status_code == 200 and KEY not in page.text
    assert httpx.get(f"{keyed}/v1/models").status_code == 401
    assert httpx.get(f"{keyed}/v1/models", headers=AUTH).status_code == 200


def test_no_ui_turns_the_page_off_and_leaves_the_api(checkpoint):
    llm = LLM(checkpoint, kv_cache_memory=1 << 20, enforce_eager=True)
    off = TestClient(create_app(llm, ServerConfig(served_model_name=MODEL, ui=False)))
    r = off.get("/")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /"
    assert off.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert off.post("/tokenize", json={"prompt": "ab"}).json()["count"] == 2
    on = TestClient(create_app(llm, ServerConfig(served_model_name=MODEL, api_key=KEY)))
    assert on.get("/").status_code == 200 and on.get("/v1/models").status_code == 401
    assert "/" not in on.get("/openapi.json", headers=AUTH).json()["paths"]  # the schema stays the API's


def test_serve_takes_no_ui():
    from flatstack.cli import build_parser

    assert build_parser().parse_args(["serve", "m", "--no-ui"]).ui is False
    assert build_parser().parse_args(["serve", "m"]).ui is True


# ---------------------------------------------------------------------------------------------
# in the browser


def js(d, script: str, *args):
    return d.execute_script(script, *args)


def wait(d, condition, timeout: float = 30):
    return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda _: condition())


def open_page(d, url: str, key: str | None = None, connected: bool = True, saved: dict | None = None) -> None:
    """The page on a fresh start: no stored conversation but `saved`, and the given key typed in before."""
    d.get(f"{url}/")
    # the page saves its conversation as it unloads: storage is shut to it until the reload
    js(d, "localStorage.clear(); sessionStorage.clear();"
          "if (arguments[0]) sessionStorage.setItem('flatstack-api-key', arguments[0]);"
          "if (arguments[1]) localStorage.setItem('flatstack-chat', arguments[1]);"
          "Storage.prototype.setItem = () => {};", key, json.dumps(saved) if saved else None)
    d.refresh()
    if connected:
        wait(d, lambda: d.find_element(By.ID, "model").text == MODEL)


def stored(d) -> dict:
    return json.loads(js(d, "return localStorage.getItem('flatstack-chat')") or '{"messages": []}')


def set_field(d, name: str, value: str) -> None:
    js(d, "const e = document.getElementById(arguments[0]); e.value = arguments[1]; "
          "e.dispatchEvent(new Event('input'))", name, value)


def send(d, text: str) -> None:
    d.find_element(By.ID, "input").send_keys(text, Keys.ENTER)


def answered(d, count: int) -> None:
    """Waits for the page to be idle with `count` messages stored."""
    wait(d, lambda: d.find_element(By.ID, "send").is_displayed() and len(stored(d)["messages"]) == count)


def error_text(d) -> str:
    e = d.find_element(By.ID, "error")
    return e.text if e.is_displayed() else ""


def last_answer(d) -> str:
    """Read in the page: while an answer streams, its element is replaced at each update."""
    return js(d, "const b = document.querySelectorAll('#messages .msg.assistant .body'); "
                 "return b.length ? b[b.length - 1].textContent : ''")


WATCH = """window.__lengths = [];
new MutationObserver(() => {
  const b = document.querySelector('#messages .msg.assistant:last-child .body');
  if (b) window.__lengths.push(b.textContent.length);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});"""

IGNORE_EOS = """const real = window.fetch;
window.fetch = (url, options) => real(url, options && options.body
  ? {...options, body: JSON.stringify({...JSON.parse(options.body), ignore_eos: true})} : options);"""

# The chat route answered by the test itself: window.__push(text) sends a delta, window.__end() ends it.
FAKE_STREAM = r"""window.__push = null;
const real = window.fetch;
window.fetch = (url, options) => {
  if (!String(url).endsWith('chat/completions')) return real(url, options);
  const encoder = new TextEncoder();
  const event = (obj) => encoder.encode('data: ' + JSON.stringify(obj) + '\n\n');
  const body = new ReadableStream({start(c) {
    window.__push = (text) => c.enqueue(event({choices: [{index: 0, delta: {content: text}, finish_reason: null}]}));
    window.__end = () => { c.enqueue(encoder.encode('data: [DONE]\n\n')); c.close(); };
    const stop = () => { try { c.error(new DOMException('stop', 'AbortError')); } catch {} };
    options.signal.addEventListener('abort', stop);
  }});
  return Promise.resolve(new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}}));
};"""


def test_a_typed_message_streams_in_and_equals_the_api(browser, server):
    d = browser
    open_page(d, server)
    d.find_element(By.ID, "toggle-settings").click()
    for name, value in (("temperature", "0"), ("max_tokens", "24")):
        field = d.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    js(d, WATCH)
    box = d.find_element(By.ID, "input")
    box.send_keys("Hello there")
    ActionChains(d).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()  # a new line
    box.send_keys("friend", Keys.ENTER)  # sends
    answered(d, 2)
    user, answer = stored(d)["messages"]
    assert user == {"role": "user", "content": "Hello there\nfriend"}
    assert d.find_element(By.CSS_SELECTOR, "#messages .msg.user .body").text == "Hello there\nfriend"
    api = post(server, H, {"model": MODEL, "messages": [user], "temperature": 0, "top_p": 0.95, "max_tokens": 24},
               key=None, timeout=60).json()
    assert answer["content"] == api["choices"][0]["message"]["content"]
    assert api["usage"]["completion_tokens"] >= 10  # long enough to arrive in pieces
    lengths = [n for n in dict.fromkeys(js(d, "return window.__lengths")) if n]
    assert len(lengths) >= 4, lengths  # the answer grew over several updates, not at once at the end
    assert "tokens/s" in d.find_element(By.ID, "stats").text


def test_reload_keeps_the_conversation(browser, server):
    d = browser  # the conversation of the test above
    before, shown = stored(d), [e.text for e in d.find_elements(By.CSS_SELECTOR, "#messages .msg")]
    assert len(before["messages"]) == 2
    d.refresh()
    wait(d, lambda: d.find_element(By.ID, "model").text == MODEL)
    assert stored(d) == before
    assert [e.text for e in d.find_elements(By.CSS_SELECTOR, "#messages .msg")] == shown
    assert d.find_element(By.ID, "temperature").get_attribute("value") == "0"
    assert "tokens/s" in d.find_element(By.ID, "stats").text
    d.find_element(By.ID, "new").click()
    assert not d.find_elements(By.CSS_SELECTOR, "#messages .msg") and stored(d)["messages"] == []


def test_stop_aborts_the_request_and_frees_its_kv_blocks(browser, server):
    d = browser
    open_page(d, server)
    kv = ("flatstack_kv_blocks_used", "flatstack_kv_blocks_free")
    before, generated = {n: metric(server, n) for n in kv}, metric(server, "flatstack_generation_tokens_total")
    set_field(d, "max_tokens", "200")
    js(d, IGNORE_EOS)  # 200 tokens, whatever the random model samples: seconds of answer to stop
    send(d, "Tell me a long story")
    wait(d, lambda: len(last_answer(d)) >= 3 and metric(server, kv[0]) > before[kv[0]])
    d.find_element(By.ID, "stop").click()
    answered(d, 2)
    assert stored(d)["messages"][-1]["note"] == "stopped"
    wait(d, lambda: not any(idle(server).values()), timeout=5)  # the server aborted it at once
    assert {n: metric(server, n) for n in kv} == before  # the KV pool is back where it was
    assert metric(server, "flatstack_generation_tokens_total") - generated < 200  # cut short, not finished


def test_a_bad_request_is_shown_in_words_and_the_page_recovers(browser, server):
    d = browser
    open_page(d, server)
    set_field(d, "max_tokens", "100000")
    send(d, "hi")
    wait(d, lambda: error_text(d))
    assert "could not take this request (400)" in error_text(d) and "max_tokens 100000" in error_text(d)
    assert d.find_element(By.ID, "input").get_attribute("value") == "hi" and stored(d)["messages"] == []
    set_field(d, "max_tokens", "4")
    d.find_element(By.ID, "input").send_keys(Keys.ENTER)
    answered(d, 2)
    assert not error_text(d) and stored(d)["messages"][1]["content"]


def test_the_api_key_is_asked_for_and_a_wrong_one_refused(browser, keyed):
    d = browser
    open_page(d, keyed, connected=False)
    wait(d, lambda: "needs an API key (401)" in error_text(d))
    key = d.find_element(By.ID, "key")
    assert key.is_displayed()
    key.send_keys("wrong", Keys.ENTER)
    wait(d, lambda: "refused this API key (401)" in error_text(d))
    key.send_keys(KEY, Keys.ENTER)
    wait(d, lambda: d.find_element(By.ID, "model").text == MODEL)
    assert not error_text(d) and not key.is_displayed()
    set_field(d, "max_tokens", "4")
    send(d, "hi")
    answered(d, 2)
    assert KEY not in d.page_source  # the key lives in the tab's session storage, not in the page


def test_a_busy_server_is_shown_in_words_and_the_page_recovers(browser, keyed):
    d = browser
    open_page(d, keyed, key=KEY)
    set_field(d, "max_tokens", "4")
    hold = {"model": MODEL, "prompt": "x", "n": 2, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{keyed}/v1/completions", json=hold, headers=AUTH, timeout=60) as held:
        lines = held.iter_lines()  # kept: a generator dropped here would close the stream
        next(lines)  # both sequences are in, 400 decode steps to go: the queue is full
        send(d, "are you there?")
        wait(d, lambda: "busy (503)" in error_text(d))
        assert "Try again in 1 s" in error_text(d)
        assert d.find_element(By.ID, "input").get_attribute("value") == "are you there?"
        assert metric(keyed, "flatstack_queue_sequences") == 2  # the held stream was still running throughout
    wait(d, lambda: not any(idle(keyed).values()), timeout=5)
    d.find_element(By.ID, "input").send_keys(Keys.ENTER)
    answered(d, 2)
    assert not error_text(d)


def assert_inert(d) -> None:
    box = d.find_element(By.ID, "messages")
    assert js(d, "return window.__pwned") is None
    assert not box.find_elements(By.CSS_SELECTOR, "script, img, svg, b, iframe, a, [onerror], [onload], [onmouseover]")
    text = box.text
    assert '<script>window.__pwned = "script"</script>' in text and "onerror=\"window.__pwned = 'img'\"" in text
    assert "[click](javascript:window.__pwned=1)" in text and '<svg onload="window.__pwned=2"></svg>' in text
    assert box.find_elements(By.CSS_SELECTOR, "pre code")[-1].text == '<script>window.__pwned = "code"</script>'
    assert box.find_elements(By.CSS_SELECTOR, "strong")[-1].text == "bold <b onmouseover=alert(1)>b</b>"


def test_model_html_is_shown_as_text_and_runs_nothing(browser, server):
    d = browser
    saved = {"messages": [{"role": "user", "content": "<b>hi</b>"}, {"role": "assistant", "content": HOSTILE}]}
    open_page(d, server, saved=saved)  # from a stored conversation
    assert_inert(d)
    js(d, "document.getElementById('new').click()")
    js(d, FAKE_STREAM)  # and as it streams in, a few characters at a time
    send(d, "again")
    wait(d, lambda: js(d, "return !!window.__push"))
    for i in range(0, len(HOSTILE), 7):
        js(d, "window.__push(arguments[0])", HOSTILE[i:i + 7])
    js(d, "window.__end()")
    answered(d, 2)
    assert stored(d)["messages"][1]["content"] == HOSTILE
    assert_inert(d)


def test_a_new_conversation_mid_answer_ends_the_answer_and_keeps_nothing_of_it(browser, server):
    d = browser
    open_page(d, server)
    js(d, FAKE_STREAM)
    send(d, "hello")
    wait(d, lambda: js(d, "return !!window.__push"))
    js(d, "window.__push('half an answ')")
    wait(d, lambda: last_answer(d) == "half an answ")
    d.find_element(By.ID, "new").click()
    wait(d, lambda: d.find_element(By.ID, "send").is_displayed())
    assert stored(d)["messages"] == [] and not d.find_elements(By.CSS_SELECTOR, "#messages .msg")
    assert not error_text(d)


FRIENDLY = ["Use the official **`openai`** client, ", "pointed at this server:\n\n", "```python\n",
            "from openai import OpenAI\n\n", 'client = OpenAI(base_url="http://127.0.0.1:8000/v1", ',
            'api_key="sekret")\n', "stream = client.chat.completions.create(\n",
            '    model="tiny", messages=[{"role": "user", "content": "Hi!"}], stream=True)\n',
            "for chunk in stream:\n", '    print(chunk.choices[0].delta.content or "", end="")\n', "```\n\n",
            "A few things to know:\n\n", "1. `stream=True` gives the answer ",
            "token by token, as this page shows it.\n",
            "2. Without `max_tokens`, an answer ", "may run to the end of the context.\n",
            "3. The fields are *OpenAI's*: see ", "[its API reference](https://platform.openai.com/docs/api-reference).\n"]


def test_markdown_renders_as_it_streams_and_a_screenshot_mid_answer(browser, server, tmp_path):
    d = browser
    open_page(d, server)
    js(d, FAKE_STREAM)
    send(d, "How do I call this server from Python?")
    wait(d, lambda: js(d, "return !!window.__push"))
    half = FRIENDLY.index("A few things to know:\n\n") + 3
    for piece in FRIENDLY[:half]:
        js(d, "window.__push(arguments[0])", piece)
    wait(d, lambda: last_answer(d).endswith("token by token, as this page shows it."))
    assert d.find_element(By.ID, "stop").is_displayed()  # mid-answer
    assert d.find_element(By.ID, "stats").text.startswith("answering: ")
    shot = os.environ.get("FLATSTACK_UI_SCREENSHOT") or tmp_path / "chat.png"
    assert d.save_screenshot(str(shot))
    for piece in FRIENDLY[half:]:
        js(d, "window.__push(arguments[0])", piece)
    js(d, "window.__end()")
    answered(d, 2)
    answer = d.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant .body")[-1]
    assert answer.find_element(By.CSS_SELECTOR, "pre code").text.startswith("from openai import OpenAI\n\nclient")
    assert [li.text for li in answer.find_elements(By.CSS_SELECTOR, "ol li")][1].startswith("Without max_tokens")
    assert answer.find_element(By.CSS_SELECTOR, "strong code").text == "openai"
    assert answer.find_element(By.CSS_SELECTOR, "em").text == "OpenAI's"
    link = answer.find_element(By.CSS_SELECTOR, "a")
    assert link.get_attribute("href") == "https://platform.openai.com/docs/api-reference"
    assert link.get_attribute("rel") == "noopener noreferrer nofollow"


def test_the_page_loads_within_a_second(browser, server):
    d = browser
    open_page(d, server)
    d.refresh()  # a second visit: the browser is warm, as a person's is
    wait(d, lambda: d.find_element(By.ID, "model").text == MODEL)
    timing = js(d, """const n = performance.getEntriesByType('navigation')[0];
        const models = performance.getEntriesByType('resource').find((r) => r.name.endsWith('/v1/models'));
        return {bytes: n.encodedBodySize, load_ms: n.loadEventEnd - n.startTime,
                connected_ms: models.responseEnd - n.startTime};""")
    print(f"\nchat page: {timing}")
    assert 0 < timing["bytes"] < PAGE_LIMIT
    assert 0 < timing["load_ms"] < 1000 and timing["connected_ms"] < 1000
