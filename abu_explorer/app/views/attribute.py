"""Tab 1, generate & attribute: prompt (or upload) -> query image with an optional box -> one gallery per
method, side by side, in the registry's order."""

from abu_explorer.app.views.common import (
    HEAVY,
    LIGHT,
    QueryInputs,
    admitted,
    friendly,
    gpu,
    source_of,
)

PER_ROW = 5  # method galleries side by side


def build(app) -> QueryInputs:
    import gradio as gr

    from abu_explorer.app import inputs, service
    from abu_explorer.attribution import METHODS

    n_train = len(app.explorer.dataset)
    kind, clicks = gr.State("generated"), gr.State([])
    # 1. query: generate or upload
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            with gr.Tab("Generate"):
                prompt = gr.Textbox(label="prompt", value="red apple", max_lines=1, elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(label="seed", value=0, precision=0, minimum=0)
                    steps = gr.Slider(1, 200, value=50, step=1, label="DDIM steps")
                guidance = gr.Slider(0, 15, value=app.explorer.default_guidance, step=0.5, label="guidance")
                gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples([["red apple", 0], ["red heart", 0], ["banana", 0], ["grinning face", 0]],
                            inputs=[prompt, seed], cache_examples=False)
            with gr.Tab("Upload"):
                upload = gr.File(label="your image (PNG, JPEG, ...)", file_types=["image"], type="filepath")
                caption = gr.Textbox(label="its caption", max_lines=1)
                up_btn = gr.Button("Use this image")
        # 2. the box
        with gr.Column(scale=1, min_width=280):
            query_img = gr.Image(label="query: click two corners to set a box", type="pil", format="png",
                                 interactive=False, height=inputs.SHOW + 40, elem_id="query")
            with gr.Row():
                box = [gr.Number(label=n, precision=1, minimum=0, maximum=app.image_size, min_width=60)
                       for n in ("x0", "y0", "x1", "y1")]
            with gr.Row():
                box_btn = gr.Button("Show box", size="sm")
                clear_btn = gr.Button("Whole image", size="sm")
            note = gr.Markdown(f"Box in model pixels (0-{app.image_size}); empty = whole image.")
            if not app.explorer.retrain_note:  # the embedded model: what its box benchmark found
                gr.Markdown("On this model the pixel and CLIP neighbours localize a box; the gradient methods' "
                            "boxes, AbU's included, scored at chance on two-concept composites (the model binds "
                            "no region to a word; see docs/evaluation.md).", elem_id="box_caveat")
            with gr.Accordion("or drag a box on the image", open=False):
                from gradio_image_annotation import image_annotator

                drag = image_annotator(label="drag a box", image_type="pil", single_box=True, sources=[],
                                       disable_edit_boxes=True, show_download_button=False,
                                       show_clear_button=False, height=inputs.SHOW + 40, elem_id="drag")
        # 3. the methods
        with gr.Column(scale=1, min_width=280):
            k = gr.Slider(1, min(service.MAX_K, n_train), value=10, step=1, label="K (images per method)")
            chosen = gr.CheckboxGroup([(m.label, m.name) for m in METHODS], value=[m.name for m in METHODS],
                                      label="methods")
            mode = gr.Radio(["fast", "exact"], value="fast", label=" / ".join(m.label.split(" (")[0] for m in METHODS
                                                                           if "exact" in m.modes) + " mode",
                            info="exact measures every training image: AbU about 20 s on 2 CPU cores; IF builds "
                                 "its gradient table on first use (about a minute), then about 2 s")
            attr_btn = gr.Button("Attribute", variant="primary", elem_id="attribute")
    columns, heads, galleries, states = {}, {}, {}, {}
    for start in range(0, len(METHODS), PER_ROW):  # rows of a few methods: a lone wrapped column would be huge
        with gr.Row(equal_height=False):
            for m in METHODS[start:start + PER_ROW]:
                with gr.Column(min_width=150, visible=False) as columns[m.name]:
                    heads[m.name] = gr.Markdown(elem_id=f"head-{m.name}")
                    galleries[m.name] = gr.Gallery(label=m.label, columns=2, height=560, allow_preview=False,
                                                   object_fit="contain", format="png", elem_id=f"gallery-{m.name}")
                    states[m.name] = gr.State(None)
    with gr.Row():
        detail_img = gr.Image(label="selected training image", interactive=False, height=296, type="pil", format="png")
        detail_md = gr.Markdown("Click a tile to see it large.")
        with gr.Column():
            agree_md = gr.Markdown()
            files = gr.File(label="rankings of this query (JSON with settings and model hashes, CSV)",
                            file_count="multiple", interactive=False)

    q = QueryInputs(kind, prompt, seed, steps, guidance, upload, caption, box)
    _wire(app, q, locals())
    return q


def _wire(app, q: QueryInputs, c: dict) -> None:
    import gradio as gr

    from abu_explorer.app import inputs
    from abu_explorer.attribution import METHODS

    @friendly
    @gpu
    def generate(prompt, seed, steps, guidance, progress=gr.Progress()):
        g = app.generate(prompt, seed, steps, guidance, progress=lambda i, n: progress(i / n, desc="sampling"))
        note = f"Words the model does not know (read as `<unk>`): {', '.join(g.unknown_words)}" if g.unknown_words else ""
        big = inputs.draw_box(g.image, None, inputs.SHOW)
        return "generated", big, note, None, None, None, None, [], {"image": big, "boxes": []}

    @friendly
    def use_upload(upload, caption):
        src = source_of("upload", None, None, None, None, upload, caption)
        app.query(src)  # validates the image and caption now, not at attribution time
        big = app.preview(src)
        return "upload", big, "Attributing the uploaded image.", None, None, None, None, [], {"image": big, "boxes": []}

    @friendly
    def click_box(kind, prompt, seed, steps, guidance, upload, caption, clicks, evt: gr.SelectData):
        clicks = (clicks or []) + [tuple(evt.index)]
        src = source_of(kind, prompt, seed, steps, guidance, upload, caption)
        if len(clicks) < 2:
            return (clicks, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(),
                    "First corner set; click the opposite corner.")
        box = inputs.clicks_to_box(clicks[0], clicks[1], inputs.SHOW, app.image_size)
        return [], *box, app.preview(src, box), f"Box {box}."

    @friendly
    def dragged(kind, prompt, seed, steps, guidance, upload, caption, annotation):
        box = inputs.dragged_box(annotation, inputs.SHOW, app.image_size)
        if box is None:
            return gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
        src = source_of(kind, prompt, seed, steps, guidance, upload, caption)
        return *box, app.preview(src, box), f"Box {box}."

    @friendly
    def show_box(kind, prompt, seed, steps, guidance, upload, caption, x0, y0, x1, y1):
        box = inputs.parse_box((x0, y0, x1, y1), app.image_size)
        note = "Whole image." if box is None else f"Box {tuple(int(v) if float(v).is_integer() else v for v in box)}."
        return app.preview(source_of(kind, prompt, seed, steps, guidance, upload, caption), box), note

    @friendly
    def show_tile(result, evt: gr.SelectData):
        if not result:
            return None, ""
        row = result["results"][evt.index]
        img, caption = app.training_image(row["index"])
        return img, (f"**{caption}** · training index {row['index']} · rank {row['rank']} by {result['label']} · "
                     f"score {row['score']:.4g}")

    query_out = [q.kind, c["query_img"], c["note"], *q.box, c["clicks"], c["drag"]]
    gen_in = [q.prompt, q.seed, q.steps, q.guidance]
    # a new query image clears the rankings of the previous one: they would no longer belong to what is shown
    shown = [x for m in METHODS for x in (c["heads"][m.name], c["galleries"][m.name], c["states"][m.name])]

    def clear_results():
        return [v for _ in METHODS for v in ("", [], None)]
    for event in (c["gen_btn"].click(admitted(app, generate), gen_in, query_out, **HEAVY, api_name="generate",
                                     api_visibility="undocumented"),
                  q.prompt.submit(admitted(app, generate), gen_in, query_out, **HEAVY, api_name=False),
                  c["up_btn"].click(admitted(app, use_upload), [q.upload, q.caption], query_out, **HEAVY,
                                    api_name="upload", api_visibility="undocumented")):
        event.success(clear_results, None, shown, concurrency_limit=None, api_name=False)  # instant: never queued
    c["query_img"].select(click_box, [*q.source, c["clicks"]], [c["clicks"], *q.box, c["query_img"], c["note"]],
                          **LIGHT, api_name=False)
    c["drag"].change(dragged, [*q.source, c["drag"]], [*q.box, c["query_img"], c["note"]], **LIGHT, api_name=False)
    c["box_btn"].click(show_box, [*q.source, *q.box], [c["query_img"], c["note"]], **LIGHT, api_name="show_box",
                       api_visibility="undocumented")
    c["clear_btn"].click(lambda: (None, None, None, None, []), None, [*q.box, c["clicks"]], api_name=False).then(
        show_box, [*q.source, *q.box], [c["query_img"], c["note"]], **LIGHT, api_name=False)
    # attributing redraws the box but keeps the note (it may name words the model did not know)
    checked = c["attr_btn"].click(lambda *a: show_box(*a)[0], [*q.source, *q.box], [c["query_img"]], **LIGHT,
                                  api_name=False)
    for m in METHODS:
        # admitted when it will run the UNet: a checked gradient method, or a nearest-neighbour ranking of a
        # prompt not generated yet (a[:7]: the query source, a[12]: the methods checked on the page)
        def needs_turn(*a, m=m):
            return m.name in (a[12] or []) and (m.uses_unet or app.needs_generation(source_of(*a[:7])))
        checked.success(admitted(app, _attribute_fn(app, m), needs_turn), [*q.source, *q.box, c["k"], c["chosen"],
                        c["mode"]], [c["columns"][m.name], c["heads"][m.name], c["galleries"][m.name],
                        c["states"][m.name]], **HEAVY, api_name=f"attribute_{m.name}", api_visibility="undocumented")
        c["galleries"][m.name].select(show_tile, [c["states"][m.name]], [c["detail_img"], c["detail_md"]],
                                      **LIGHT, api_name=False)
    results = [c["states"][m.name] for m in METHODS]

    @friendly
    def takeaway(*shown):
        import tempfile

        from abu_explorer.app import exports

        if not any(shown):
            return "", None
        paths = exports.write_rankings(list(shown), app.model_hashes(), app.method_settings(), tempfile.mkdtemp())
        return exports.agreement(list(shown)), [str(p) for p in paths]

    for state in results:
        state.change(takeaway, results, [c["agree_md"], c["files"]], **LIGHT, api_name=False)


def _attribute_fn(app, m):
    import gradio as gr

    @friendly
    @gpu
    def run(kind, prompt, seed, steps, guidance, upload, caption, x0, y0, x1, y1, k, chosen, mode,
            progress=gr.Progress()):
        if m.name not in (chosen or []):
            return gr.Column(visible=False), "", [], None
        query = app.query(source_of(kind, prompt, seed, steps, guidance, upload, caption), (x0, y0, x1, y1))
        result = app.attribute(query, m.name, k, mode if m.modes else "fast",
                               progress=lambda i, n: progress(i / max(n, 1), desc=m.label))
        head = f"**{result['label']}** · {result['mode']} · {result['wall_seconds']:.2f} s"
        if result["notes"]:
            head += f"  \n<small>{result['notes']}</small>"
        return gr.Column(visible=True), head, app.tiles(result), result
    run.__name__ = f"attribute_{m.name}"
    return run
