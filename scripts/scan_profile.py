"""Where the AbU loss scan spends its time: a torch profile of ROWS training rows x 10 timesteps.

    PYTHONPATH=. python scripts/scan_profile.py [--rows 200] [--threads 1]

Prints the operators by self CPU time and the share of the compute kernels (convolutions, matrix products,
attention).
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from abu_explorer.attribution.ddpm_loss import eval_timesteps, loss_table
from abu_explorer.model import Explorer

KERNELS = ("convolution", "addmm", "aten::mm", "aten::bmm", "scaled_dot_product")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precomputed", default="precomputed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exp = Explorer.load(args.precomputed)
    cache, ts, rows = exp.training_cache(), eval_timesteps(10), torch.arange(args.rows)
    loss_table(exp.unet, exp.scheduler, cache.latents, cache.text_states, ts, rows=rows[:26])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_table(exp.unet, exp.scheduler, cache.latents, cache.text_states, ts, rows=rows)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kernels = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in KERNELS))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"compute kernels (convolution, matrix products, attention): {100 * kernels / total:.0f}% of self CPU time")


if __name__ == "__main__":
    main()
