"""The real-data pipelines' results in one file: what each `dvc repro pipelines/<name>/dvc.yaml` wrote.

Reads, for every pipeline whose outputs exist, the files its stages wrote under ``outputs/<name>/``
(teacher accuracies, the category table of ``evaluate``, the fine-grained table of ``fg_evaluate``,
every stage's ``stage_seconds``) and the backbone and sizes from its params, and writes
``benchmarks/results/real_data.json`` plus the markdown tables that docs/real-data.md and the README show.
It runs nothing: run the pipelines first (``make repro PIPELINE=pipelines/<name>/dvc.yaml``). A pipeline
with no outputs here keeps its record from the existing file (said on the console and in the record's
``collected`` field: when its outputs were read), so rerunning one pipeline does not need the others' outputs on the same machine.

    python benchmarks/real_data.py
"""
from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("sketchy-mini", "quickdraw-sketchy", "sketchy-mini-fg", "qmul-shoe-v1")
CATEGORY_METHODS = ("chance", "classifier_only_t0.5", "classifier_only", "classifier_only_t2", "classifier_only_t4",
                    "classifier_only_logits", "classifier_only_best", "crossx_dfl", "upper_bound")
FG_MODELS = ("chance", "supervised", "semi", "full")
STAGE_ORDER = ("ingest", "ingest_sketchy", "ingest_quickdraw", "compose", "teacher_pretrain", "reconstruct",
               "distill", "upper_bound", "evaluate", "sketch_generator", "pseudo_pairs", "fgsbir_joint", "fg_evaluate")


def machine() -> dict:
    """Cores and CPU model of this machine (the one a pipeline's outputs are read on: where it ran)."""
    from run_all import cpu_model_name  # benchmarks/ is on sys.path when a script here runs

    return {"cpus": os.cpu_count(), "processor": cpu_model_name() or platform.machine()}


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(name: str) -> dict | None:
    out = REPO / "outputs" / name
    if not out.is_dir():
        return None
    dvc = yaml.safe_load((REPO / "pipelines" / name / "dvc.yaml").read_text())
    params = params_as_run(name, set(dvc["stages"]))
    record: dict = {"setting": setting(params, dvc)}
    teachers = read(out / "teacher_pretrain" / "metrics.json")
    if teachers:
        record["teachers"] = {k: teachers[k] for k in ("photo_teacher_test_acc", "sketch_teacher_test_acc",
                                                       "chance_acc", "epochs")}
    bank = read(out / "reconstruct" / "metrics.json")
    if bank:  # how far the data-free samples are from the teachers' classes
        record["bank"] = {k: bank[k] for k in ("bank_photo_teacher_acc", "bank_sketch_teacher_acc", "bank_pair_agreement")}
    category = read(out / "evaluate" / "metrics.json")
    if category:
        record["category"] = {m: {k.split("/", 1)[1]: v for k, v in category.items() if k.startswith(m + "/")}
                              for m in CATEGORY_METHODS if f"{m}/mAP@all" in category}
        record["category"]["classifier_only_best"]["variant"] = category.get("classifier_only_best_variant")
    fg = read(out / "fg_evaluate" / "metrics.json")
    if fg:
        record["fine_grained"] = {m: {k: fg[f"{m}/{k}"] for k in ("acc@1", "acc@5", "acc@10", "mean_rank")}
                                  for m in FG_MODELS}
        record["fine_grained"]["queries"] = fg["num_queries"]
        record["fine_grained"]["gallery"] = fg["gallery_size"]
    seconds = {}
    for stage in [s for s in STAGE_ORDER if s in dvc["stages"]]:
        sm = read(out / stage / "stage_metrics.json")
        if sm:
            seconds[stage] = sm["stage_seconds"]
    record["stage_seconds"] = seconds
    record["training_stage_seconds_total"] = round(sum(seconds.values()), 1)
    return record


def params_as_run(name: str, stages: set[str]) -> dict:
    """The params each of ``stages`` ran with, from the pipeline's dvc.lock (params.yaml may have moved on)."""
    lock = yaml.safe_load((REPO / "pipelines" / name / "dvc.lock").read_text())
    params: dict = {}
    for stage in (v for k, v in lock["stages"].items() if k in stages):
        for values in stage.get("params", {}).values():
            for key, value in values.items():
                node = params
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
    return params


def setting(params: dict, dvc: dict) -> dict:
    """Backbone and sizes (and every stage's params as run), from the lock's params and the ingest command."""
    cmd = " ".join(s["cmd"] for n, s in dvc["stages"].items() if n.startswith("ingest"))
    size = cmd.split("--photo-size ")[1].split()[0] if "--photo-size " in cmd else None
    student = params.get("distill", {}).get("student", {}).get("backbone", {})
    return {"stored_px": int(size) if size else None,
            "teacher_px": params.get("teacher_pretrain", {}).get("image_size"),
            "teacher_backbone": params.get("teacher_pretrain", {}).get("backbone"),
            "student_backbone": student, "fg_px": params.get("fgsbir_joint", {}).get("image_size"),
            "seed": params.get("seed"), "stage_params": {k: v for k, v in params.items() if k != "ray"}}


def tables(results: dict) -> str:
    lines = []
    for name, r in results.items():
        s = r["setting"]
        seen = (f"category nets at {s['teacher_px']} px" if s["teacher_px"] else f"F at {s['fg_px'] or s['stored_px']} px")
        lines.append(f"### {name} (seed {s['seed']}; {s['student_backbone'].get('name')}"
                     f"{' pretrained' if s['student_backbone'].get('pretrained') else ''}; stored {s['stored_px']} px, "
                     f"{seen})")
        if "teachers" in r:
            t = r["teachers"]
            lines.append(f"teachers: photo {t['photo_teacher_test_acc']:.3f}, sketch {t['sketch_teacher_test_acc']:.3f} "
                         f"test accuracy (chance {t['chance_acc']:.2f})")
        if "bank" in r:
            b = r["bank"]
            lines.append(f"data-free sample bank: the photo / sketch teacher classify {b['bank_photo_teacher_acc']:.3f} / "
                         f"{b['bank_sketch_teacher_acc']:.3f} of its samples as their intended class")
        if "category" in r:
            lines += ["", "| method | mAP@all | " + " | ".join(k for k in r["category"]["chance"] if k != "mAP@all")
                      + " |", "|---" * (1 + len(r["category"]["chance"])) + "|"]
            for m, v in r["category"].items():
                cells = [f"{v[k]:.4f}" for k in r["category"]["chance"]]
                lines.append(f"| {m}{' (' + v['variant'] + ')' if m == 'classifier_only_best' else ''} | "
                             + " | ".join(cells) + " |")
        if "fine_grained" in r:
            fg = r["fine_grained"]
            lines += ["", f"{fg['queries']} queries, gallery {fg['gallery']}:", "",
                      "| model | Acc@1 | Acc@5 | Acc@10 | mean rank |", "|---|---|---|---|---|"]
            for m in FG_MODELS:
                v = fg[m]
                lines.append(f"| {m} | {v['acc@1']:.4f} | {v['acc@5']:.4f} | {v['acc@10']:.4f} | {v['mean_rank']:.1f} |")
        lines += ["", "stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items())
                  + f" (total {r['training_stage_seconds_total']:.0f} s; {where(r)})", ""]
    return "\n".join(lines)


def where(record: dict) -> str:
    """On which machine and when a record's outputs were read (records from before this was kept say so)."""
    m = record.get("machine")
    on = f"{m['processor']}, {m['cpus']} cores" if m else "machine not recorded"
    return f"{on}; outputs read {record.get('collected', 'before 2026-12-02')}"


def summary_table(results: dict) -> str:
    """One line per pipeline and figure: the README's table."""
    lines = ["| pipeline | figure | result | chance | stage time |", "|---|---|---|---|---|"]
    for name, r in results.items():
        total = f"{r['training_stage_seconds_total'] / 60:.1f} min"
        if "teachers" in r:
            t = r["teachers"]
            lines.append(f"| {name} | teachers' test accuracy: photo / sketch | {t['photo_teacher_test_acc']:.3f} / "
                         f"{t['sketch_teacher_test_acc']:.3f} | {t['chance_acc']:.2f} | {total} |")
        if "category" in r:
            c = r["category"]
            lines.append(f"| {name} | mAP@all: classifier-only best / CrossX-DFL / upper bound | "
                         f"{c['classifier_only_best']['mAP@all']:.3f} / {c['crossx_dfl']['mAP@all']:.3f} / "
                         f"{c['upper_bound']['mAP@all']:.3f} | {c['chance']['mAP@all']:.3f} | |")
        if "fine_grained" in r:
            fg = r["fine_grained"]
            for k in ("acc@1", "acc@10"):
                lines.append(f"| {name} | {k.replace('acc', 'Acc')}: supervised / semi / full | "
                             + " / ".join(f"{fg[m][k]:.3f}" for m in ("supervised", "semi", "full"))
                             + f" | {fg['chance'][k]:.3f} | {total if k == 'acc@1' and 'teachers' not in r else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real_data.json"))
    args = ap.parse_args(argv)
    path = Path(args.out)
    earlier = (read(path) or {}).get("pipelines", {})
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results, fresh = {}, []
    for name in args.pipelines:
        if (record := collect(name)) is not None:
            results[name] = {**record, "collected": now, "machine": machine()}
            fresh.append(name)
        elif name in earlier:
            print(f"{name}: no outputs/{name} here; its record is kept from {path.name} as it was")
            results[name] = earlier[name]
    if not fresh:
        sys.exit("no real-data pipeline outputs under outputs/: run `make repro PIPELINE=pipelines/<name>/dvc.yaml`")
    text = tables(results)
    print(text)
    summary = summary_table(results)
    print(summary)
    doc = {"machine": machine(), "pipelines": results, "tables": text, "summary_table": summary}
    path.write_text(json.dumps(doc, indent=2))
    print(f"-> {path}")
    return doc


if __name__ == "__main__":
    main()
