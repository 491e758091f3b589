"""Open every page of the built book in headless Chromium and check what a reader sees.

    python tests/browser_check.py [HTML_DIR] [--screenshots DIR]

HTML_DIR defaults to _build/html (run ``make book`` first). The book is served by a
static server this script starts on 127.0.0.1; Chromium (Debian's ``chromium``) is
driven through its DevTools protocol and cannot resolve any other host. A page
fails the check when:

- math is left untypeset: a math element without a MathJax rendering, a MathJax
  error, or raw TeX (``\\(``, ``$...$``) in the text outside code;
- an image does not load (``naturalWidth`` 0) or comes from another host;
- any request leaves 127.0.0.1, or fails, or gets an HTTP error;
- it shows an error output, a traceback or a docutils error message;
- it throws a JavaScript exception;
- an internal link points to a missing file or to a missing anchor;
- it is a notebook page without a Colab launch link and a download button.

It also searches the book for "softmax" on search.html and fails on no results,
and saves screenshots of a few pages (default _build/screenshots). It prints
what it checked; the exit status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import websocket  # websocket-client, a dependency of jupyter_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    # Only the book's own server resolves; every other host fails at once.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,900",
]
SEARCH_QUERY = "softmax"
SCREENSHOT_PAGES = [
    "index.html",
    "book/notation.html",
    "book/glossary.html",
    "book/api.html",
]
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads"}

# Runs in the page once it has loaded: waits for MathJax and the images, then
# returns everything the checks below need, as plain JSON.
PAGE_JS = r"""
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const deadline = Date.now() + 15000;
  // window.MathJax starts as a configuration object; startup exists once loaded.
  const mathjax = !!(window.MathJax && MathJax.startup);
  if (mathjax && MathJax.startup.promise) await MathJax.startup.promise;
  const untypeset = () => [...document.querySelectorAll(".math")]
    .filter((m) => !m.querySelector("mjx-container"));
  while (mathjax && untypeset().length && Date.now() < deadline) {
    await sleep(50);
  }
  const imgs = [...document.images];
  imgs.forEach((i) => { i.loading = "eager"; });
  await Promise.all(imgs.map((i) => i.complete ? null : Promise.race([
    new Promise((r) => { i.onload = i.onerror = r; }), sleep(5000)])));

  // Raw TeX outside code: text nodes not inside code, scripts or MathJax output.
  const skip = "pre, code, script, style, textarea, mjx-container, .highlight";
  const tex = /\\\(|\\\[|\$\$|\\begin\{|\$[^$\s](?:[^$\n]*[^$\s])?\$/;
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (n.parentElement.closest(skip)) continue;
    if (tex.test(n.textContent)) raw.push(n.textContent.trim().slice(0, 80));
  }
  const errorSel = [".output.traceback", ".output.error", ".traceback",
    ".system-message", ".problematic"].join(", ");
  const abs = (a) => a.href;
  return {
    title: document.title,
    mathjax: mathjax,
    math: document.querySelectorAll(".math").length,
    typeset: document.querySelectorAll("mjx-container").length,
    untypeset: untypeset().map((m) => m.textContent.slice(0, 60)),
    mathErrors: [...document.querySelectorAll("mjx-merror")]
      .map((e) => e.textContent.slice(0, 60)),
    rawTex: raw,
    images: imgs.map((i) => ({src: i.currentSrc || i.src,
      ok: i.complete && i.naturalWidth > 0})),
    errors: [...document.querySelectorAll(errorSel)]
      .map((e) => e.className + ": " + e.textContent.trim().slice(0, 100)),
    traceback: document.body.innerText.includes("Traceback (most recent call last)"),
    links: [...new Set([...document.querySelectorAll("a[href]")].map(abs))],
    ids: [...document.querySelectorAll("[id]")].map((e) => e.id)
      .concat([...document.querySelectorAll("a[name]")].map((e) => e.name)),
    colab: [...document.querySelectorAll('a[href^="https://colab.research.google.com/"]')]
      .map(abs),
    downloads: [...document.querySelectorAll('a[href*="/_sources/"]')].map(abs),
  };
})()
"""

SEARCH_JS = r"""
(async () => {
  const deadline = Date.now() + 20000;
  const items = () => document.querySelectorAll("#search-results li");
  const done = () => /Search finished|did not match|Found \d+/i.test(
    (document.querySelector("#search-results") || {}).textContent || "");
  while (!done() && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 100));
  }
  return [...items()].map((li) => li.querySelector("a").textContent.trim());
})()
"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the book's files and logs nothing."""

    def log_message(self, *args) -> None:
        pass


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``root`` on a free port of 127.0.0.1; return the server and its URL."""
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class DevTools:
    """A minimal client of Chromium's DevTools protocol over one websocket."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _receive(self, timeout: float) -> dict:
        self.ws.settimeout(max(timeout, 0.01))
        return json.loads(self.ws.recv())

    def call(
        self, method: str, params: dict | None = None, timeout: float = 60
    ) -> dict:
        """Send one command (to the attached page, if any) and return its result."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline - time.monotonic())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, event: str, since: int = 0, timeout: float = 60) -> dict:
        """Wait for ``event`` after ``self.events[since]``, keeping the others."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for e in self.events[seen:]:
                if e["method"] == event:
                    return e
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout} s")
            self.events.append(self._receive(deadline - time.monotonic()))

    def evaluate(self, expression: str, timeout: float = 60):
        """Run JavaScript in the page, await its promise, return its JSON value."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")


def start_chromium(profile: Path) -> tuple[subprocess.Popen, DevTools]:
    """Start headless Chromium with a fresh profile; attach to a blank page."""
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} not found: install Debian's chromium package")
    proc = subprocess.Popen(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.exists() and len(port_file.read_text().split()) == 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit("chromium did not start its DevTools server")
        time.sleep(0.1)
    port, path = port_file.read_text().split()
    tools = DevTools(f"ws://127.0.0.1:{port}{path}")
    targets = tools.call("Target.getTargets")["targetInfos"]
    target = next(t["targetId"] for t in targets if t["type"] == "page")
    tools.session = tools.call(
        "Target.attachToTarget", {"targetId": target, "flatten": True}
    )["sessionId"]
    for domain in ("Page", "Runtime", "Network"):
        tools.call(f"{domain}.enable")
    tools.call("Page.bringToFront")
    tools.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
    )
    return proc, tools


def visit(
    tools: DevTools, url: str, script: str, redirects: bool = False
) -> tuple[object, list[str]]:
    """Load ``url``, run ``script``; return its value and the network/JS problems."""
    tools.events.clear()
    tools.call("Page.navigate", {"url": url})
    tools.wait_for("Page.loadEventFired")
    if redirects:  # index.html forwards to the first chapter: check that page
        loaded = tools.events.index(tools.wait_for("Page.loadEventFired"))
        tools.wait_for("Page.loadEventFired", since=loaded + 1)
    value = tools.evaluate(script)
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
    problems, requests = [], {}
    for e in tools.events:
        p, m = e.get("params", {}), e["method"]
        if m == "Network.requestWillBeSent":
            requests[p["requestId"]] = p["request"]["url"]
            target = p["request"]["url"]
            if target.startswith("http") and not target.startswith(origin):
                problems.append(f"request leaves the machine: {target}")
        elif m == "Network.responseReceived" and p["response"]["status"] >= 400:
            problems.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            target = requests.get(p["requestId"], "?")
            problems.append(f"failed to load {target}: {p['errorText']}")
        elif m == "Runtime.exceptionThrown":
            details = p["exceptionDetails"]
            text = details.get("exception", {}).get("description", details["text"])
            problems.append(f"JavaScript exception: {text[:200]}")
    return value, problems


def page_problems(rel: str, info: dict, root: Path, branch_path: str) -> list[str]:
    """What is wrong with one page, judged from the values PAGE_JS returned."""
    problems = []
    if info["math"] and not info["mathjax"]:
        problems.append(f"{info['math']} math elements but MathJax is not loaded")
    problems += [f"math not typeset: {t!r}" for t in info["untypeset"]]
    problems += [f"MathJax error: {t!r}" for t in info["mathErrors"]]
    problems += [f"raw TeX in the text: {t!r}" for t in info["rawTex"]]
    problems += [
        f"image did not load: {i['src']}" for i in info["images"] if not i["ok"]
    ]
    problems += [f"error output: {t!r}" for t in info["errors"]]
    if info["traceback"]:
        problems.append("the page shows a Python traceback")
    if _is_notebook(root, rel):
        notebook = Path(rel).with_suffix(".ipynb").as_posix()
        if not any(u.endswith(f"/blob/{branch_path}{notebook}") for u in info["colab"]):
            problems.append(f"no Colab launch link for {notebook}: {info['colab']}")
        if not any(u.endswith(f"/_sources/{notebook}") for u in info["downloads"]):
            problems.append(f"no download button for {notebook}")
    return problems


def broken_links(pages: dict[str, dict], root: Path, base: str) -> dict[str, list[str]]:
    """Internal links whose file or anchor is missing, by page."""
    ids = {rel: set(info["ids"]) for rel, info in pages.items()}
    broken: dict[str, list[str]] = {}
    for rel, info in pages.items():
        for link in info["links"]:
            if not link.startswith(base):
                continue
            parts = urlsplit(link)
            target = unquote(parts.path).lstrip("/")
            if target == "" or target.endswith("/"):
                target += "index.html"
            if not (root / target).is_file():
                broken.setdefault(rel, []).append(f"missing file: {link}")
            elif parts.fragment and target in ids:
                if unquote(parts.fragment) not in ids[target]:
                    broken.setdefault(rel, []).append(f"missing anchor: {link}")
    return broken


def check(root: Path, shots: Path) -> int:
    start = time.monotonic()
    html = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.html")
        if not SKIP_DIRS & set(p.relative_to(root).parts)
    )
    if not html:
        sys.exit(f"no HTML pages under {root}: run `make book` first")
    branch_path = _colab_branch()
    notebooks = [r for r in html if _is_notebook(root, r)]
    screenshot = set(SCREENSHOT_PAGES + notebooks[:2])
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    server, base = serve(root)
    profile = Path(tempfile.mkdtemp(prefix="browser-check-"))
    proc, tools = start_chromium(profile)
    failures: dict[str, list[str]] = {}
    pages: dict[str, dict] = {}
    try:
        for rel in html:
            redirects = 'http-equiv="refresh"' in (root / rel).read_text().lower()
            info, problems = visit(tools, base + rel, PAGE_JS, redirects)
            pages[rel] = info
            problems += page_problems(rel, info, root, branch_path)
            if problems:
                failures[rel] = problems
            if rel in screenshot:
                _screenshot(tools, shots, rel)
        results, problems = visit(
            tools, f"{base}search.html?q={SEARCH_QUERY}", SEARCH_JS
        )
        _screenshot(tools, shots, "search.html")
        if problems or not results:
            failures["search.html?q=" + SEARCH_QUERY] = problems or [
                "no search results"
            ]
    finally:
        tools.ws.close()
        proc.terminate()
        proc.wait(timeout=30)
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    for rel, links in broken_links(pages, root, base).items():
        failures.setdefault(rel, []).extend(links)
    _report(pages, results, failures, shots, time.monotonic() - start, root, base)
    return 1 if failures else 0


def _colab_branch() -> str:
    """``<branch>/<path_to_book>/`` of _config.yml, as the Colab links spell it."""
    config = (Path(__file__).resolve().parents[1] / "_config.yml").read_text()
    block = config.split("\nrepository:", 1)[1]
    branch = re.search(r"^\s+branch:\s*(\S+)", block, re.M).group(1)
    book = re.search(r"^\s+path_to_book:\s*\"?([^\"\s#]*)", block, re.M)
    book_path = book.group(1).strip("/") if book else ""
    return f"{branch}/" + (f"{book_path}/" if book_path else "")


def _is_notebook(root: Path, rel: str) -> bool:
    """Whether the page was built from a notebook (its source is an .ipynb)."""
    return (root / "_sources" / Path(rel).with_suffix(".ipynb")).is_file()


def _screenshot(tools: DevTools, shots: Path, rel: str) -> None:
    data = tools.call("Page.captureScreenshot", {"format": "png"})["data"]
    name = rel.replace("/", "_").removesuffix(".html") + ".png"
    (shots / name).write_bytes(base64.b64decode(data))


def _report(pages, results, failures, shots, seconds, root, base) -> None:
    notebooks = [r for r in pages if _is_notebook(root, r)]
    internal = sum(
        len([u for u in i["links"] if u.startswith(base)]) for i in pages.values()
    )
    print(f"browser check: {len(pages)} pages opened in headless Chromium")
    print(
        f"  math elements typeset by MathJax: {sum(i['math'] for i in pages.values())}"
        f" on {sum(1 for i in pages.values() if i['math'])} pages"
    )
    print(f"  images loaded: {sum(len(i['images']) for i in pages.values())}")
    print(f"  internal links checked (file and anchor exist): {internal}")
    print(f"  notebook pages with Colab and download buttons: {len(notebooks)}")
    print(f"  search for {SEARCH_QUERY!r}: {len(results)} results {results[:5]}")
    print(f"  screenshots: {len(list(shots.glob('*.png')))} in {shots}")
    print(f"  time: {seconds:.1f} s")
    for rel, problems in sorted(failures.items()):
        print(f"FAIL {rel}")
        for p in problems[:20]:
            print(f"    {p}")
        if len(problems) > 20:
            print(f"    ... and {len(problems) - 20} more")
    print("browser check " + ("FAILED" if failures else "passed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", nargs="?", default="_build/html", type=Path)
    parser.add_argument("--screenshots", default="_build/screenshots", type=Path)
    args = parser.parse_args()
    sys.exit(check(args.html.resolve(), args.screenshots.resolve()))


if __name__ == "__main__":
    main()
