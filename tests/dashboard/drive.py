#!/usr/bin/env python3
"""Drives headless Chromium through strata's dashboard, as a person would.

    drive.py CHROMIUM URL --key KEY --drain NODE --out DIR

Opens URL; enters KEY when the page asks for one; waits for the nodes and the layer
map; takes a desktop screenshot; clicks the drain button of NODE and waits for the
layer map to drop it; types a question into the chat box, sends it and waits for the
streamed answer (asking again, up to three times, while the random-weight model ends
its answer at once); takes a phone-width screenshot. Prints one JSON object of what it
saw (the Rust test asserts on it) and writes DIR/dashboard-desktop.png and
DIR/dashboard-phone.png.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
it reads commands from descriptor 3 and answers on descriptor 4, each message
ending in a NUL byte), so nothing beyond the standard library is needed.
"""

import argparse
import base64
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

TIMEOUT_S = 60


class Browser:
    def __init__(self, chromium, profile):
        to_chromium_r, self._to_chromium = os.pipe()
        self._from_chromium, from_chromium_w = os.pipe()

        def child_fds():
            # Copied high first: a pipe may already sit on 3 or 4, and dup2 onto itself
            # would leave it close-on-exec.
            commands, answers = os.dup(to_chromium_r), os.dup(from_chromium_w)
            os.dup2(commands, 3)
            os.dup2(answers, 4)

        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--remote-debugging-pipe",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            preexec_fn=child_fds,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chromium_r)
        os.close(from_chromium_w)
        self._next_id = 0
        self._answers = {}
        self._arrived = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.session = None

    def _read(self):
        buffer = b""
        while True:
            data = os.read(self._from_chromium, 65536)
            if not data:
                self._arrived.put(None)
                return
            buffer += data
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                self._arrived.put(json.loads(message))

    def call(self, method, params=None, session=True):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_chromium, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while self._next_id not in self._answers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not answer {method}")
            arrived = self._arrived.get(timeout=left)
            if arrived is None:
                raise RuntimeError("chromium closed the pipe")
            if "id" in arrived:
                self._answers[arrived["id"]] = arrived
        answer = self._answers.pop(self._next_id)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def open_page(self):
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, session=False)
        self.session = attached["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, what):
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                # The page is still loading: no context to evaluate in yet.
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never showed {what} ({expression})")

    def click(self, selector):
        """A real mouse click at the middle of the element."""
        box = self.wait_for(
            f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
                if (!e || e.disabled) return null;
                e.scrollIntoView({{block: "center"}});
                const r = e.getBoundingClientRect();
                return r.width > 0 ? {{x: r.x + r.width / 2, y: r.y + r.height / 2}} : null; }})()""",
            f"a clickable {selector}",
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1})

    def type_into(self, selector, text):
        self.click(selector)
        self.call("Input.insertText", {"text": text})

    def viewport(self, width, height, phone):
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 2 if phone else 1, "mobile": phone},
        )

    def screenshot(self, path):
        # The whole page: the viewport grown to the document's height.
        width = self.evaluate("window.innerWidth")
        height = self.evaluate("document.documentElement.scrollHeight")
        shot = self.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}},
        )
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))

    def close(self):
        try:
            self.call("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


LAYER_MAP = """[...document.querySelectorAll('#layer-map .segment[data-node]')]
    .map(s => [s.dataset.node, Number(s.dataset.start), Number(s.dataset.end)])"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("chromium")
    parser.add_argument("url")
    parser.add_argument("--key", required=True)
    parser.add_argument("--drain", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    seen = {}
    with tempfile.TemporaryDirectory() as profile:
        browser = Browser(args.chromium, profile)
        try:
            browser.open_page()
            browser.viewport(1280, 900, phone=False)
            browser.call("Page.navigate", {"url": args.url})
            browser.wait_for("document.body && document.body.dataset.needsKey === 'yes'", "the key form")
            seen["asked_for_key"] = browser.evaluate("document.getElementById('key-why').textContent")
            browser.type_into("#key", args.key)
            browser.click("#key-use")
            browser.wait_for("document.querySelectorAll('#nodes .node').length > 0", "the nodes")
            seen["nodes"] = browser.evaluate("[...document.querySelectorAll('#nodes .node')].map(n => [n.dataset.node, n.dataset.state])")
            seen["links"] = browser.wait_for(
                "(() => { const l = [...document.querySelectorAll('#nodes dt')].map(d => d.textContent).filter(t => t.startsWith('link')); return l.length ? l : null; })()",
                "the links between the nodes",
            )
            seen["map_before"] = browser.wait_for(f"(() => {{ const m = {LAYER_MAP}; return m.length ? m : null; }})()", "the layer map")
            browser.screenshot(os.path.join(args.out, "dashboard-desktop.png"))

            browser.click(f'#nodes .node[data-node="{args.drain}"] button.drain')
            browser.wait_for(
                f"""(() => {{ const n = document.querySelector('#nodes .node[data-node="{args.drain}"]');
                    return n && n.dataset.state === 'draining'
                        && !{LAYER_MAP}.some(s => s[0] === {json.dumps(args.drain)}); }})()""",
                f"{args.drain} drained and gone from the layer map",
            )
            seen["map_after"] = browser.evaluate(LAYER_MAP)
            seen["message"] = browser.evaluate("document.getElementById('message').textContent")

            # The model has random weights and the chat samples: its end token may come
            # first or second. Then the conversation goes on with another question, up
            # to three, for an answer streamed in pieces.
            answer = "[...document.querySelectorAll('.bubble.assistant')].pop()"
            for question in ["Which box holds which layers?", "And which one holds the most?", "Why is that?"]:
                # Not the last answer's state: this one's.
                browser.evaluate("document.body.dataset.chat = 'asking'")
                browser.type_into("#chat-input", question)
                browser.click("#chat-send")
                browser.wait_for("['done', 'failed'].includes(document.body.dataset.chat)", "the end of the chat answer")
                seen["chat"] = browser.evaluate("document.body.dataset.chat")
                seen["answer"] = browser.evaluate(f"{answer}.textContent")
                seen["answer_chunks"] = browser.evaluate(f"Number({answer}.dataset.chunks || 0)")
                if seen["chat"] != "done" or seen["answer_chunks"] >= 2:
                    break

            browser.viewport(390, 844, phone=True)
            browser.wait_for("window.innerWidth === 390", "the phone width")
            seen["phone_overflow_px"] = browser.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            browser.screenshot(os.path.join(args.out, "dashboard-phone.png"))
        finally:
            browser.close()
    json.dump(seen, sys.stdout)
    print()


if __name__ == "__main__":
    main()
