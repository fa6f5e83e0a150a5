"""Does an AVX-512 machine, pinned to AVX2, round like an AVX2 machine? A fingerprint decides.

An evaluation table holds cells of one machine kind. Pinning every math library to AVX2 (``machine.pin_isa``)
could let AVX-512 machines add cells to an AVX2 table, but only if the pinned libraries really take the same
code paths; so that is measured. The fingerprint hashes, on the embedded model and at the shapes an evaluation
uses:

1. one epoch of the UNet recipe from its seed (forward, backward, clipping, AdamW: what a retrain repeats);
2. a 50-step guided generation with the shipped UNet (what a query and a regeneration run);
3. the generated latent's stride-5 DDPM loss under the one-epoch UNet (what dL measures);

at one thread (the retrain children) and at the process's thread count. AVX2 hardware records it
(``python -m abu_explorer bench isa --write``) in ``evaluation/isa_fingerprints.json``; a pinned AVX-512
machine computes its own (once per CPU model, torch build and thread count; cached under ``cache/isa/``) and is
filed under the AVX2 kind only when every recorded thread count matches. The fingerprint is computed in a child
process with the same pin, so the caller's torch thread count and memory are left as they were.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from abu_explorer import artifacts

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "evaluation" / "isa_fingerprints.json"
CACHE = ROOT / "cache" / "isa"
PROMPT, SEED = "banana", 0


def compute(threads: int, precomputed: Path = ROOT / "precomputed") -> str:
    """The fingerprint (16 hex digits) of this process's arithmetic at ``threads`` torch threads."""
    import torch

    from abu_explorer.evaluation.counterfactual import query_loss
    from abu_explorer.model import components, load
    from abu_explorer.training import train

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        explorer = load(precomputed)
        h = hashlib.sha256()
        # 1. one epoch of the retrain recipe
        cache = explorer.training_cache()
        recipe = dataclasses.replace(train.UNET_RECIPE, epochs=1, snapshot_every_epochs=0)
        with components.seeded_global_rng(recipe.seed):
            unet = components.build_unet(dict(explorer.unet.config))
        train.train_unet(unet, explorer.scheduler, cache.latents, cache.text_states, cache.null_state, recipe,
                         progress=False)
        for _, v in sorted(unet.state_dict().items()):
            h.update(v.detach().contiguous().numpy().tobytes())
        # 2. a generation with the shipped UNet
        gen = explorer.generate(PROMPT, seed=SEED)
        h.update(gen.latent.contiguous().numpy().tobytes())
        # 3. its loss under the one-epoch UNet
        unet.eval()
        loss = query_loss(unet, explorer.scheduler, gen.latent, explorer.encode_text([PROMPT])[0:1])
        h.update(repr(loss).encode())
        return h.hexdigest()[:16]
    finally:
        torch.set_num_threads(before)


def compute_in_child(threads: int) -> str:
    """``compute`` in a child process that inherits this one's environment (the pin with it).

    ``compute`` sets torch's thread count for about a minute; called from a thread other than the main one, that
    also sets the count every thread started meanwhile begins with (an app's requests), so it never runs here."""
    code = f"from abu_explorer.evaluation.isa_pin import compute; print(compute({int(threads)}))"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": path},
                         capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the ISA fingerprint ({threads} thread(s)) failed in its child process: {last}")
    return out.stdout.split()[-1]


def avx2_kind() -> str:
    """The kind an AVX2 machine of this vendor and torch build is filed under."""
    import torch

    from abu_explorer.machine import cpu_vendor

    return f"{platform.machine()}-{cpu_vendor()}-avx2-torch{torch.__version__}"


def reference() -> dict:
    """{thread key ("t1", "t2", ...): fingerprint} recorded on AVX2 hardware of this vendor and torch build."""
    doc = artifacts.load_json(REFERENCE) if REFERENCE.exists() else {"kinds": {}}
    return doc["kinds"].get(avx2_kind(), {}).get("fingerprints", {})


def thread_counts() -> list[int]:
    import torch

    return sorted({1, torch.get_num_threads()})


def cached(threads: int) -> str:
    """This machine's fingerprint at ``threads``, computed once per CPU model, torch build and pin state."""
    import torch

    from abu_explorer.machine import cpu_name, isa_pinned

    tag = json.dumps([cpu_name(), torch.__version__, threads, isa_pinned()])
    path = CACHE / f"{hashlib.sha256(tag.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return artifacts.load_json(path)["fingerprint"]
    print(f"checking that this CPU, pinned to AVX2, rounds like AVX2 hardware ({threads} thread(s), ~1 min) ...",
          flush=True)
    value = compute_in_child(threads)
    artifacts.save_json(path, {"fingerprint": value, "cpu_model": cpu_name(), "torch": torch.__version__,
                               "threads": threads, "pinned": isa_pinned()})
    return value


@functools.lru_cache(maxsize=1)
def verified() -> bool:
    """Whether this pinned machine's fingerprints equal AVX2 hardware's at every thread count it uses."""
    from abu_explorer.machine import isa_pinned

    ref = reference()
    if not isa_pinned():
        return False
    return all(ref.get(f"t{t}") is not None and cached(t) == ref[f"t{t}"] for t in thread_counts())


def write(force: bool = False) -> dict:
    """On AVX2 hardware: record this machine's fingerprints as the reference of its kind. On other hardware,
    pinned: record this CPU model as one that matched the reference (what the slow test re-checks)."""
    from abu_explorer.machine import cpu_name, isa_pinned, vector_isa

    doc = artifacts.load_json(REFERENCE) if REFERENCE.exists() else {"kinds": {}}
    entry = doc["kinds"].get(avx2_kind(), {"fingerprints": {}, "cpu_models": []})
    if vector_isa() != "AVX2":
        if not isa_pinned():
            raise ValueError(f"this CPU has {vector_isa()} and is not pinned: run `bench isa --write` without "
                             "--native-isa")
        bad = [t for t in thread_counts() if entry["fingerprints"].get(f"t{t}") != cached(t)]
        if bad:
            raise ValueError(f"this {vector_isa()} CPU pinned to AVX2 does not match the AVX2 reference at "
                             f"{bad} thread(s): its evaluations are filed under a kind of their own")
        seen = {(m["cpu_model"], m["isa"]) for m in entry.get("pinned_matches", [])}
        if (cpu_name(), vector_isa()) not in seen:
            entry.setdefault("pinned_matches", []).append(
                {"cpu_model": cpu_name(), "isa": vector_isa(), "threads": thread_counts()})
    else:
        for t in thread_counts():
            value = cached(t)  # computed once: the report below reads the same value
            old = entry["fingerprints"].get(f"t{t}")
            if old is not None and old != value and not force:
                raise ValueError(f"this AVX2 machine's fingerprint at {t} thread(s) is {value}, the recorded one "
                                 f"{old}: AVX2 machines of this kind disagree (pass --force to replace it)")
            entry["fingerprints"][f"t{t}"] = value
        entry["cpu_models"] = sorted(set(entry["cpu_models"]) | {cpu_name()})
    doc["kinds"][avx2_kind()] = entry
    artifacts.save_json(REFERENCE, doc)
    return entry


def pinned_match_recorded() -> bool:
    """Whether this (non-AVX2) CPU model is recorded as matching the AVX2 reference when pinned."""
    from abu_explorer.machine import cpu_name, vector_isa

    doc = artifacts.load_json(REFERENCE) if REFERENCE.exists() else {"kinds": {}}
    matches = doc["kinds"].get(avx2_kind(), {}).get("pinned_matches", [])
    return any(m["cpu_model"] == cpu_name() and m["isa"] == vector_isa() for m in matches)


def report(args) -> None:
    """``bench isa``: this machine's ISA, pin and fingerprints against the AVX2 reference."""
    from abu_explorer.machine import cpu_name, isa_pinned, kind, vector_isa

    if args.write:
        write(args.force)
    ref = reference()
    print(f"CPU: {cpu_name()} ({vector_isa()}); pinned to AVX2: {isa_pinned()}")
    for t in thread_counts():
        mine, theirs = cached(t), ref.get(f"t{t}")
        verdict = "no reference" if theirs is None else "match" if mine == theirs else "DIFFERENT"
        print(f"  {t} thread(s): {mine}   AVX2 reference ({avx2_kind()}): {theirs or '-'}   {verdict}")
    print(f"evaluations on this machine are filed under: {kind()}")
