"""Tab 3, examples: the evaluation queries with every method's ranking and the finished retrains, all
precomputed, plus the evaluation table and plot; two-concept box queries with their known sources framed;
customized models with their exemplars framed, and their fine-tune re-run without a method's top-K."""

from pathlib import Path

from abu_explorer.app.views.common import HEAVY, LIGHT, admitted, friendly
from abu_explorer.app.views.attribute import PER_ROW
from abu_explorer.app.views.counterfactual import default_k


OWN, OTHER = "#2ca02c", "#d62728"  # frames of a box query's known sources


EVALUATIONS = (("counterfactual", "Remove and regenerate: leave-K-out (mean ± s.e. over queries)"),
               ("lds", "Linear datamodeling score: every method on 50 queries"),
               ("boxes", "Two-concept boxes: does a box find its own source?"),
               ("customized", "Customized models: does a method find the exemplars?"))


def evaluations(assets: Path) -> None:
    """Each evaluation's committed table and figures (``assets/<name>_table.md``, ``_curve.png``, ``_plot.png``),
    folded; the protocols are in docs/evaluation.md."""
    import gradio as gr

    gr.Markdown("#### Evaluations (protocols and commands: docs/evaluation.md)")
    for name, title in EVALUATIONS:
        table = assets / f"{name}_table.md"
        figures = [f for f in (assets / f"{name}_curve.png", assets / f"{name}_plot.png") if f.exists()]
        if not (table.exists() or figures):
            continue
        with gr.Accordion(title, open=False, elem_id=f"evaluation-{name}"):
            for figure in figures:  # the curve over K first: the figure the evaluation is built around
                gr.Image(str(figure), label=title, interactive=False, show_label=False)
            if table.exists():
                gr.Markdown(table.read_text())


def build(app, assets: Path) -> None:
    import gradio as gr

    from abu_explorer.app import examples, inputs
    from abu_explorer.attribution import METHODS

    items = examples.load(app)
    ks = examples.grid_ks(len(app.explorer.dataset))
    k = default_k(len(app.explorer.dataset))
    gr.Markdown("Curated queries with every method's ranking and the finished remove-and-regenerate "
                "checks, all precomputed: the whole story without waiting.")
    if not items:
        gr.Markdown(f"No examples were built for this model; build them with: {examples.HINT} "
                    f"--precomputed {app.explorer.root} --queries YOUR_QUERIES.json")
    captions = app.explorer.dataset.captions
    choice = gr.Radio([(examples.label(it, captions), it["name"]) for it in items],
                      label="example", elem_id="example-choice")
    with gr.Row():
        img = gr.Image(label="query", interactive=False, type="filepath", height=inputs.SHOW + 40)
        with gr.Column(scale=3):
            cf_k = gr.Radio(ks, value=k if k in ks else ks[len(ks) // 2], label="K removed (the evaluation's grid)",
                            elem_id="example-k")
            cf = gr.Gallery(label="remove the top K and regenerate (finished retrains)", columns=4,
                            height=inputs.SHOW + 120, allow_preview=False, format="png",
                            elem_id="example-counterfactuals")
    heads, gals = {}, {}
    for start in range(0, len(METHODS), PER_ROW):
        with gr.Row(equal_height=False):
            for m in METHODS[start:start + PER_ROW]:
                with gr.Column(min_width=150):
                    heads[m.name] = gr.Markdown()
                    gals[m.name] = gr.Gallery(label=m.label, columns=2, height=480, allow_preview=False, format="png")
    gr.Markdown("**Customized-model examples**: remove a method's top-K and re-run the fine-tune without the "
                "exemplars among them (the base model stays), then regenerate with the same noise.")
    with gr.Row():
        rc_method = gr.Dropdown([(m.label, m.name) for m in METHODS], value=METHODS[0].name, label="method")
        rc_k = gr.Number(value=2, precision=0, label="K (of the top 12)", minimum=1, maximum=examples.TOP)
        rc_btn = gr.Button("remove top-K and re-customize", elem_id="recustomize")
    with gr.Row():
        rc_gal = gr.Gallery(label="before / after", columns=2, height=inputs.SHOW + 80, allow_preview=False,
                            format="png")
        rc_md = gr.Markdown()
    if not app.explorer.retrain_note:  # the evaluations in assets/ are the embedded model's
        evaluations(assets)

    @friendly
    def show(name, k_shown):
        item = next((it for it in items if it["name"] == name), None)
        if item is None:
            raise inputs.UIError(f"no example {name!r}")
        outs = [item["image_path"], examples.counterfactual_tiles(app, item, int(k_shown or k))]
        known, marks, extra = item.get("known") or {}, None, examples.extra_rows(item, item["folder"])
        if "own" in known:
            marks = {known["own"]: (OWN, "box's own source"), known["other"]: (OTHER, "the other source")}
        elif "exemplars" in known:
            marks = {e: (OWN, "exemplar") for e in known["exemplars"]}
        for m in METHODS:
            r = item["rankings"].get(m.name)
            head = f"**{m.label}** · {r['mode']} · {r['wall_seconds']:.2f} s" if r else ""
            if r and examples.stale(app, item, m.name):
                head += f" · **made with other settings than {m.name}'s current ones** (rebuild: {examples.HINT})"
            if r and "own" in known:
                ranks = r["tracked"]
                head += f" · own source **#{ranks[str(known['own'])]}**, other #{ranks[str(known['other'])]}"
            elif r and "exemplars" in known:
                head += " · exemplars at " + ", ".join(f"**#{r['tracked'][str(e)]}**" for e in known["exemplars"])
            outs += [head, app.tiles(r, marks=marks, extra=extra) if r else []]
        return outs

    shown = [img, cf] + [c for m in METHODS for c in (heads[m.name], gals[m.name])]
    @friendly
    def show_k(name, k_shown):  # only the tiles, when the reader picks another K
        item = next((it for it in items if it["name"] == name), None)
        return examples.counterfactual_tiles(app, item, int(k_shown)) if item and k_shown else []

    choice.change(show, [choice, cf_k], shown, **LIGHT, api_name="example", api_visibility="undocumented")
    cf_k.change(show_k, [choice, cf_k], [cf], **LIGHT, api_name="example_k", api_visibility="undocumented")

    @friendly
    def recustomize(name, method, k):
        item = next((it for it in items if it["name"] == name), None)
        if item is None:
            raise inputs.UIError("pick a customized-model example first")
        return app.recustomize(item, method, k)

    rc_btn.click(admitted(app, recustomize), [choice, rc_method, rc_k], [rc_gal, rc_md], **HEAVY,
                 api_name="recustomize", api_visibility="undocumented")
