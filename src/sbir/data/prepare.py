"""prepare: write the embedded procedural dataset (no download) in the project's Parquet format."""
from __future__ import annotations

import json
import os
import time
from typing import Any

from sbir.data.format import DatasetWriter, PhotoRow, SketchRow, encode_png
from sbir.data.synthetic import SyntheticConfig, generate, preview_grid


def run_prepare(ctx) -> dict[str, Any]:
    p = ctx.params.prepare
    t0 = time.time()
    cfg = SyntheticConfig(seed=ctx.params.seed, **p.model_dump())
    ds = generate(cfg, workers=os.cpu_count() or 1)  # classes in parallel, same bytes
    gen_seconds = time.time() - t0
    out = ctx.path(ctx.params.dataset_dir)
    with DatasetWriter(out, ds.class_names, name="embedded-synthetic",
                       extra={"generator": "sbir.data.synthetic", "config": p.model_dump(mode="json"),
                              "seed": ctx.params.seed}) as writer:
        for ph in ds.photos:
            writer.add_photo(PhotoRow(id=ph.id, class_name=ph.class_name, label=ph.label, split=ph.split,
                                      labelled=ph.labelled, image=encode_png(ph.image), height=ph.image.shape[0],
                                      width=ph.image.shape[1], source="synthetic"))
        for sk in ds.sketches:
            writer.add_sketch(SketchRow(id=sk.id, photo_id=sk.photo_id, class_name=sk.class_name, label=sk.label,
                                        split=sk.split, strokes=sk.strokes, image=encode_png(sk.image),
                                        height=sk.image.shape[0], width=sk.image.shape[1], source="synthetic"))
    manifest = json.loads((out / "manifest.json").read_text())
    preview_grid(ds, ctx.tmp_out / "preview.png")
    metrics = {
        "classes": len(ds.class_names),
        "photos": len(ds.photos),
        "sketches": len(ds.sketches),
        "labelled_photos": manifest["labelled_photos"],
        "paired_sketches": manifest["paired_sketches"],
        "generate_seconds": round(gen_seconds, 1),
        "checksum": manifest["checksum"],
    }
    ctx.write_json("metrics.json", metrics)
    return metrics
