"""TRAK for diffusion models as first applied to them (Park et al. 2023; the baseline of the D-TRAK and AbU
papers): D-TRAK's machinery with the model output function set to the DDPM loss itself.

# Notation (code -> paper)
#   f(z) = mean_t ||eps - eps_theta(x_t, t)||^2 -> the output function: the training loss at fixed timesteps
#                                                and fixed noise (box-masked for local queries)
#   phi(z) = P^T grad_theta f(z)               -> projected loss gradients, the same P as D-TRAK's
#   scores = Phi (Phi^T Phi + lambda I)^-1 phi(query)
#          -> a Newton step without z changes the query's loss by about this: higher = more influential
# The two methods differ only in f: D-TRAK's point is that ||eps_theta||^2 attributes better than the loss.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from abu_explorer.attribution import dtrak

HINT = "python -m abu_explorer precompute --method trak"
CONFIG = dtrak.DTrakConfig(output="loss")


def precompute(explorer, cfg: dtrak.DTrakConfig = CONFIG, folder: Path | None = None, progress=True) -> Path:
    if cfg.output != "loss":
        cfg = dataclasses.replace(cfg, output="loss")
    return dtrak.precompute(explorer, cfg, folder, progress, name="trak")


class Trak(dtrak.DTrak):
    name = "trak"
    hint = HINT
    tables = "trak"
