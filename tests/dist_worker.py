"""Run by test_distributed under torchrun: sharded loss table, Fisher and nearest-neighbour features (toy
UNet, toy image embedder)."""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from abu_explorer.attribution import distributed  # noqa: E402
from abu_explorer.attribution.ddpm_loss import loss_table  # noqa: E402
from abu_explorer.attribution.gradients import diagonal_fisher  # noqa: E402


def toy():
    from abu_explorer.model import components as models
    from conftest import TINY_UNET

    torch.manual_seed(0)
    unet = models.build_unet(TINY_UNET).eval()
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(11, 4, 8, 8, generator=g)
    states = torch.randn(11, 16, 16, generator=g)
    return unet, models.build_scheduler(models.model_config("scheduler")), lat, states


def toy_featurization():
    """A dataset of 11 random 8 x 8 images (with flips) and a random conv embedder."""
    import numpy as np

    from abu_explorer import data

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
    ds = data.Dataset(images, [f"c{i}" for i in range(11)], [str(i) for i in range(11)],
                      data.DataConfig(source="toy", image_size=8, flip=True), "toy")
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 4, 3)

    @torch.no_grad()
    def embed(x):
        return torch.nn.functional.normalize(conv(x).flatten(1), dim=1)

    return embed, ds


def compute():
    from abu_explorer.attribution.nearest import featurize

    unet, sched, lat, states = toy()
    embed, ds = toy_featurization()
    torch.set_num_threads(1)  # after importing conftest (which sets 2): bit-identity needs equal thread counts
    return {
        "losses": loss_table(unet, sched, lat, states, [50, 450, 850], batch_size=8),
        "fisher": diagonal_fisher(unet, sched, lat, states, passes=2, batch_size=4),
        "features": torch.from_numpy(featurize(embed, ds, block=3)),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.init_from_env()
    out = compute()
    if distributed.rank_world()[0] == 0:
        from safetensors.torch import save_file

        save_file(out, sys.argv[1])
    torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
    torch.distributed.destroy_process_group()
