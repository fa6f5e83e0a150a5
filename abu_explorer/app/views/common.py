"""What every tab shares: the queue slots, readable errors, and the query inputs of tab 1."""

import functools
from dataclasses import dataclass

# Everything that may run the UNet (generation, every method's ranking) is let through Gradio's queue at once
# and admitted (``admitted``) by the UNet's turns (``turns.py``), whose bounded waiting room a retrain's
# measurements share: a request that finds it full is refused in one line, in the event loop, before it takes
# a worker thread. docs/app.md, "Queue and locking" and "Load test", has the measurements behind this.
HEAVY = dict(concurrency_limit=None)
LIGHT = dict(concurrency_id="light", concurrency_limit=4)  # box drawing, job polling, cached images


def admitted(app, fn, needs_turn=None):
    """``fn`` (blocking) as an async handler that first asks the turns' waiting room for admission: a full room
    refuses at once with one line, without a worker thread; an admitted call runs in a worker thread and waits
    there for its turn. ``needs_turn(*args)`` False: a call that will not touch the UNet (an unchecked method)
    runs without admission, so a full room never refuses it."""
    import anyio
    import gradio as gr

    from abu_explorer.app.turns import Busy

    @functools.wraps(fn)  # Gradio reads the signature (Progress, Request) through __wrapped__
    async def run(*args, **kwargs):
        call = functools.partial(fn, *args, **kwargs)
        if needs_turn is not None and not needs_turn(*args):
            return await anyio.to_thread.run_sync(call)
        progress = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Progress)), None)
        on_wait = None if progress is None else (lambda ahead: progress(0.0, desc=f"waiting for the model: "
                                                                        f"{ahead} ahead of you"))
        try:
            with app.lock.admit(on_wait):  # the pass travels into the worker thread with the copied context
                return await anyio.to_thread.run_sync(call)
        except Busy as e:
            raise gr.Error(str(e)) from None
    return run


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
