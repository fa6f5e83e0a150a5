"""AbU Explorer: which training images made this picture? Run ``python app.py`` (offline, CPU).

The page is built in ``abu_explorer/app/`` (views per tab, service functions tested without Gradio);
this file only builds and launches it. ``--precomputed DIR`` (or ABU_PRECOMPUTED) chooses the model and its
tables, ABU_RESULTS_DIR the counterfactual results folder.
"""
import argparse

from abu_explorer.app.demo import LAUNCH, build_demo, default_app

__all__ = ["build_demo"]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description="AbU Explorer web app")
    p.add_argument("--precomputed", default=None, help="a precomputed folder (default: the embedded model's)")
    args = p.parse_args()
    # mcp_server: the API tools (generate_image, attribute_image, compare_methods) at /gradio_api/mcp/
    build_demo(default_app(args.precomputed)).queue(max_size=32, default_concurrency_limit=1).launch(**LAUNCH)
