"""What the BatchNorm prior costs in a reconstruct step, with autograd's mean/var and with ChannelMoments.

The prior (DeepInversion's: each teacher BN layer's batch mean and variance against its running
statistics) hooks every BN layer of both teachers. This times, on the default pipeline's teachers:

* ``layers``: forward + backward of the two statistics on each BN input shape of a reconstruct step
  (bf16, channels-last, as under ``ray.precision: auto`` here): ``Tensor.mean``/``Tensor.var`` in fp32
  (the earlier hook) against :class:`sbir.dfsbir.losses.ChannelMoments`;
* ``steps``: a whole reconstruct step (estimators, both teachers, every term, backward, Adam) at each
  ``--batches`` size with the prior computed either way and without it (weight 0).

Median of ``--repeats`` timings after ``--warmup`` untimed ones. Writes benchmarks/results/bn_prior.json.

    python benchmarks/bn_prior.py [--teachers outputs/teacher_pretrain/teachers.pt] [--batches 64 24]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def autograd_moments(x):
    """The earlier hook's statistics: fp32 copy, ``mean`` and biased ``var`` through autograd."""
    x = x.float()
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)


def median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 3)


def bn_input_shapes(teachers, batch: int, size: int) -> list[tuple[int, ...]]:
    import torch

    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
             for t in (teachers.photo_teacher, teachers.sketch_teacher) for m in t.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        teachers.photo_teacher(torch.rand(batch, 3, size, size))
        teachers.sketch_teacher(torch.rand(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def time_layers(shapes, repeats: int, warmup: int) -> list[dict]:
    import torch

    from sbir.dfsbir.losses import ChannelMoments

    rows = []
    for shape in sorted(set(shapes)):
        x = torch.randn(*shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        mu, var = torch.randn(shape[1]), torch.rand(shape[1])

        def run(moments):
            def once():
                xx = x.detach().requires_grad_(True)
                m, v = moments(xx)
                (torch.norm(m - mu) + torch.norm(v - var)).backward()
            return once

        before, after = median_ms(run(autograd_moments), repeats, warmup), median_ms(run(ChannelMoments.apply), repeats, warmup)
        rows.append({"shape": list(shape), "layers": shapes.count(shape), "autograd_ms": before,
                     "channel_moments_ms": after, "speedup": round(before / after, 2)})
    return rows


def time_steps(teachers, p, num_classes: int, size: int, batch: int, repeats: int, warmup: int) -> dict:
    import torch

    from sbir.dfsbir.reconstruct import EstimatorObjective, build_estimators

    out = {}
    for name, weight, moments in (("autograd_var", 0.5, autograd_moments), ("channel_moments", 0.5, None),
                                  ("no_prior", 0.0, None)):
        q = p.model_copy(update={"batch_size": batch, "weights": p.weights.model_copy(update={"bn_prior": weight})})
        estimators = build_estimators(q, num_classes, size, teachers)
        opt = torch.optim.Adam(estimators.parameters(), lr=q.lr, betas=(0.5, 0.999))
        objective = EstimatorObjective(teachers, q)
        for prior in objective.bn_priors:  # the statistics the hooks compute, nothing else
            prior.moments = moments or prior.moments
        gen = torch.Generator().manual_seed(0)

        def step():
            z, y = estimators.sample_inputs(batch, gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x_p, x_s = estimators(z, y)
                total, _, _ = objective(x_p, x_s, y, z)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()

        try:
            out[name] = median_ms(step, repeats, warmup)
        finally:
            for prior in objective.bn_priors:
                prior.remove()
    out["prior_share_autograd_var"] = round(1 - out["no_prior"] / out["autograd_var"], 3)
    out["prior_share_channel_moments"] = round(1 - out["no_prior"] / out["channel_moments"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--teachers", type=Path, default=REPO / "outputs" / "teacher_pretrain" / "teachers.pt")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 24])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bn_prior.json")
    args = ap.parse_args()

    import torch

    from sbir.config import load_params
    from sbir.models.checkpoints import load_teachers

    if not args.teachers.is_file():
        sys.exit(f"{args.teachers}: not found (run `make repro` first)")
    torch.set_num_threads(args.threads)
    teachers, blob = load_teachers(str(args.teachers))
    size = int(blob["params"]["image_size"])
    p = load_params(args.params).reconstruct
    record = {"what": "BN prior cost in a reconstruct step (benchmarks/bn_prior.py)",
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "teachers": str(args.teachers), "threads": args.threads,
              "precision": "bf16 autocast, channels-last", "repeats": args.repeats,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor()},
              "layers": {}, "steps_ms": {}}
    for batch in args.batches:
        record["layers"][str(batch)] = time_layers(bn_input_shapes(teachers, batch, size), args.repeats, args.warmup)
        record["steps_ms"][str(batch)] = time_steps(teachers, p, blob["num_classes"], size, batch, args.repeats,
                                                    args.warmup)
        print(f"batch {batch}: step ms {record['steps_ms'][str(batch)]}")
        for row in record["layers"][str(batch)]:
            print(f"  {row}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
