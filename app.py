"""AbU Explorer web app. The full explorer (attribution, baselines, remove-and-regenerate) is being
built; this first page generates images with the embedded model. Run: ``python app.py``."""
from __future__ import annotations

import os

from abu_explorer.cli import DEFAULT_DIR


def build_demo():
    import gradio as gr

    from abu_explorer.pipeline import Explorer
    from abu_explorer.tokenizer import PromptError

    explorer = Explorer.load(os.environ.get("ABU_MODEL_DIR", DEFAULT_DIR))

    def generate(prompt: str, seed: float, steps: float, guidance: float, progress=gr.Progress()):
        try:
            g = explorer.generate(prompt, int(seed), int(steps), float(guidance),
                                  callback=lambda i, n: progress(i / n, desc="sampling"))
        except (PromptError, ValueError) as e:
            raise gr.Error(str(e)) from None
        note = f"unknown words (read as <unk>): {', '.join(g.unknown_words)}" if g.unknown_words else ""
        return g.image.resize((256, 256), 0), note

    with gr.Blocks(title="AbU Explorer") as demo:
        gr.Markdown("# AbU Explorer\nWhich training images made this picture? "
                    "(Attribution by Unlearning; the attribution tabs are on their way.)")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", value="red apple")
                seed = gr.Number(label="seed", value=0, precision=0, minimum=0)
                steps = gr.Slider(1, 200, value=50, step=1, label="DDIM steps")
                guidance = gr.Slider(0, 15, value=3.0, step=0.5, label="guidance")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="generated (32x32, shown 8x)", type="pil", image_mode="RGB")
                note = gr.Markdown()
        button.click(generate, [prompt, seed, steps, guidance], [image, note], concurrency_id="model")
        gr.Markdown("Emoji graphics: [OpenMoji](https://openmoji.org), CC BY-SA 4.0.")
    return demo


if __name__ == "__main__":
    build_demo().queue(max_size=32).launch()
