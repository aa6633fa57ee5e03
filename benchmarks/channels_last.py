#!/usr/bin/env python
"""Memory layout and precision of the embedded pipeline's conv nets: milliseconds per training step.

    python benchmarks/channels_last.py [--repeats 30] [--out benchmarks/results/channels_last.json]

For the default's conv nets (the small_cnn teacher/student backbone with a linear head at batch 128, the
estimator pair at batch 64, the pair discriminator at batch 32; 32 px) it times a forward + backward +
Adam step in NCHW and NHWC (``channels_last``) weights, each in fp32 and under bf16 autocast, on the
machine's threads (torch's default), after a warm-up. ``sbir.models.backbones.channels_last`` is the
layout the models are built in; ``ray.precision`` picks the autocast. Prints a table, writes JSON with the
machine's description.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from run_all import cpu_model_name  # noqa: E402


def nets() -> dict:
    """name -> (module builder, step function of (module, generator))."""
    from sbir.fgsbir.joint import PairDiscriminator
    from sbir.models.backbones import SmallCNN
    from sbir.models.estimators import ConditionalEstimator

    def classifier():
        body = SmallCNN(32, 4)
        return torch.nn.Sequential(body, torch.nn.Linear(body.out_dim, 12))

    def classifier_step(m, g):
        x, y = torch.rand(128, 3, 32, 32, generator=g), torch.randint(0, 12, (128,), generator=g)
        return F.cross_entropy(m(x), y)

    def estimator_step(m, g):
        z, y = torch.randn(64, 64, generator=g), torch.randint(0, 12, (64,), generator=g)
        return m(z, y).square().mean()

    def discriminator_step(m, g):
        s, p = torch.rand(32, 1, 32, 32, generator=g), torch.rand(32, 3, 32, 32, generator=g)
        return F.softplus(-m(s, p)).mean()

    return {"small_cnn classifier (batch 128)": (classifier, classifier_step),
            "estimator (batch 64)": (lambda: ConditionalEstimator(64, 12, 3, 16, 32), estimator_step),
            "pair discriminator (batch 32)": (lambda: PairDiscriminator(32), discriminator_step)}


def time_steps(build, step, layout: str, precision: str, repeats: int) -> list[float]:
    torch.manual_seed(0)
    model = build().to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(repeats + 5):
        t0 = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            loss = step(model, gen)
        opt.zero_grad()
        loss.float().backward()
        opt.step()
        if i >= 5:  # warm-up steps excluded
            times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/channels_last.json")
    args = ap.parse_args()
    results: dict = {}
    print("| net | precision | NCHW ms/step | NHWC ms/step | speed-up |\n|---|---|---|---|---|")
    for name, (build, step) in nets().items():
        for precision in ("fp32", "bf16"):
            row = {layout: statistics.median(time_steps(build, step, layout, precision, args.repeats))
                   for layout in ("contiguous", "channels_last")}
            row = {k: round(v, 2) for k, v in row.items()}
            row["speedup"] = round(row["contiguous"] / row["channels_last"], 3)
            results.setdefault(name, {})[precision] = row
            print(f"| {name} | {precision} | {row['contiguous']} | {row['channels_last']} | {row['speedup']}x |")
    out = {"what": "median ms per training step (forward, backward, Adam) by weight layout and autocast "
                   "(benchmarks/channels_last.py)",
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "repeats": args.repeats,
           "machine": {"cpu": cpu_model_name(), "cpu_count": torch.get_num_threads(),
                       "platform": platform.platform(), "torch": torch.__version__,
                       "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text()},
           "results": results}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
