"""The app's functions as typed, documented API endpoints: what an assistant calls over MCP
(``python app.py`` serves them at ``/gradio_api/mcp/``) and a script through ``gradio_client``.

Each tool is a plain function of strings and numbers that returns a JSON document (as text, which is what an
MCP client reads), built on the tested service functions (``service.py``); a bad argument is answered by one
line (``gr.Error``), never a traceback.
"""
from __future__ import annotations

import base64
import io
import json

from abu_explorer.app.inputs import UIError


def _box(box: str):
    """'' -> whole image; 'x0,y0,x1,y1' -> four numbers (checked by the service)."""
    text = (box or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4:
        raise UIError(f"box must be 'x0,y0,x1,y1' in image pixels or empty, got {box!r}")
    return parts


def _methods(text: str, available: list[str]) -> list[str]:
    chosen = [m.strip() for m in (text or "").split(",") if m.strip()] or available
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise UIError(f"unknown method {unknown[0]!r}; choose from {', '.join(available)}")
    return chosen


def make_tools(app) -> list:
    """The tool functions bound to one ``ExplorerApp`` (their names are the MCP tool names)."""
    from abu_explorer.app import exports
    from abu_explorer.attribution import names
    from abu_explorer.model.backend import provenance

    size = app.image_size

    def _query(prompt, seed, steps, guidance, box):
        return app.query({"type": "generated", "prompt": prompt, "seed": seed, "steps": steps,
                          "guidance": guidance}, _box(box))

    def generate_image(prompt: str, seed: int = 0, steps: int = 50, guidance: float = 3.0) -> str:
        """Generate one image with the embedded text-to-image model. The same prompt, seed, steps and guidance
        always give the same image.

        Args:
            prompt: the caption, in the words of the training captions (e.g. "red apple", "flag: japan").
            seed: the noise seed (>= 0).
            steps: sampling steps (1-1000; 50 is the default).
            guidance: classifier-free guidance scale (0-50; 3 is the default).
        Returns:
            {"prompt", "seed", "steps", "guidance", "unknown_words", "width", "png_base64"}.
        """
        g = app.generate(prompt, seed, steps, guidance)
        buf = io.BytesIO()
        g.image.save(buf, format="PNG")
        return json.dumps({"prompt": g.prompt, "seed": g.seed, "steps": g.steps, "guidance": g.guidance,
                           "unknown_words": g.unknown_words, "width": g.image.width,
                           "png_base64": base64.b64encode(buf.getvalue()).decode()})

    def attribute_image(prompt: str, seed: int = 0, method: str = "abu", k: int = 10, mode: str = "fast",
                        box: str = "", steps: int = 50, guidance: float = 3.0) -> str:
        """Which training images made this picture? Generate the prompt's image and rank the training images
        by one attribution method.

        Args:
            prompt: the caption to generate from.
            seed: the noise seed (>= 0).
            method: one of METHOD_NAMES (abu: Attribution by Unlearning; abuplus: its EK-FAC variant).
            k: how many of the top training images to return (1-50).
            mode: "fast" (screen, then re-measure the best candidates) or "exact" (every training image).
            box: "x0,y0,x1,y1" in image pixels to attribute only that region, or "" for the whole image.
            steps: sampling steps of the generation.
            guidance: guidance scale of the generation.
        Returns:
            {"method", "label", "query", "results": [{"rank", "index", "caption", "score"}], "model"}.
        """
        query = _query(prompt, seed, steps, guidance, box)
        out = app.attribute(query, method, k, mode)
        out["model"] = provenance(app.explorer)
        return json.dumps(out)

    def compare_methods(prompt: str, seed: int = 0, k: int = 10, methods: str = "", box: str = "",
                        steps: int = 50, guidance: float = 3.0) -> str:
        """Rank the training images for one generated image by several methods side by side (fast mode), with
        how much each pair of methods agrees.

        Args:
            prompt: the caption to generate from.
            seed: the noise seed (>= 0).
            k: how many top training images per method (1-50).
            methods: comma-separated method names ("" for all: METHOD_NAMES).
            box: "x0,y0,x1,y1" in image pixels, or "" for the whole image.
            steps: sampling steps of the generation.
            guidance: guidance scale of the generation.
        Returns:
            {"rankings": {method: [{"rank", "index", "caption", "score"}]}, "overlap_at_k": {"a|b": fraction}, "model"}.
        """
        query = _query(prompt, seed, steps, guidance, box)
        chosen = _methods(methods, names())
        rankings = {m: app.attribute(query, m, k, "fast")["results"] for m in chosen}
        _, pairs = exports.overlap_at_k({m: [r["index"] for r in rs] for m, rs in rankings.items()})
        overlap = {f"{a}|{b}": pairs[(a, b)] for i, a in enumerate(chosen) for b in chosen[i + 1:]}
        return json.dumps({"image_size": size, "rankings": rankings, "overlap_at_k": overlap,
                           "model": provenance(app.explorer)})

    for fn in (attribute_image, compare_methods):  # the registry's names, not a copy of them
        fn.__doc__ = fn.__doc__.replace("METHOD_NAMES", ", ".join(names()))
    return [generate_image, attribute_image, compare_methods]


def register(app) -> None:
    """Inside a ``gr.Blocks``: expose every tool as an API / MCP endpoint named after its function, bad input
    answered in one line as on the page."""
    import gradio as gr

    from abu_explorer.app.views.common import friendly

    for fn in make_tools(app):
        gr.api(friendly(fn), api_name=fn.__name__)
