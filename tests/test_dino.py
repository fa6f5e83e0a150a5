"""DINO nearest neighbours with a tiny randomly initialised DINOv2 saved by the test: embeddings equal the
backbone's own, the ranking covers every row, and without a checkpoint it is not offered and says what it needs."""
import pytest
import torch
import torch.nn.functional as F

from abu_explorer.attribution import query as q
from abu_explorer.attribution import registry
from abu_explorer.attribution.nearest import IMAGENET, DinoNN


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    model = Dinov2Model(cfg).eval()
    folder = tmp_path_factory.mktemp("dino")
    model.save_pretrained(folder)  # safetensors, no image processor: ImageNet statistics, config size
    return folder, model


def test_dino_embeds_like_the_backbone_and_ranks_every_row(tiny_explorer, tiny_dino):
    folder, reference = tiny_dino
    method = DinoNN.load(tiny_explorer, model=str(folder))
    x = tiny_explorer.dataset.as_tensor()[:3]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    with torch.no_grad():  # 32 px model: the bicubic resize is the identity
        expected = F.normalize(reference(pixel_values=((x + 1) / 2 - mean) / std).pooler_output, dim=1)
    torch.testing.assert_close(method.embed(x), expected)
    query = q.from_generation(tiny_explorer, "red apple", seed=2, steps=3)
    ranking = method.score(query)
    assert ranking.method == "dino" and len(ranking.scores) == len(tiny_explorer.dataset)
    assert torch.isfinite(ranking.scores).all()
    assert method.settings()["config"]["model"] == str(folder) and method.settings()["config"]["weights"]
    # the faiss search equals brute-force cosine similarity of the decoded query against every row
    from abu_explorer.attribution.nearest import query_pixels

    brute = method.embed(tiny_explorer.dataset.as_tensor()) @ method.embed(query_pixels(tiny_explorer, query))[0]
    torch.testing.assert_close(ranking.scores, brute, rtol=1e-5, atol=1e-5)


def test_dino_is_offered_only_with_a_checkpoint(tiny_explorer, tmp_path):
    assert "dino" not in [m.name for m in registry.offered({})]
    assert "dino" in [m.name for m in registry.offered({"ABU_DINO_MODEL": "facebook/dinov2-small"})]
    assert registry.spec("dino").label == "DINO NN"  # the CLI reaches it with --dino-model
    with pytest.raises(ValueError, match="ABU_DINO_MODEL"):
        DinoNN.load(tiny_explorer, model="")
    with pytest.raises(ValueError, match="cannot load the DINO checkpoint"):
        DinoNN.load(tiny_explorer, model=str(tmp_path / "nowhere"))
