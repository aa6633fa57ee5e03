"""Backbones, classifiers and embedding encoders shared by every stage.

Every network takes 3-channel images in [0, 1] (greyscale sketches are repeated to 3 channels) and
normalises them itself with the channel statistics it was trained with (:class:`Normalise`, stored in
its state dict), so a photo, a sketch or a reconstructed sample always reaches each network
normalised the way that network was trained. The stages set those statistics from their data
(``set_stats``), except for a pretrained backbone (``backbone.pretrained``), whose normalisation is fixed
to the statistics its weights expect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sbir.config import BackboneParams


class Normalise(nn.Module):
    """(x - mean) / std per channel with the statistics stored as buffers.

    ``fixed``: the statistics are those pretrained weights expect, and :meth:`set_stats` (the stages'
    data statistics) leaves them alone.
    """

    def __init__(self, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25),
                 fixed: bool = False) -> None:
        super().__init__()
        self.fixed = fixed
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if self.fixed:
            return
        self.mean.copy_(mean.view_as(self.mean))
        self.std.copy_(std.clamp_min(1e-3).view_as(self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its 4-d weights in NHWC order. oneDNN's CPU convolutions then keep their activations
    in NHWC too (whatever the input's layout) and skip the reorders: a training step of the small_cnn
    classifier at 32 px is 1.47x faster in fp32 and 1.16x in bf16, of the estimators 1.43x / 1.39x, on the
    2-core AMD EPYC (benchmarks/results/channels_last.json); cuDNN's tensor-core kernels prefer NHWC as
    well. The values are the same up to float rounding."""
    return module.to(memory_format=torch.channels_last)


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks, stride 2 after the first, global average pool. Fast at 32 px on a CPU."""

    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c = 3, width
        for i in range(depth):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in, c = c, min(c * 2, width * 4)
        self.features = channels_last(nn.Sequential(*layers))
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


class ResNetBackbone(nn.Module):
    """torchvision ResNet-18/34 without its classifier; random init unless a local weights file is given."""

    def __init__(self, name: str, weights_path: str | None = None) -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if weights_path:
            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(f"backbone weights file {path} not found")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or [m for m in missing if not m.startswith("fc.")]:
                raise ValueError(f"{path}: not a {name} state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EfficientNetLite0Backbone(nn.Module):
    """timm's EfficientNet-Lite0 without its classifier (pooled 1280-d features): ImageNet weights from the
    installed package when ``pretrained``, a local weights file when given, else random init
    (:mod:`sbir.models.pretrained`)."""

    def __init__(self, pretrained: bool = False, weights_path: str | None = None) -> None:
        super().__init__()
        from sbir.models.pretrained import efficientnet_lite0, packaged_weights_file

        self.net = efficientnet_lite0(0, packaged_weights_file() if pretrained else weights_path)
        self.out_dim = self.net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(p: BackboneParams) -> nn.Module:
    if p.name == "small_cnn":
        return SmallCNN(p.width, p.depth)
    if p.name == "efficientnet_lite0":
        return EfficientNetLite0Backbone(p.pretrained, p.weights_path)
    return ResNetBackbone(p.name, p.weights_path)


def build_normalise(p: BackboneParams) -> Normalise:
    """The input normalisation for a backbone: fixed to what the weights expect when pretrained, else
    the defaults the stages overwrite with their data statistics."""
    if p.pretrained:
        from sbir.models.pretrained import LITE_MEAN, LITE_STD

        return Normalise(LITE_MEAN, LITE_STD, fixed=True)
    return Normalise()


UNKNOWN_CLASS_LOGIT = -1e4  # finite: softmax gives it 0, and KL/CE terms stay finite


class Classifier(nn.Module):
    """normalise -> backbone -> linear. The linear layer's weight rows are the class proxies.

    ``known`` marks the dataset classes the classifier was trained on (all by default; the class-split
    studies train teachers on a subset): the others' logits are fixed at UNKNOWN_CLASS_LOGIT, so they
    get no gradient and no probability, as if the row did not exist.
    """

    def __init__(self, backbone: BackboneParams, num_classes: int, known: Sequence[int] | None = None) -> None:
        super().__init__()
        self.normalise = build_normalise(backbone)
        self.backbone = build_backbone(backbone)
        self.head = nn.Linear(self.backbone.out_dim, num_classes)
        mask = torch.ones(num_classes, dtype=torch.bool)
        if known is not None:
            mask[:] = False
            mask[torch.as_tensor(list(known), dtype=torch.long)] = True
        self.register_buffer("known", mask, persistent=False)  # rebuilt from the params, not saved

    @property
    def uses_fixed_normalisation(self) -> bool:
        """True for a pretrained backbone: data statistics must not replace the ones its weights expect."""
        return self.normalise.fixed

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalise(x))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The class logits of :meth:`features`' output, the classes it never saw fixed at UNKNOWN_CLASS_LOGIT
        (their head rows were never trained: raw, they can outscore every known class)."""
        logits = self.head(features)
        return logits if bool(self.known.all()) else logits.masked_fill(~self.known, UNKNOWN_CLASS_LOGIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))


class Encoder(nn.Module):
    """normalise -> backbone -> projection head -> L2-normalised embedding (a student / retrieval branch).

    ``head='mlp'`` (Linear-ReLU-Linear) lets the embedding sharpen class structure non-linearly, the
    way a softmax sharpens logits; a linear head only rotates and scales the backbone features.
    """

    def __init__(self, backbone: BackboneParams, embed_dim: int, head: str = "linear") -> None:
        super().__init__()
        self.normalise = build_normalise(backbone)
        self.backbone = build_backbone(backbone)
        d = self.backbone.out_dim
        if head == "mlp":
            self.project = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, embed_dim))
        elif head == "linear":
            self.project = nn.Linear(d, embed_dim)
        else:
            raise ValueError(f"unknown projection head {head!r} (expected 'linear' or 'mlp')")

    @property
    def uses_fixed_normalisation(self) -> bool:
        """True for a pretrained backbone: data statistics must not replace the ones its weights expect."""
        return self.normalise.fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.backbone(self.normalise(x))), dim=-1)


class EncoderPair(nn.Module):
    """The photo encoder and the sketch encoder that embed into one space."""

    def __init__(self, backbone: BackboneParams, embed_dim: int, head: str = "linear") -> None:
        super().__init__()
        self.photo_encoder = Encoder(backbone, embed_dim, head)
        self.sketch_encoder = Encoder(backbone, embed_dim, head)

    def forward(self, photos: torch.Tensor, sketches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.photo_encoder(photos), self.sketch_encoder(sketches)


def channel_stats(images: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 or float images (N,3,H,W), streamed in batches."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in range(0, len(images), batch):
        x = to_float(images[i : i + batch]).double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-8).sqrt()
    return mean.float(), std.float()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float in [0,1], with 1-channel inputs repeated to 3 channels."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float images to size×size (no-op when already that size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def embed(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, size: int | None = None,
          batch: int = 256) -> torch.Tensor:
    """``fn`` (an encoder, or any images -> vectors function) over uint8 images in batches, each batch
    resized to ``size`` when given; float32 rows."""
    out = []
    for i in range(0, len(images), batch):
        x = to_float(images[i : i + batch])
        out.append(fn(resize(x, size) if size else x).float())
    return torch.cat(out) if out else torch.zeros(0)
