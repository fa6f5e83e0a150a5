"""Evaluations pin the math libraries to AVX2; an AVX-512 machine joins the AVX2 kind only on a matching fingerprint."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abu_explorer import machine
from abu_explorer.cli import pins_isa
from abu_explorer.evaluation import isa_pin

ROOT = Path(__file__).resolve().parents[1]


def test_which_commands_pin():
    assert pins_isa(["evaluate", "counterfactual", "--queries", "q.json"])
    assert pins_isa(["bench", "isa"])
    assert not pins_isa(["evaluate", "lds", "--native-isa"])
    assert not pins_isa(["attribute", "--prompt", "banana"]) and not pins_isa(["bench", "scale"]) and not pins_isa([])


def test_pin_caps_torch_in_a_fresh_process():
    code = ("from abu_explorer import machine; assert machine.pin_isa(); import torch; "
            "print(torch.backends.cpu.get_cpu_capability(), machine.isa_pinned())")
    env = {k: v for k, v in os.environ.items() if k not in machine.PIN_ENV}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["AVX2", "True"]  # on AVX-512 hardware too: ATen dispatches its AVX2 kernels


def test_pin_after_torch_loaded_refuses(monkeypatch):
    import torch  # noqa: F401

    for k in machine.PIN_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="before torch"):
        machine.pin_isa()


@pytest.fixture
def avx512(monkeypatch):
    model, flags, vendor = machine._cpuinfo()
    monkeypatch.setattr(machine, "_cpuinfo", lambda: (model, flags | {"avx2", "avx512f"}, "AuthenticAMD"))
    isa_pin.verified.cache_clear()
    yield
    getattr(isa_pin.verified, "cache_clear", lambda: None)()  # (a test may have replaced it)


def test_kind_of_a_pinned_avx512_machine(avx512, monkeypatch):
    assert "-amd-avx512-torch" in machine.kind()  # not pinned: its own kind
    for k, v in machine.PIN_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(isa_pin, "verified", lambda: True)
    assert "-amd-avx2-torch" in machine.kind() and "pinned to AVX2" in machine.machine(1)["device"]
    monkeypatch.setattr(isa_pin, "verified", lambda: False)
    assert "-amd-avx512-as-avx2-torch" in machine.kind()


def test_verified_needs_every_thread_count_to_match(avx512, monkeypatch):
    for k, v in machine.PIN_ENV.items():
        monkeypatch.setenv(k, v)
    mine = {1: "aaaa", 2: "bbbb"}
    monkeypatch.setattr(isa_pin, "thread_counts", lambda: [1, 2])
    monkeypatch.setattr(isa_pin, "cached", lambda t: mine[t])
    for ref, expected in [({"t1": "aaaa", "t2": "bbbb"}, True), ({"t1": "aaaa", "t2": "cccc"}, False),
                          ({"t1": "aaaa"}, False), ({}, False)]:
        monkeypatch.setattr(isa_pin, "reference", lambda ref=ref: ref)
        isa_pin.verified.cache_clear()
        assert isa_pin.verified() is expected, ref
    monkeypatch.delenv("MKL_CBWR")
    monkeypatch.setattr(isa_pin, "reference", lambda: {"t1": "aaaa", "t2": "bbbb"})
    isa_pin.verified.cache_clear()
    assert isa_pin.verified() is False  # not pinned: never the AVX2 kind


def test_write_on_a_pinned_avx512_machine_records_a_match_only(avx512, monkeypatch, tmp_path):
    ref = tmp_path / "isa_fingerprints.json"
    kind = isa_pin.avx2_kind()
    ref.write_text(json.dumps({"kinds": {kind: {"cpu_models": ["x"], "fingerprints": {"t1": "aaaa"}}}}))
    monkeypatch.setattr(isa_pin, "REFERENCE", ref)
    monkeypatch.setattr(isa_pin, "thread_counts", lambda: [1])
    with pytest.raises(ValueError, match="not pinned"):
        isa_pin.write()
    for k, v in machine.PIN_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(isa_pin, "cached", lambda t: "bbbb")
    with pytest.raises(ValueError, match="does not match"):
        isa_pin.write()
    assert not isa_pin.pinned_match_recorded()
    monkeypatch.setattr(isa_pin, "cached", lambda t: "aaaa")
    isa_pin.write()
    isa_pin.write()  # recorded once
    entry = json.loads(ref.read_text())["kinds"][kind]
    assert entry["fingerprints"] == {"t1": "aaaa"} and len(entry["pinned_matches"]) == 1  # the reference untouched
    assert isa_pin.pinned_match_recorded()


@pytest.mark.slow
def test_this_machine_pinned_matches_the_avx2_reference(monkeypatch, tmp_path):
    """AVX2 hardware reproduces the recorded reference; a CPU model recorded as matching when pinned still does.
    The fingerprint runs in a child process with the caller's pin, and leaves the caller's thread counts alone."""
    import concurrent.futures

    import torch

    if "t1" not in isa_pin.reference():
        pytest.skip(f"no AVX2 reference for {isa_pin.avx2_kind()}")
    if machine.vector_isa() != "AVX2" and not isa_pin.pinned_match_recorded():
        pytest.skip(f"{machine.cpu_name()} ({machine.vector_isa()}) is not recorded as matching; run `bench isa`")
    for k, v in machine.PIN_ENV.items():  # torch here is not pinned; the child starts pinned from this environment
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(isa_pin, "CACHE", tmp_path)

    def fresh_thread_count() -> int:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(torch.get_num_threads).result()

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the fingerprint's 1: a count it changed would show
    seen = set()  # the counts of this thread and of threads started while the fingerprint runs
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # as an app's request thread would call it
            job = pool.submit(isa_pin.cached, 1)
            while not job.done():
                seen.add((torch.get_num_threads(), fresh_thread_count()))
                time.sleep(0.2)
            value = job.result()
        seen.add((torch.get_num_threads(), fresh_thread_count()))
    finally:
        torch.set_num_threads(before)
    assert value == isa_pin.reference()["t1"]
    assert seen == {(2, 2)}
    assert [json.loads(f.read_text())["fingerprint"] for f in tmp_path.glob("*.json")] == [value]
