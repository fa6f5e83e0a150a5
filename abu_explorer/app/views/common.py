"""What every tab shares: the queue slots, readable errors, and the query inputs of tab 1."""

import functools
from dataclasses import dataclass

# Everything that runs the UNet: one at a time in Gradio's queue (which shows a visitor its place), and then
# in the UNet's turns (``turns.py``), which a retrain's measurements and light events that need a generation
# share. Letting every request through to the turns' bounded waiting room instead (refusing the rest in one
# line) was measured by ``bench load`` and was worse on 2 cores: docs/app.md, "Load test".
HEAVY = dict(concurrency_id="model", concurrency_limit=1)
LIGHT = dict(concurrency_id="light", concurrency_limit=4)  # NN lookups, cached results, box drawing


def gpu(fn):
    """On a Hugging Face ZeroGPU Space (the ``spaces`` package is installed there) a GPU is attached for each
    call; elsewhere the function is returned as it is."""
    try:
        import spaces
    except ImportError:
        return fn
    return functools.wraps(fn)(spaces.GPU(fn))


def friendly(fn):
    """Errors a user can cause become one readable line (``gr.Error``), never a traceback."""
    import gradio as gr

    from abu_explorer.app.inputs import UIError
    from abu_explorer.artifacts import ArtifactError
    from abu_explorer.model.tokenizer import PromptError

    errors = (UIError, PromptError, ArtifactError, ValueError, FileNotFoundError)

    @functools.wraps(fn)  # Gradio reads the signature (SelectData, Progress) through __wrapped__
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except errors as e:
            raise gr.Error(str(e)) from None
    return wrapped


def source_of(kind, prompt, seed, steps, guidance, upload, caption) -> dict:
    """The page's query inputs -> the source dict ``ExplorerApp.query`` takes."""
    if kind == "upload":
        return {"type": "upload", "image": upload, "caption": caption}
    return {"type": "generated", "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance}


@dataclass
class QueryInputs:
    """The components that define a query (tab 1); the remove-and-regenerate tab reads them too."""

    kind: object
    prompt: object
    seed: object
    steps: object
    guidance: object
    upload: object
    caption: object
    box: list  # x0, y0, x1, y1

    @property
    def source(self) -> list:
        return [self.kind, self.prompt, self.seed, self.steps, self.guidance, self.upload, self.caption]
