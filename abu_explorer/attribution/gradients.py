"""Per-example gradients of the DDPM loss with respect to a parameter selection, and the diagonal Fisher.

``torch.func.vmap`` fails inside diffusers' UNet (data-dependent control flow), so per-example
gradients of Linear weights come from hooks: for y = W x, dL_b/dW = sum_l g_{b,l} x_{b,l}^T with g the
gradient at the layer's output. Every other selected parameter falls back to a loop (one backward per
example). Every op in the UNet acts on each example alone (GroupNorm, attention), so these are exact.
"""
from __future__ import annotations

import torch

from abu_explorer.attribution import distributed, params


class PerExampleGradients:
    def __init__(self, unet: torch.nn.Module, selection: str = "cross-attn"):
        self.unet = unet
        self.selected = params.select(unet, selection)
        modules = dict(unet.named_modules())
        self.linear: dict[str, torch.nn.Linear] = {}
        for name in self.selected:
            mod_name, _ = name.rsplit(".", 1)
            if isinstance(modules[mod_name], torch.nn.Linear):
                self.linear[mod_name] = modules[mod_name]
        self.hooked = all(name.rsplit(".", 1)[0] in self.linear for name in self.selected)
        self.numel = sum(p.numel() for p in self.selected.values())

    def __call__(self, loss_fn, batch: int) -> torch.Tensor:
        """(batch, numel) flat per-example gradients of ``loss_fn() -> (batch,) losses``."""
        with params.only_grad_for(self.unet, self.selected):
            return self._hooked(loss_fn, batch) if self.hooked else self._looped(loss_fn, batch)

    def _hooked(self, loss_fn, batch: int) -> torch.Tensor:
        inputs, grads, handles = {}, {}, []

        def make_hook(name):
            def hook(module, args, output):
                inputs[name] = args[0].detach()
                output.register_hook(lambda g: grads.__setitem__(name, g.detach()))
            return hook

        for name, mod in self.linear.items():
            handles.append(mod.register_forward_hook(make_hook(name)))
        try:
            losses = loss_fn()
            torch.autograd.grad(losses.sum(), list(self.selected.values()))
        finally:
            for h in handles:
                h.remove()
        parts = []
        for name in self.selected:
            mod_name, kind = name.rsplit(".", 1)
            x, g = inputs[mod_name], grads[mod_name]
            x, g = x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1])
            parts.append(torch.einsum("blo,bli->boi", g, x).reshape(batch, -1) if kind == "weight"
                         else g.sum(dim=1))
        return torch.cat(parts, dim=1)

    def _looped(self, loss_fn, batch: int) -> torch.Tensor:
        losses = loss_fn()
        rows = []
        for b in range(batch):
            g = torch.autograd.grad(losses[b], list(self.selected.values()), retain_graph=b + 1 < batch,
                                    allow_unused=True)
            rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                   for gi, p in zip(g, self.selected.values())]))
        return torch.stack(rows)


def random_draw(seed: int, sample: int, row: int, shape: tuple[int, ...], num_train_timesteps: int):
    """(timestep, noise) of one Fisher / unlearning sample: a function of (seed, sample, row) only."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + sample) * 1_000_033 + row) % (2**63 - 1))
    t = int(torch.randint(0, num_train_timesteps, (1,), generator=g))
    return t, torch.randn(shape, generator=g)


def diagonal_fisher(unet, scheduler, latents: torch.Tensor, states: torch.Tensor, selection: str = "cross-attn",
                    passes: int = 5, seed: int = 0, batch_size: int = 64, progress=None,
                    caption_image: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (pass, caption row) of squared per-example gradients; each sample at a random t with fresh
    noise. latents: (N, C, h, w) or (N, F, C, h, w) (flip f drawn with the timestep); ``states`` row r
    captions image ``caption_image[r]`` (default: image r). Returns (numel,).
    """
    from abu_explorer.attribution.ddpm_loss import ddpm_losses

    lat = latents if latents.dim() == 5 else latents[:, None]
    image = torch.arange(len(states)) if caption_image is None else caption_image
    pex = PerExampleGradients(unet, selection)
    items = [(p, r) for p in range(passes) for r in range(len(states))]
    shape = tuple(lat.shape[2:])
    T = scheduler.config.num_train_timesteps

    def batch(b: int) -> torch.Tensor:
        chunk = items[b * batch_size:(b + 1) * batch_size]
        draws = [random_draw(seed, p, r, shape, T) for p, r in chunk]
        flip = [(p + r) % lat.shape[1] for p, r in chunk]
        rows = torch.tensor([r for _, r in chunk])
        x0 = lat[image[rows], torch.tensor(flip)]
        t = torch.tensor([d[0] for d in draws])
        noise = torch.stack([d[1] for d in draws])
        g = pex(lambda: ddpm_losses(unet, scheduler, x0, t, noise, states[rows]), len(chunk))
        return g.pow(2).sum(dim=0)

    num = (len(items) + batch_size - 1) // batch_size
    parts = distributed.run_batches(batch, num, progress)
    total = parts[0].clone()
    for p in parts[1:]:  # fixed order: the same sum for any number of ranks
        total += p
    return total / len(items)
