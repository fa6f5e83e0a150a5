"""Tab 3, examples: the evaluation queries with every method's ranking and the finished retrains, all
precomputed, plus the evaluation table and plot; two-concept box queries with their known sources framed."""

from pathlib import Path

from abu_explorer.app.views.common import LIGHT, friendly
from abu_explorer.app.views.attribute import PER_ROW
from abu_explorer.app.views.counterfactual import default_k


OWN, OTHER = "#2ca02c", "#d62728"  # frames of a box query's known sources


def build(app, assets: Path) -> None:
    import gradio as gr

    from abu_explorer.app import examples, inputs
    from abu_explorer.attribution import METHODS

    items = examples.load(app)
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
        cf = gr.Gallery(label=f"remove K={k} and regenerate (finished retrains)", columns=4,
                        height=inputs.SHOW + 120, allow_preview=False, format="png")
    heads, gals = {}, {}
    for start in range(0, len(METHODS), PER_ROW):
        with gr.Row(equal_height=False):
            for m in METHODS[start:start + PER_ROW]:
                with gr.Column(min_width=150):
                    heads[m.name] = gr.Markdown()
                    gals[m.name] = gr.Gallery(label=m.label, columns=2, height=480, allow_preview=False, format="png")
    own = not app.explorer.retrain_note  # the evaluation in assets/ is the embedded model's
    if own and (assets / "counterfactual_table.md").exists():
        gr.Markdown("#### The evaluation so far (mean ± s.e. over queries; see docs/evaluation.md)\n"
                    + (assets / "counterfactual_table.md").read_text())
    if own and (assets / "counterfactual_plot.png").exists():
        gr.Image(str(assets / "counterfactual_plot.png"), label="counterfactual metrics per method", interactive=False)

    @friendly
    def show(name):
        item = next((it for it in items if it["name"] == name), None)
        if item is None:
            raise inputs.UIError(f"no example {name!r}")
        outs = [item["image_path"], examples.counterfactual_tiles(app, item, k)]
        known = item.get("known")
        marks = {known["own"]: (OWN, "box's own source"), known["other"]: (OTHER, "the other source")} if known else None
        for m in METHODS:
            r = item["rankings"].get(m.name)
            head = f"**{m.label}** · {r['mode']} · {r['wall_seconds']:.2f} s" if r else ""
            if r and known:
                ranks = r["tracked"]
                head += f" · own source **#{ranks[str(known['own'])]}**, other #{ranks[str(known['other'])]}"
            outs += [head, app.tiles(r, marks=marks) if r else []]
        return outs

    choice.change(show, [choice], [img, cf] + [c for m in METHODS for c in (heads[m.name], gals[m.name])],
                  **LIGHT, api_name="example", api_visibility="undocumented")
