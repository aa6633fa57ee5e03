"""Does G draw its photo? The sketch_generator + pseudo_pairs stages per G configuration.

For each configuration (``NAME:KEY=VALUE,KEY=VALUE`` over the ``sketch_generator`` params) this runs
the real stages in-process into ``--work``/NAME, on the repository's dataset and teachers (the
``teacher_pretrain`` outputs of ``--teachers-from``, linked in), and collects what item 3 of issue 13
asks for: G's test loss with its own photo against a swapped photo (``photo_loss_gain``, nats per
row; 0 = G ignores the photo), the attention entropy (share of log(H*W)), and the sketch teacher's
class accuracy on the pseudo sketches (``pseudo_pairs.teacher_check``; chance = 1 / classes). With
``--full`` (a fully supervised F checkpoint of an fgsbir_joint run on the same dataset) also G's test
sketches' own-photo mean rank and Acc@10 under that F, per ``--decodings`` (``generator_probe.py``).

    python benchmarks/generator_encoders.py \\
        "scratch_s8:encoder_init=scratch,feature_stride=8" \\
        "teacher_s4:encoder_init=photo_teacher,feature_stride=4,freeze_encoder=true"

Writes ``benchmarks/results/generator_encoders.json`` (one entry per configuration and seed; a rerun
replaces that entry) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_PARAMS = REPO / "pipelines" / "embedded-full" / "params.yaml"  # the science budgets (the default cuts them)
sys.path.insert(0, str(REPO / "src"))

KEYS = ("photo_loss_gain", "photo_loss_own", "photo_loss_shuffled", "attention_entropy", "eval_total",
        "eval_gmm_nll", "train_gmm_nll")  # train vs eval NLL: how much G overfits its labelled pairs
PSEUDO_KEYS = ("sketch_teacher_acc_pseudo", "sketch_teacher_acc_real_train", "chance_class_acc", "mean_points",
               "share_forced_end")


def parse_config(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name, [f"sketch_generator.{kv}" for kv in rest.split(",") if kv]


def run_config(name: str, sets: list[str], args) -> dict:
    from sbir.stage import run_stage

    out = Path(args.work).resolve() / f"{name}_seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    teachers = out / "teacher_pretrain"
    if not teachers.exists():
        teachers.symlink_to(Path(args.teachers_from).resolve() / "teacher_pretrain")
    base = [f"seed={args.seed}", f"outputs_dir={out}", "ray.num_workers=0", "pseudo_pairs.teacher_check=true",
            *args.overrides]
    argv = ["--params", args.params, "--no-mlflow", "--restart"] + [x for s in base + sets for x in ("--set", s)]
    t0 = time.time()
    g = run_stage("sketch_generator", argv)
    g_seconds = time.time() - t0
    pp = run_stage("pseudo_pairs", argv)
    row = {"name": name, "seed": args.seed, "sets": sets, "overrides": args.overrides,
           "generator_seconds": round(g_seconds, 1),
           **{k: g.get(k) for k in KEYS}, **{k: pp.get(k) for k in PSEUDO_KEYS}}
    if args.full:
        row["under_full_f"] = probe_under_full(out, args)
    return row


def probe_under_full(out: Path, args) -> dict[str, dict]:
    """G's test sketches ranked by the fully supervised F of ``args.full``, per decoding."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from generator_probe import DECODINGS, probe

    from sbir.config import load_params
    from sbir.data.datasets import load_image_set
    from sbir.data.format import open_dataset
    from sbir.models.checkpoints import load_retrieval_checkpoint

    params = load_params(args.params, dict(s.split("=", 1) for s in args.overrides if s.startswith("dataset_dir=")))
    ds = open_dataset(REPO / params.dataset_dir)  # an absolute dataset_dir stays absolute
    photos = load_image_set(ds, "photos", ["test"])
    size = int(load_image_set(ds, "sketches", ["test"]).images.shape[-1])
    full = load_retrieval_checkpoint(args.full)
    return {dec: probe(str(out / "sketch_generator/generator.pt"), DECODINGS[dec], photos, photos.labels, full,
                       str(out / "teacher_pretrain/teachers.pt"), params.pseudo_pairs.line_width, size)
            for dec in args.decodings}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="NAME:KEY=VALUE,... over the sketch_generator params")
    ap.add_argument("--params", default=str(FULL_PARAMS))
    ap.add_argument("--teachers-from", default=str(REPO / "outputs"), help="an outputs dir with teacher_pretrain/")
    ap.add_argument("--work", default=str(REPO / "benchmarks/results/generator_encoders"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra overrides for every configuration (e.g. dataset_dir=...)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/generator_encoders.json"))
    ap.add_argument("--full", default=None, help="a fully supervised F checkpoint (fgsbir_joint/checkpoints/full.pt) "
                                                 "on the same dataset: rank G's test sketches under it")
    ap.add_argument("--decodings", nargs="+", default=["t0.4", "greedy"], help="generator_probe.py's decodings (give the configurations before this option)")
    args = ap.parse_args(argv)
    os.environ.setdefault("SBIR_RAY_RESULTS", str(Path(args.work).resolve() / "ray_results"))

    rows = [run_config(*parse_config(c), args) for c in args.configs]
    out = Path(args.out)
    old = json.loads(out.read_text())["runs"] if out.exists() else []
    done = {(r["name"], r["seed"]) for r in rows}
    runs = [r for r in old if (r["name"], r["seed"]) not in done] + rows
    out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    cols = ("photo_loss_gain", "attention_entropy", "eval_total", "sketch_teacher_acc_pseudo", "chance_class_acc")
    print("| G | seed | " + " | ".join(cols) + " | seconds |\n" + "|---" * (len(cols) + 3) + "|")
    for r in runs:
        print(f"| {r['name']} | {r['seed']} | " + " | ".join(str(r.get(c)) for c in cols) + f" | {r['generator_seconds']} |")
    return rows


if __name__ == "__main__":
    main()
