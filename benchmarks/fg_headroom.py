"""Headroom of the fine-grained bench: F's test Acc@1 against training steps, supervised-only vs full.

Semi-supervised FG-SBIR can gain at most what the fully supervised model (every train pair) has over
the supervised-only one (the labelled pairs): that gap is the bench's headroom. This trains both with
the fgsbir_joint loop's own F step (same negatives, same batch, ``lr`` for the first half of the steps
and ``joint_lr`` after, as the variants), in-process, and evaluates Acc@1/10 and the mean rank of the
test sketches every ``--eval-every`` steps. One run per ``--dataset`` (a prepared dataset folder, e.g.
written by ``python -m sbir run prepare --set dataset_dir=... --set prepare.clutter=0``).

    python benchmarks/fg_headroom.py --dataset data/prepared --steps 1600 --eval-every 200
    python benchmarks/fg_headroom.py --dataset /tmp/c0 --name clutter0 --set labelled_share... (see --help)

Writes (appends a run to, replacing one of the same name and seed) ``benchmarks/results/fg_headroom.json``
with a ``summary`` per dataset name over its seeds (mean ± std of both models' Acc@1 and their gap at
every evaluated step), and redraws ``fg_headroom.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_PARAMS = REPO / "pipelines" / "embedded-full" / "params.yaml"  # the science budgets (the default cuts them)
sys.path.insert(0, str(REPO / "src"))


def train_curve(kind: str, data, model, arch: dict, p, steps: int, every: int, test, seed: int) -> list[dict]:
    """Acc@1/10 and mean rank of F (``kind`` supervised or full) every ``every`` steps."""
    import torch

    from sbir.fgsbir.evaluate import fine_grained_metrics
    from sbir.fgsbir.joint import VariantRun, VariantSpec
    from sbir.models.backbones import embed

    sketches, photos, q_rows, true_idx = test
    torch.manual_seed(seed)
    run = VariantRun(VariantSpec(kind, kind, None, steps), p, copy.deepcopy(model), data, {}, torch.device("cpu"),
                     int(arch["image_size"]))
    gen = torch.Generator().manual_seed(seed)
    curve, t0 = [], time.time()
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            run.model.eval()
            q = embed(run.model.sketch_encoder, sketches.images[q_rows], size=arch["image_size"])
            g = embed(run.model.photo_encoder, photos.images, size=arch["image_size"])
            m, _ = fine_grained_metrics(q, g, true_idx, (1, 10))
            run.model.train()
            curve.append({"step": step, "acc@1": round(m["acc@1"], 4), "acc@10": round(m["acc@10"], 4),
                          "mean_rank": round(m["mean_rank"], 1), "seconds": round(time.time() - t0, 1)})
            print(kind, curve[-1], flush=True)
        if step == steps:
            break
        if step == steps // 2:  # the variants' second phase runs at joint_lr
            for group in run.opt.param_groups:
                group["lr"] = p.joint_lr
        run.step = step
        run.f_step(gen, p.batch_size, p.pseudo_batch_size)
    return curve


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(runs):
        for kind, style in (("full", "-"), ("supervised", "--")):
            c = run["curves"].get(kind)
            if c:
                ax.plot([r["step"] for r in c], [r["acc@1"] for r in c], style, color=f"C{i}",
                        label=f"{run['name']} seed {run['seed']} {kind}")
    ax.set_xlabel("F steps")
    ax.set_ylabel("test Acc@1")
    ax.set_title("FG bench headroom: full vs supervised-only")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per dataset name, at every step all its seeds evaluated: mean, std (sample) and the per-seed values
    of supervised-only's and full's Acc@1 and of their gap, with the seeds listed."""
    import statistics

    def stats(values: list[float]) -> dict:
        return {"mean": round(statistics.mean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "values": values}

    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        group = sorted((r for r in runs if r["name"] == name), key=lambda r: r["seed"])
        by_step = [{kind: {c["step"]: c["acc@1"] for c in r["curves"][kind]} for kind in ("supervised", "full")}
                   for r in group]
        steps = sorted(set.intersection(*(set(b["full"]) & set(b["supervised"]) for b in by_step)))
        out[name] = {"seeds": [r["seed"] for r in group], "acc@1": {
            str(step): {"supervised": stats([b["supervised"][step] for b in by_step]),
                        "full": stats([b["full"][step] for b in by_step]),
                        "full_minus_supervised": stats([round(b["full"][step] - b["supervised"][step], 4)
                                                        for b in by_step])} for step in steps}}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(REPO / "data/prepared"), help="a prepared dataset folder")
    ap.add_argument("--name", default=None, help="the run's name in the JSON (default: the dataset folder's)")
    ap.add_argument("--params", default=str(FULL_PARAMS))
    ap.add_argument("--students", default=str(REPO / "outputs/distill/students.pt"),
                    help="F's init (fgsbir_joint.init data_free); --init scratch ignores it")
    ap.add_argument("--init", choices=["data_free", "scratch"], default="data_free")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/fg_headroom.json"))
    args = ap.parse_args(argv)

    import torch

    from sbir.config import load_params
    from sbir.data.datasets import split_pairs
    from sbir.data.format import open_dataset
    from sbir.fgsbir.joint import JointData, initial_model

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    p = params.fgsbir_joint
    data = JointData(args.dataset)
    test = split_pairs(open_dataset(args.dataset), "test")
    model, arch = initial_model(args.init, data.photos.images, data.sketches.images, students_path=args.students,
                                student=params.distill.student)
    run = {"name": args.name or Path(args.dataset).name, "dataset": str(args.dataset), "init": args.init,
           "seed": args.seed, "steps": args.steps, "labelled_pairs": len(data.lab_s), "all_pairs": len(data.all_s),
           "gallery": len(test[1]), "dataset_config": open_dataset(args.dataset).manifest.get("config"),
           "curves": {kind: train_curve(kind, data, model, arch, p, args.steps, args.eval_every, test, args.seed)
                      for kind in ("supervised", "full")}}
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = [r for r in runs if (r["name"], r["seed"]) != (run["name"], run["seed"])] + [run]
    out.write_text(json.dumps({"summary": summarise(runs), "runs": runs}, indent=1) + "\n")
    plot(runs, out.with_suffix(".png"))
    last = {k: c[-1] for k, c in run["curves"].items()}
    print(f"{run['name']}: full {last['full']['acc@1']:.4f} vs supervised {last['supervised']['acc@1']:.4f} "
          f"Acc@1 after {args.steps} steps -> {out}")
    return run


if __name__ == "__main__":
    main()
