"""AbU Explorer: which training images made this picture? Run ``python app.py`` (offline, CPU).

The page is built in ``abu_explorer/app/`` (views per tab, service functions tested without Gradio);
this file only builds and launches it. ABU_MODEL_DIR / ABU_RESULTS_DIR choose the model and results folders.
"""
from abu_explorer.app.demo import build_demo

__all__ = ["build_demo"]

if __name__ == "__main__":
    # mcp_server: the API tools (generate_image, attribute_image, compare_methods) at /gradio_api/mcp/
    build_demo().queue(max_size=32, default_concurrency_limit=1).launch(mcp_server=True)
