"""Command-line options shared by every command group (CLI, evaluations, benchmarks)."""
from __future__ import annotations

import argparse

OLD_MODEL_HINT = ("--model now names a diffusers model (precompute --model M --data D --out DIR); "
                  "a precomputed folder is --precomputed DIR")


def add_precomputed(parser: argparse.ArgumentParser, default: str) -> None:
    """``--precomputed DIR``: the folder of a model and its tables. The old spelling ``--model DIR`` is kept
    only to answer with a one-line hint (``main`` checks ``old_model``)."""
    parser.add_argument("--precomputed", default=default,
                        help="precomputed folder: the embedded model's, or one written by precompute --out")
    parser.add_argument("--model", dest="old_model", default=None, help=argparse.SUPPRESS)
