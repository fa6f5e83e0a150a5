"""The machine a figure was measured on, recorded beside every benchmark and retrain result.

The vendor and the vector ISA are named because AVX-512 and AVX2 kernels round differently and run at
different speeds, and the math libraries pick other kernels on AMD than on Intel CPUs of the same ISA: a
K = 0 retrain reproduces the shipped weights bit for bit only on the kind of CPU that made them.

Evaluations pin the vector ISA to AVX2 (``pin_isa``: ATen, MKL's reproducible AVX2 branch and oneDNN capped
before torch loads), so that an AVX-512 machine can add cells to an AVX2 table. Whether it then rounds like an
AVX2 machine is measured, not assumed: ``evaluation.isa_pin`` compares a short training-and-sampling
fingerprint with the one recorded on AVX2 hardware, and only a match files the machine under the AVX2 kind.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path

# ATen's dispatch, MKL's conditional-numerical-reproducibility branch and instruction cap, oneDNN's cap
PIN_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
           "DNNL_MAX_CPU_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_isa() -> bool:
    """Cap every math library at AVX2 for this process and its children. Only before torch is imported (the
    libraries read these once); returns whether the pin is in force."""
    if "avx2" not in cpu_flags():
        return False  # nothing to pin to: such a machine is its own kind
    if "torch" in sys.modules and not isa_pinned():
        raise RuntimeError("pin_isa() must run before torch is imported")
    os.environ.update(PIN_ENV)
    return True


def isa_pinned() -> bool:
    return all(os.environ.get(k) == v for k, v in PIN_ENV.items())


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str], str]:
    model, flags, vendor = platform.processor() or platform.machine(), set(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("vendor_id") and not vendor:
                vendor = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, frozenset(flags), vendor


def cpu_name() -> str:
    return _cpuinfo()[0] or "unknown"


def cpu_vendor() -> str:
    """"intel", "amd", another vendor id in lower case, or the architecture where none is listed."""
    vendor = _cpuinfo()[2]
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, vendor.lower() or platform.machine())


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo), read once."""
    return _cpuinfo()[1]


def vector_isa() -> str:
    flags = _cpuinfo()[1]
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()


def kind(device: str = "cpu") -> str:
    """The machine kind, as far as float rounding goes: architecture, vendor, vector ISA and torch build on a
    CPU ("x86_64-amd-avx512-torch2.14.1+cu130"); the GPU's name and torch build on CUDA. Results of one
    kind form one table; a K = 0 retrain reproduces the shipped weights only on the kind that made them.

    Pinned to AVX2 (``pin_isa``) on AVX-512 hardware: the AVX2 kind where the fingerprint matches AVX2
    hardware's, else a kind of its own ("...-avx512-as-avx2-...")."""
    import torch

    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device)).lower().replace(" ", "-")
        return f"cuda-{name}-torch{torch.__version__}"
    isa = vector_isa().lower().replace("-", "")
    if isa_pinned() and isa != "avx2" and "avx2" in cpu_flags():
        from abu_explorer.evaluation import isa_pin

        isa = "avx2" if isa_pin.verified() else f"{isa}-as-avx2"
    return f"{platform.machine()}-{cpu_vendor()}-{isa}-torch{torch.__version__}"


def machine(threads: int | None = None, device: str = "cpu") -> dict:
    """Where this process computes: device with ISA and threads (or the GPU), machine kind, CPU model, library
    versions. ``threads``: the thread count of the child process that did the work, where not this process's."""
    import diffusers
    import torch

    threads = threads or torch.get_num_threads()
    pin = ", pinned to AVX2" if isa_pinned() and vector_isa() != "AVX2" else ""
    where = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else \
        f"cpu ({vector_isa()}{pin}, {threads} threads)"
    return {"device": where, "kind": kind(device), "cpu_model": cpu_name(), "torch": torch.__version__,
            "diffusers": diffusers.__version__}


def use_device(device: str):
    """Check ``device`` exists and, on CUDA, set full fp32 and repeatable kernels (no TF32, deterministic
    cuDNN): a retrain on one GPU kind then differs from a CPU run only in the order of its arithmetic."""
    import torch

    if not str(device).startswith("cuda"):
        if str(device) != "cpu":
            raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device on this machine")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.device(device)
