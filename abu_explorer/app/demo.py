"""The Gradio page: four tabs (``views/``), each wiring its events to an ``ExplorerApp`` (``service.py``).

``python app.py --precomputed DIR`` (or ``ABU_PRECOMPUTED``) serves another precomputed folder, a diffusers
model's included; ``ABU_RESULTS_DIR`` points it at another counterfactual results folder.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"

# A gallery tile cuts its caption to one line; hovering or focusing the tile shows all of it ...
PAGE_CSS = """
.thumbnail-item:hover .caption-label, .thumbnail-item:focus-visible .caption-label {
  white-space: normal; overflow: visible; opacity: 1; max-width: calc(100% - 2 * var(--block-label-margin));
}
"""
# ... and the tile's tooltip (and accessible name) is the whole caption too.
PAGE_JS = """() => {
  const tag = () => document.querySelectorAll('.thumbnail-item').forEach(tile => {
    const label = tile.querySelector('.caption-label');
    const text = label ? label.textContent.trim() : '';
    if (text && tile.title !== text) tile.title = text;
  });
  new MutationObserver(tag).observe(document.body, {childList: true, subtree: true, characterData: true});
  tag();
}"""
# what ``launch`` takes besides the server's own settings (Gradio 6 reads page CSS and JS there)
LAUNCH = dict(css=PAGE_CSS, js=PAGE_JS, mcp_server=True)


def default_app(precomputed: str | Path | None = None):
    from abu_explorer.app.service import ExplorerApp
    from abu_explorer.model import load

    explorer = load(precomputed or os.environ.get("ABU_PRECOMPUTED", ROOT / "precomputed"))
    return ExplorerApp(explorer, Path(os.environ.get("ABU_RESULTS_DIR", ROOT / "results" / "counterfactual")))


def build_demo(app=None):
    import gradio as gr

    from abu_explorer.app import tools
    from abu_explorer.app.views import about, attribute, counterfactual, examples

    app = app or default_app()
    with gr.Blocks(title="AbU Explorer") as demo:
        check = ("" if app.explorer.retrain_note else ", and check the answer by removing them and retraining")
        gr.Markdown("# AbU Explorer\nWhich training images made this picture? Generate an image, attribute it "
                    f"(or a region of it) to the {len(app.explorer.dataset)} training images, compare methods side "
                    f"by side{check}.")
        with gr.Tabs():
            with gr.Tab("Generate & attribute", id="attribute"):
                q = attribute.build(app)
            with gr.Tab("Remove & regenerate", id="counterfactual"):
                counterfactual.build(app, q)
            with gr.Tab("Examples", id="examples"):
                examples.build(app, ASSETS)
            with gr.Tab("About", id="about"):
                about.build(ASSETS, app.explorer)

        def from_url(request: gr.Request):
            return prefill(dict(request.query_params) if request else {})

        demo.load(from_url, None, [q.prompt, q.seed], api_name=False)
        tools.register(app)  # generate_image, attribute_image, compare_methods: API and MCP tools
    return demo


def prefill(params: dict) -> tuple[str, int]:
    """``?prompt=...&seed=...`` pre-fills the query."""
    seed = str(params.get("seed", "0"))
    return params.get("prompt", "red apple"), int(seed) if seed.isdigit() else 0
