"""Drive the running AbU Explorer in a real (headless) Chromium: generate, set a box, attribute, open a tile.

    python app.py &                                  # or any URL serving the app
    python scripts/browser_check.py --url http://127.0.0.1:7860 --screenshot app.png

Uses Debian's /usr/bin/chromium (``apt-get install chromium``); ``playwright install`` is not needed.
``tests/test_browser.py`` runs ``drive`` and ``examples_tab`` against the app on the tiny test model.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from abu_explorer.attribution import names  # noqa: E402

CHROMIUM = os.environ.get("ABU_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
METHODS = tuple(names())  # the registry's order: one gallery each
BOX = (4, 4, 24, 24)  # model pixels
ERROR_TOAST = ".toast-body.error"


class BrowserCheckError(AssertionError):
    """The page did not do what the check expected."""


def _until(page, what: str, predicate, timeout_s: float, poll_s: float = 0.25):
    """Poll ``predicate()`` until truthy; fail early on a Gradio error toast, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        toast = page.locator(ERROR_TOAST)
        if toast.count():
            raise BrowserCheckError(f"error shown while waiting for {what}: {toast.first.inner_text().strip()!r}")
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BrowserCheckError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        page.wait_for_timeout(int(poll_s * 1000))


def _loaded_img(page, selector: str) -> dict | None:
    """src and natural size of the first visible, fully loaded <img> under ``selector``, else None."""
    return _loaded_img_in(page.locator(selector).first)


def _loaded_img_in(locator) -> dict | None:
    if not locator.count():
        return None
    return locator.evaluate(
        """el => {
            for (const img of el.querySelectorAll('img')) {
                if (img.complete && img.naturalWidth > 0 && img.getClientRects().length)
                    return {src: img.currentSrc || img.src, w: img.naturalWidth, h: img.naturalHeight};
            }
            return null;
        }""")


def _dismiss_errors(page, timeout_s: float = 10.0):
    """Close Gradio's error toasts, so that a failed optional step does not fail the waits after it."""
    deadline = time.monotonic() + timeout_s
    while page.locator(ERROR_TOAST).count():
        for button in page.locator(f"{ERROR_TOAST} .toast-close").all():
            try:
                button.click(timeout=1000)
            except Exception:  # noqa: BLE001 - the toast may vanish on its own meanwhile
                pass
        if time.monotonic() > deadline:
            raise BrowserCheckError("error toasts did not go away")
        page.wait_for_timeout(250)


def _soft(page, step):
    """Run an optional step: its dict with ok=True, or ok=False and the error (the page then goes on)."""
    try:
        return {"ok": True, **step()}
    except BrowserCheckError as e:
        _dismiss_errors(page)
        return {"ok": False, "error": str(e)}


def _box_fields(page):
    return [page.get_by_label(name, exact=True) for name in ("x0", "y0", "x1", "y1")]


def _box_values(page) -> list[str]:
    return [f.input_value() for f in _box_fields(page)]


def _click_image_point(page, selector: str, x: float, y: float):
    """Click the pixel (x, y) of the image's natural size, mapped like Gradio's select handler does."""
    img = page.locator(f"{selector} img").first
    r = img.evaluate(
        """img => {
            const b = img.getBoundingClientRect();
            return {left: b.left, top: b.top, width: b.width, height: b.height,
                    nw: img.naturalWidth, nh: img.naturalHeight};
        }""")
    scale = min(r["width"] / r["nw"], r["height"] / r["nh"], 1.0)
    off_x = (r["width"] - r["nw"] * scale) / 2
    off_y = (r["height"] - r["nh"] * scale) / 2
    page.mouse.click(r["left"] + off_x + (x + 0.5) * scale, r["top"] + off_y + (y + 0.5) * scale)


def _two_click_box(page, timeout_s: float) -> dict:
    """Set BOX by clicking two corners on the query image; report what the number fields then held."""
    image_size = float(_box_fields(page)[0].get_attribute("max") or 32)  # the fields' maximum = model size
    shown = _loaded_img(page, "#query")
    before = shown["src"]
    scale = shown["w"] / image_size  # displayed-image pixels per model pixel (SHOW / image size in the app)
    _click_image_point(page, "#query", BOX[0] * scale, BOX[1] * scale)
    _until(page, "the first-corner note", lambda: page.get_by_text("First corner set").count(), timeout_s)
    _click_image_point(page, "#query", BOX[2] * scale, BOX[3] * scale)
    _until(page, "the box from two clicks",
           lambda: all(v != "" for v in _box_values(page)) and page.get_by_text("Box (").count(), timeout_s)
    _until(page, "the query redrawn with its box", lambda: (_loaded_img(page, "#query") or {}).get("src") != before,
           timeout_s)
    values = _box_values(page)
    if [float(v) for v in values] != [float(v) for v in BOX]:
        raise BrowserCheckError(f"two clicks set the box fields to {values}, expected {list(BOX)}")
    return {"values": values, "image_size": image_size}


def _dragged_box(page, timeout_s: float) -> dict:
    """Open the drag panel, drag BOX on the annotator's canvas, and report what the number fields then held."""
    page.get_by_role("button", name="Whole image").click()  # empty fields: the drag must fill them
    _until(page, "empty box fields", lambda: _box_values(page) == ["", "", "", ""], timeout_s)
    page.get_by_text("or drag a box on the image").click()
    canvas = page.locator("#drag canvas").first
    canvas.wait_for(state="visible", timeout=timeout_s * 1000)
    image_size = float(_box_fields(page)[0].get_attribute("max") or 32)
    _until(page, "the annotator's image", lambda: canvas.bounding_box() and canvas.bounding_box()["width"] > 50,
           timeout_s)
    time.sleep(0.5)  # the image is drawn on the canvas after it loads
    r = canvas.bounding_box()
    side = min(r["width"], r["height"])  # the square image, centred on the canvas
    left, top = r["x"] + (r["width"] - side) / 2, r["y"] + (r["height"] - side) / 2
    s = side / image_size
    target = (4, 6, 20, 26)
    page.mouse.move(left + target[0] * s, top + target[1] * s)
    page.mouse.down()
    for i in range(1, 11):  # a slow drag, as a hand makes it
        f = i / 10
        page.mouse.move(left + (target[0] + f * (target[2] - target[0])) * s,
                        top + (target[1] + f * (target[3] - target[1])) * s)
        time.sleep(0.03)
    page.mouse.up()
    _until(page, "the box from a drag", lambda: [v for v in _box_values(page)] != ["", "", "", ""]
           and page.get_by_text("Box (").count(), timeout_s)
    values = [float(v) for v in _box_values(page)]
    page.get_by_text("or drag a box on the image").click()  # close the panel again
    if max(abs(a - b) for a, b in zip(values, target)) > 1:
        raise BrowserCheckError(f"a drag over {target} set the box fields to {values}")
    return {"values": values, "dragged": list(target)}


def _new_query_clears(page, timeout_s: float) -> dict:
    """Another seed, generated: the previous query's rankings leave the page."""
    page.get_by_label("seed", exact=True).fill("7")
    page.locator("#generate").click()
    _until(page, "the galleries to clear after a new query",
           lambda: all(_gallery_state(page, n)["tiles"] == 0 for n in METHODS), timeout_s)
    return {"tiles_left": {n: _gallery_state(page, n)["tiles"] for n in METHODS}}


def _gallery_tiles(page, name: str) -> int:
    """How many tiles of the gallery show a loaded image."""
    return _gallery_state(page, name)["loaded"]


def _gallery_state(page, name: str, selector: str | None = None) -> dict:
    """Tiles and loaded tiles of a method's gallery (or of the gallery at ``selector``), with their captions."""
    return page.evaluate(
        """sel => {
            const buttons = [...document.querySelectorAll(sel + ' button:has(img)')];
            const imgs = buttons.map(b => b.querySelector('img'));
            return {tiles: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
                    captions: buttons.map(b => (b.querySelector('.caption-label') || {}).textContent || '')
                                     .map(t => t.trim())};
        }""", selector or f"#gallery-{name}")


def _detail_panel(page):
    """The 'selected training image' block (no elem_id in the app: found through its label)."""
    label = page.get_by_text("selected training image", exact=True).first
    return label.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' block ')][1]")


def _open_first_tile(page) -> dict:
    """Click the first AbU tile; the 'selected training image' panel should show it, with its caption."""
    panel = _detail_panel(page)
    page.locator("#gallery-abu button:has(img)").first.click()
    detail = _until(page, "the selected training image", lambda: _loaded_img_in(panel), 30)
    note = page.get_by_text("training index", exact=False).first
    _until(page, "the selected tile's caption", lambda: note.count() and note.is_visible(), 30)
    return {"image": {"width": detail["w"], "height": detail["h"]}, "text": note.inner_text().strip()}


def _tile_hover(page) -> dict:
    """What hovering the first AbU tile shows: its tooltip (the full caption) and its label, which the gallery
    cuts to one line with an ellipsis and the page's CSS unfolds on hover."""
    tile = page.locator("#gallery-abu button:has(img)").first
    tile.hover()
    label = tile.locator(".caption-label")
    _until(page, "the hovered tile's caption to wrap",
           lambda: label.evaluate("el => getComputedStyle(el).whiteSpace") == "normal", 5)
    return tile.evaluate(
        """el => {
            const label = el.querySelector('.caption-label');
            return {title: el.title, label: label ? label.textContent.trim() : '',
                    label_cut: label ? label.scrollWidth > label.clientWidth : true};
        }""")


@contextlib.contextmanager
def _opened(url: str, timeout_s: float, headless: bool):
    """A Chromium page at ``url`` (Debian's browser, the check's viewport and timeout); closed on leaving."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=headless, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url, wait_until="domcontentloaded")
            yield page
        finally:
            browser.close()


def drive(url: str, screenshot: str | None = None, prompt: str = "red apple", timeout_s: float = 120.0,
          two_clicks: bool = True, headless: bool = True) -> dict:
    """Run the main flow of the app in Chromium at ``url`` and return what the page showed.

    Raises ``BrowserCheckError`` (an AssertionError) when a step of the main flow does not show what it
    should: page load, generation, the typed box, tiles and headings in every gallery, the screenshot.
    The two steps that rely on Gradio ``select`` events (``two_click_box``: two clicks on the query image
    set the box; ``tile``: clicking the first AbU tile fills the 'selected training image' panel) are
    reported, not raised: ``seen[step]["ok"]`` and, when False, ``seen[step]["error"]``.
    ``timeout_s`` bounds generation and, separately, the whole attribution.
    """
    seen: dict = {"url": url, "prompt": prompt, "seconds": {}}
    t0 = time.monotonic()

    def lap(name):
        seen["seconds"][name] = round(time.monotonic() - t0, 2)

    with _opened(url, timeout_s, headless) as page:
        prompt_box = page.locator("#prompt textarea, #prompt input").first
        prompt_box.wait_for(state="visible")
        # demo.load fills the prompt from the URL once the page connects; type ours after it did
        _until(page, "the prompt's initial value", lambda: prompt_box.input_value() != "", 30)
        seen["title"] = page.title()
        lap("loaded")

        prompt_box.fill(prompt)
        page.locator("#generate").click()
        query = _until(page, "the generated query image", lambda: _loaded_img(page, "#query"), timeout_s)
        seen["query_image"] = {"width": query["w"], "height": query["h"]}
        lap("generated")

        if two_clicks:
            seen["two_click_box"] = _soft(page, lambda: _two_click_box(page, 30))
            lap("two_click_box")
            seen["dragged_box"] = _soft(page, lambda: _dragged_box(page, 30))
            lap("dragged_box")
        for field, value in zip(_box_fields(page), BOX):
            field.fill(str(value))
            field.press("Tab")  # blur, so the component commits the value
        seen["box"] = _box_values(page)
        if [float(v) for v in seen["box"]] != [float(v) for v in BOX]:
            raise BrowserCheckError(f"box fields hold {seen['box']}, expected {list(BOX)}")

        page.locator("#attribute").click()
        deadline = time.monotonic() + timeout_s
        for name in METHODS:
            left = max(1.0, deadline - time.monotonic())
            _until(page, f"tiles in gallery-{name}", lambda n=name: _gallery_tiles(page, n), left)
        # give every tile's image a moment to load, then count (a tile that never loads is reported, not fatal)
        try:
            _until(page, "all tile images", lambda: all(
                (g := _gallery_state(page, n))["loaded"] == g["tiles"] for n in METHODS), 15)
        except BrowserCheckError:
            pass
        states = {name: _gallery_state(page, name) for name in METHODS}
        seen["tiles"] = {name: g["loaded"] for name, g in states.items()}
        seen["tiles_not_loaded"] = {name: g["tiles"] - g["loaded"] for name, g in states.items()
                                    if g["tiles"] != g["loaded"]}
        seen["headings"] = {name: page.locator(f"#head-{name}").inner_text().strip() for name in METHODS}
        empty = [name for name, text in seen["headings"].items() if not text]
        if empty:
            raise BrowserCheckError(f"empty headings: {empty}")
        lap("attributed")

        seen["tile_hover"] = _tile_hover(page)
        seen["tile"] = _soft(page, lambda: _open_first_tile(page))
        lap("tile_selected")

        if screenshot:
            page.screenshot(path=str(screenshot), full_page=True)
            seen["screenshot"] = str(screenshot)
        seen["new_query_clears"] = _soft(page, lambda: _new_query_clears(page, timeout_s))
    lap("total")
    return seen


def examples_tab(url: str, steps: list[tuple[int, int]], timeout_s: float = 60.0, headless: bool = True) -> dict:
    """The Examples tab: at the first step's K, pick the first example; then click each further step's K.
    Returns, per step, the remove-and-regenerate tiles the page showed (count and captions).

    ``steps`` is [(K, tiles expected)]: the original plus one per finished retrain at that K, 0 where none ran.
    A step whose gallery does not reach its count raises ``BrowserCheckError``.
    """
    gallery = "#example-counterfactuals"
    seen: dict = {"url": url, "steps": []}

    def pick_k(page, k):
        page.locator(f"#example-k label:has(input[value='{k}'])").click()

    with _opened(url, timeout_s, headless) as page:
        page.get_by_role("tab", name="Examples").click()
        choice = page.locator("#example-choice label").first
        choice.wait_for(state="visible")
        seen["example"] = choice.inner_text().strip()
        seen["k_shown"] = int(page.locator("#example-k input:checked").get_attribute("value"))
        for i, (k, want) in enumerate(steps):
            if i == 0:
                if k != seen["k_shown"]:
                    pick_k(page, k)  # no example yet: nothing to draw
                choice.click()
            else:
                pick_k(page, k)
            try:
                state = _until(page, f"{want} tiles at K = {k}", lambda w=want: (
                    (g := _gallery_state(page, "", gallery))["loaded"] == g["tiles"] == w and g), timeout_s)
            except BrowserCheckError as e:
                raise BrowserCheckError(f"{e}; the gallery shows {_gallery_state(page, '', gallery)}") from None
            seen["steps"].append({"k": k, "tiles": state["tiles"], "captions": state["captions"]})
    return seen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--screenshot", default=None, help="write a full-page PNG here")
    ap.add_argument("--prompt", default="red apple")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for generation and for attribution")
    ap.add_argument("--no-clicks", action="store_true", help="set the box through the number fields only")
    args = ap.parse_args(argv)
    seen = drive(args.url, args.screenshot, args.prompt, timeout_s=args.timeout, two_clicks=not args.no_clicks)
    print(json.dumps(seen, indent=2))
    failed = [step for step in ("two_click_box", "dragged_box", "tile") if step in seen and not seen[step]["ok"]]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
