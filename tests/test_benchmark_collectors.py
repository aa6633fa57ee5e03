"""The benchmark collectors' bookkeeping: what benchmarks/real_data.py keeps, what
benchmarks/teacher_recipes.py averages and how benchmarks/generic_features.py combines and picks
(no pipeline or stage runs here)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import generic_features  # noqa: E402  (benchmarks/ is not a package)
import real_data  # noqa: E402
import teacher_recipes  # noqa: E402


def fg_record(acc1: float) -> dict:
    models = {m: {"acc@1": acc1, "acc@5": 0.2, "acc@10": 0.3, "mean_rank": 10.0} for m in real_data.FG_MODELS}
    return {"setting": {"stored_px": 64, "teacher_px": None, "student_backbone": {"name": "small_cnn"},
                        "fg_px": 64, "seed": 0},
            "fine_grained": {**models, "queries": 10, "gallery": 10},
            "stage_seconds": {"fgsbir_joint": 12.0}, "training_stage_seconds_total": 12.0}


def test_real_data_keeps_records_of_pipelines_without_outputs(tmp_path, monkeypatch):
    out = tmp_path / "real_data.json"
    out.write_text(json.dumps({"pipelines": {"qmul-shoe-v1": {**fg_record(0.5), "collected": "2026-11-30 10:00 UTC"}}}))
    monkeypatch.setattr(real_data, "collect", lambda name: fg_record(0.25) if name == "sketchy-mini-fg" else None)
    doc = real_data.main(["--out", str(out)])
    kept, fresh = doc["pipelines"]["qmul-shoe-v1"], doc["pipelines"]["sketchy-mini-fg"]
    assert kept["collected"] == "2026-11-30 10:00 UTC" and kept["fine_grained"]["semi"]["acc@1"] == 0.5
    assert "machine" not in kept  # an earlier record does not take this machine's name
    assert fresh["collected"] != kept["collected"] and fresh["machine"]["cpus"] >= 1
    assert fresh["fine_grained"]["semi"]["acc@1"] == 0.25
    assert "machine not recorded; outputs read 2026-11-30 10:00 UTC" in doc["tables"]
    assert json.loads(out.read_text())["pipelines"].keys() == {"qmul-shoe-v1", "sketchy-mini-fg"}


def test_real_data_needs_at_least_one_fresh_record(tmp_path, monkeypatch):
    out = tmp_path / "real_data.json"
    out.write_text(json.dumps({"pipelines": {"qmul-shoe-v1": fg_record(0.5)}}))
    monkeypatch.setattr(real_data, "collect", lambda name: None)
    with pytest.raises(SystemExit, match="no real-data pipeline outputs"):
        real_data.main(["--out", str(out)])


def test_teacher_recipes_seed_summary():
    def run(seed: int, sketch: float) -> dict:
        return {"seed": seed, "final": {"photo_teacher_test_acc": 0.9, "sketch_teacher_test_acc": sketch}}

    summary = teacher_recipes.seed_summary({"a/seed0": run(0, 0.8), "a/seed1": run(1, 0.6), "b": run(0, 0.5)})
    assert summary["a"]["seeds"] == [0, 1]
    assert summary["a"]["sketch_teacher_test_acc"] == {"per_seed": [0.8, 0.6], "mean": 0.7, "std": 0.1}
    assert summary["b"]["photo_teacher_test_acc"]["std"] == 0.0


def test_teacher_recipes_spell_out_the_settings_they_compare():
    """Every recipe but 'default' fixes lr, backbone lr scale, batch and epochs, so its name keeps its
    meaning when the pipeline's params change (the last --set of a key wins)."""
    for name, sets in teacher_recipes.RECIPES.items():
        if name == "default":
            continue
        keys = {s.split("=")[0] for s in sets}
        assert {f"teacher_pretrain.{k}" for k in ("lr", "backbone_lr_scale", "batch_size", "epochs")} <= keys, name


def test_generic_features_fuse_two_cosines_with_the_generic_one_weighted():
    import torch

    a, b = torch.randn(5, 4), torch.randn(5, 7)
    f = generic_features.fused(a, b, 0.5)
    assert f.shape == (5, 11)
    sim, parts = f @ f.T, (torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1))
    assert torch.allclose(sim, parts[0] @ parts[0].T + 0.25 * parts[1] @ parts[1].T, atol=1e-6)


def test_generic_features_fold_the_classifier_variants_into_the_best_one_per_suffix():
    scores = {"crossx_dfl": 0.5, "classifier_only": 0.6, "classifier_only_t2": 0.7,
              "classifier_only+generic@1": 0.9, "classifier_only_t2+generic@1": 0.8, "crossx_dfl+generic@1": 0.65}
    out = generic_features.best_classifier(scores, [1.0])
    assert out == {"crossx_dfl": 0.5, "crossx_dfl+generic@1": 0.65, "classifier_only_best": 0.7,
                   "classifier_only_best+generic@1": 0.9}
