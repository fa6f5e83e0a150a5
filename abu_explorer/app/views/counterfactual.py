"""Tab 2, remove & regenerate: drop a method's top-K and K random images, retrain each (server-side jobs),
regenerate with the same noise; progress refreshes every 5 s and after a page reload."""

import html

from abu_explorer.app.views.common import HEAVY, LIGHT, QueryInputs, admitted, friendly, source_of


def default_k(n_train: int) -> int:
    return max(1, round(0.0085 * n_train))  # 0.85% of N, the paper's middle setting


def build(app, q: QueryInputs) -> None:
    import gradio as gr

    from abu_explorer.attribution import METHODS

    n_train = len(app.explorer.dataset)
    if app.explorer.retrain_note:  # a user's model: say why, offer nothing that cannot run
        gr.Markdown(f"Not available for this model: {app.explorer.retrain_note}.")
        return
    gr.Markdown("Removes the method's top-K training images **and** K random images (the control), "
                "retrains the UNet from scratch without each set (same recipe and seed; about 20-50 "
                "minutes each on 2 CPU cores), then regenerates the query with the same noise. Results "
                "are cached: a request done before (here or on another machine, as labelled) shows at once. "
                "Jobs run on the server, so you may reload the page and ask again to see their progress. "
                f"Each visitor may have {app.jobs.per_client} retrains queued or running, the server "
                f"{app.jobs.total} in all.")
    with gr.Row():
        method = gr.Dropdown([(m.label, m.name) for m in METHODS if not m.control], value=METHODS[0].name,
                             label="method")
        k = gr.Number(value=default_k(n_train), precision=0, minimum=1, maximum=n_train,
                      label="K (0.85% of N, as in the paper's middle setting)")
        go = gr.Button("Remove & regenerate", variant="primary")
        refresh = gr.Button("Refresh")
        cancel_btn = gr.Button("Cancel")
    keys = gr.State([])
    with gr.Row():
        orig = gr.Image(format="png", label="original", interactive=False, type="pil")
        img = gr.Image(format="png", label="without the method's top-K", interactive=False, type="pil")
        rand = gr.Image(format="png", label="without K random images", interactive=False, type="pil")
    with gr.Row():
        gr.Markdown()
        md = gr.Markdown()
        rand_md = gr.Markdown()
    status = gr.HTML()
    with gr.Accordion("all jobs on this server", open=False):
        jobs = gr.Markdown()
    timer = gr.Timer(5.0)

    @friendly
    def request(kind, prompt, seed, steps, guidance, upload, caption, x0, y0, x1, y1, method, k,
                request: gr.Request = None):
        query = app.query(source_of(kind, prompt, seed, steps, guidance, upload, caption), (x0, y0, x1, y1))
        ks = app.request_counterfactual(query, method, k, owner=client_of(request))
        return ks, *render(app, ks)

    def poll(ks):
        listing = [j.describe() for j in app.jobs.snapshot()]
        return *render(app, ks), "  \n".join(listing) or "No jobs on this server yet."

    @friendly
    def cancel(ks):
        for key in ks or []:
            app.jobs.cancel(key)
        return "Cancel requested (a running retrain stops after its current epoch; requesting it again resumes it)."

    outs = [orig, img, md, rand, rand_md, status]
    go.click(admitted(app, request), [*q.source, *q.box, method, k], [keys, *outs], **HEAVY, api_name="counterfactual", api_visibility="undocumented")
    cancel_btn.click(cancel, [keys], [status], **LIGHT, api_name=False)
    timer.tick(poll, [keys], [*outs, jobs], **LIGHT, api_name=False)
    refresh.click(poll, [keys], [*outs, jobs], **LIGHT, api_name="counterfactual_status", api_visibility="undocumented")


def render(app, keys) -> tuple:
    """(original, method image, method markdown, random image, random markdown, status html) for two keys."""
    outs, status = [], []
    for key in keys or [None, None]:
        result = None
        if key:
            result = app.result_for_key(key)
            job = app.jobs.get(key)
            if result is None and job is not None:
                status.append(job_html(job, app.queue_note(key)))
        if result is None:
            outs += [None, ""]
        else:
            img, md = app.counterfactual_view(result)
            outs += [img, f"**{result['method']} K={result['k']}**  \n" + md]
    original = app.original_image(keys[0]) if keys else None
    return original, *outs, "".join(status) or ("" if keys else "Nothing requested yet.")


def client_of(request) -> str:
    """Who asks, for the per-visitor cap: the first forwarded address behind a proxy (a Space), else the peer."""
    if request is None:
        return ""
    forwarded = (request.headers.get("x-forwarded-for") or "").split(",")[0].strip()
    return forwarded or (request.client.host if request.client else "")


def job_html(job, note: str = "") -> str:
    text = html.escape(job.describe() + (f" ({note})" if note else ""))
    if job.status != "running" or not job.total_units:
        return f"<div>{text}</div>"
    return f'<div>{text}<br><progress value="{job.done_units}" max="{job.total_units}" style="width: 60%"></progress></div>'
