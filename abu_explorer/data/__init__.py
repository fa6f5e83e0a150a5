"""Training data: the ``Dataset`` every artifact indexes, the embedded OpenMoji set, and image folders."""
from .dataset import (
    DataConfig,
    Dataset,
    cache_dir,
    content_hash,
    load_dataset_dir,
    model_image,
)
from .folder import load_image_folder
from .openmoji import build_openmoji, cache_path, emoji_name, list_glyphs, render_svg

__all__ = ["DataConfig", "Dataset", "build_openmoji", "cache_dir", "cache_path", "content_hash", "emoji_name",
           "list_glyphs", "load_dataset_dir", "load_image_folder", "model_image", "render_svg"]
