"""The customized-model benchmark's concepts: OpenMoji extras picked by a rule fixed before any attribution.

Rule (``select``; every number is here):

1. Candidates: every private-use OpenMoji glyph (``data.extras``), in code order. None is a training row
   (the dataset builder drops unnamed glyphs; ``check_unseen`` verifies it by pixels too).
2. A glyph is a near-duplicate when the cosine of its ink (255 - pixels, 32 x 32) with a training glyph's is
   >= ``NEAR_DUPLICATE``; near-duplicates are never used.
3. **Families** (3-4 exemplars sharing a style): runs of >= 3 neighbours in code order whose consecutive ink
   cosines are >= ``FAMILY_LINK`` (the pride flags, the gendered renderings of one glyph, ...), every member
   kept; a run is cut into families of 4 from its start, a remainder of 3 is a family, of 1-2 dropped.
4. **Singles** (1 exemplar, an object): the other candidates in code order, every ``stride``-th so that
   ``NUM_SINGLES`` spread over the whole range; one within ``NEAR_DUPLICATE`` of a concept already chosen is
   skipped for the next.
5. Concepts are numbered in order of their first code; concept i is in the **tuning** split when i % 4 == 0,
   else in the **test** split.
6. The category word of each concept (V*'s initial embedding and the word after V* in its captions) is named
   by hand from the model's vocabulary, by looking at the exemplars before any attribution
   (``evaluation/customized_concepts.json``, ``"word"``).
"""
from __future__ import annotations

import numpy as np

from abu_explorer.data import extras

NEAR_DUPLICATE = 0.9
FAMILY_LINK = 0.8
NUM_SINGLES = 16
FAMILY_SIZE = 4
TUNE_EVERY = 4


def select(train_images: np.ndarray) -> list[dict]:
    """The concepts: [{"id", "kind", "codes", "split"}], by the rule above."""
    codes = [c for c, _ in extras.list_extras()]
    ink = extras.ink(extras.render_extras(codes))
    near_train = (ink @ extras.ink(train_images).T).max(axis=1) >= NEAR_DUPLICATE
    link = (ink[1:] * ink[:-1]).sum(axis=1) >= FAMILY_LINK
    # 3. families: runs of linked neighbours, none a near-duplicate
    families, run = [], [0]
    for i in range(1, len(codes) + 1):
        if i < len(codes) and link[i - 1]:
            run.append(i)
            continue
        if len(run) >= 3 and not near_train[run].any():
            for s in range(0, len(run), FAMILY_SIZE):
                part = run[s:s + FAMILY_SIZE]
                if len(part) >= 3:
                    families.append(part)
        run = [i]
    in_run = {i for f in families for i in f}
    # 4. singles, spread over the code range
    pool = [i for i in range(len(codes)) if i not in in_run and not near_train[i]]
    stride = max(1, len(pool) // NUM_SINGLES)
    chosen = [f for f in families]
    singles = []
    for k, i in enumerate(pool):
        if len(singles) == NUM_SINGLES:
            break
        if k < len(singles) * stride:  # single s is the first usable glyph from pool[s * stride] on
            continue
        if max((float(ink[i] @ ink[j]) for c in chosen for j in c), default=0.0) >= NEAR_DUPLICATE:
            continue
        singles.append(i)
        chosen.append([i])
    concepts = sorted(families + [[i] for i in singles], key=lambda c: c[0])
    return [{"id": f"c{n:02d}", "kind": "family" if len(c) > 1 else "single", "codes": [codes[i] for i in c],
             "split": "tune" if n % TUNE_EVERY == 0 else "test"} for n, c in enumerate(concepts)]


def check_unseen(concepts: list[dict], train_images: np.ndarray) -> None:
    """Raise if an exemplar equals a training image pixel for pixel."""
    train = {bytes(np.ascontiguousarray(x)) for x in np.asarray(train_images)}
    for c in concepts:
        for code, img in zip(c["codes"], extras.render_extras(c["codes"])):
            if bytes(np.ascontiguousarray(img)) in train:
                raise ValueError(f"exemplar {code} of {c['id']} is a training image")
