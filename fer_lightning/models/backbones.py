"""Backbone registry (name -> builder): feature extractors mapping (B, C, H, W) images to (B, feat_dim) features.

A new backbone is one decorated builder function here plus one YAML file in conf/backbone/. Nothing downloads:
pretrained torchvision weights are read from the local torch hub cache or from backbone.weights_path.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import Tensor, nn

from fer_lightning.errors import ConfigError

Builder = Callable[..., tuple[nn.Module, int]]

BACKBONES: dict[str, Builder] = {}


@dataclass(frozen=True)
class BackboneInfo:
    """What build_backbone needs to know about a registered backbone besides its builder."""

    min_image_size: int = 1
    # torchvision weights enum whose DEFAULT member names the published checkpoint; None = no published weights.
    weights_enum: type | None = None
    # Keys of the published checkpoint that the feature extractor does not have (the replaced classifier).
    dropped_prefixes: tuple[str, ...] = ()


BACKBONE_INFO: dict[str, BackboneInfo] = {}


class WeightsNotFoundError(RuntimeError):
    """Pretrained weights were asked for but no local file holds them (nothing is ever downloaded)."""


class WeightsMismatchError(RuntimeError):
    """A weights file does not fit the backbone it is loaded into."""


def register_backbone(
    name: str,
    *,
    min_image_size: int = 1,
    weights_enum: type | None = None,
    dropped_prefixes: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Decorator adding a builder `(in_channels, image_size, **options) -> (module, feat_dim)` to the registry."""

    def add(builder: Builder) -> Builder:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = builder
        BACKBONE_INFO[name] = BackboneInfo(min_image_size, weights_enum, dropped_prefixes)
        return builder

    return add


def expected_weights_file(name: str) -> Path:
    """Where the torch hub cache keeps the published weights of a torchvision backbone."""
    info = BACKBONE_INFO[name]
    if info.weights_enum is None:
        raise WeightsNotFoundError(f"backbone {name!r} has no published pretrained weights")
    url = info.weights_enum.DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def build_backbone(
    name: str,
    *,
    in_channels: int = 3,
    image_size: int = 64,
    pretrained: bool = False,
    weights_path: str | None = None,
    freeze_fraction: float = 0.0,
    **kwargs,
) -> tuple[nn.Module, int]:
    """Build a registered backbone; returns the feature extractor and its feature dimension."""
    if name not in BACKBONES:
        raise ConfigError(f"backbone.name: unknown backbone {name!r}; registered: {', '.join(sorted(BACKBONES))}")
    info = BACKBONE_INFO[name]
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer (got {in_channels!r}); 1 = grayscale, 3 = RGB")
    if image_size < info.min_image_size:
        raise ConfigError(
            f"data.image_size={image_size} is too small for backbone {name!r}: it needs at least "
            f"{info.min_image_size} pixels; raise data.image_size or pick another backbone"
        )
    if not (isinstance(freeze_fraction, (int, float)) and 0.0 <= freeze_fraction < 1.0):
        raise ConfigError(f"backbone.freeze_fraction must be in [0, 1) (got {freeze_fraction!r}); 0 trains everything")
    builder = BACKBONES[name]
    options = [p for p in inspect.signature(builder).parameters if p not in ("in_channels", "image_size")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(
            f"backbone.{unknown[0]} is not an option of backbone {name!r}; its options are: "
            f"{', '.join(options) or '(none)'}"
        )
    if pretrained and weights_path is None and in_channels not in (1, 3):
        raise ConfigError(
            f"pretrained RGB weights fit 1 or 3 input channels, not {in_channels}; set backbone.pretrained=false"
        )
    module, feat_dim = builder(in_channels=in_channels, image_size=image_size, **kwargs)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"backbone.weights_path={weights_path} does not exist; point it at a saved "
                "state dict or set backbone.weights_path=null"
            )
        load_backbone_state(module, _read_state(path), source=str(path), dropped_prefixes=info.dropped_prefixes)
    elif pretrained:
        if info.weights_enum is None:
            raise WeightsNotFoundError(
                f"backbone {name!r} has no published pretrained weights: set backbone.weights_path=<a state dict "
                "saved from this backbone> or backbone.pretrained=false"
            )
        path = expected_weights_file(name)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"pretrained weights for backbone {name!r} not found: nothing is downloaded at run time, so place "
                f"the file {path.name} (from {info.weights_enum.DEFAULT.url}) at {path}, or set "
                f"backbone.weights_path=/path/to/{path.name}, or set backbone.pretrained=false"
            )
        load_backbone_state(module, _read_state(path), source=str(path), dropped_prefixes=info.dropped_prefixes)
    freeze_first(module, freeze_fraction)
    return module, feat_dim


def _read_state(path: Path) -> Mapping[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure gets the same advice
        raise WeightsMismatchError(
            f"could not read {path} as a tensor state dict ({type(err).__name__}: {err}); save it with "
            "torch.save(backbone.state_dict(), path)"
        ) from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsMismatchError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_backbone_state(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    dropped_prefixes: Sequence[str] = (),
) -> None:
    """Load a state dict strictly on the backbone's keys; RGB first-conv kernels are summed for 1-channel input."""
    own = module.state_dict()
    # A training checkpoint holds the whole model; the backbone's part sits under "backbone.".
    if not any(k.startswith("backbone.") for k in own) and any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in dropped_prefixes)}
    adapted: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key]
        if (
            value.shape != target.shape
            and value.ndim == 4
            and value.shape[1] == 3
            and target.shape[1] == 1
            and value.shape[0] == target.shape[0]
            and value.shape[2:] == target.shape[2:]
        ):
            # Grayscale input = equal R, G, B, so summing the RGB kernels gives the same response.
            value = value.sum(dim=1, keepdim=True)
        if value.shape != target.shape:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs backbone {tuple(target.shape)}")
        adapted[key] = value
    # Checkpoints older than BatchNorm's counter lack num_batches_tracked; the counter carries no learned state.
    missing = [k for k in own if k not in adapted and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise WeightsMismatchError(
            f"weights in {source} do not fit this backbone: {'; '.join(parts)}. Use a file saved from the same "
            "backbone with the same options and input channels, or set backbone.weights_path=null"
        )
    for key, value in own.items():
        adapted.setdefault(key, value)
    module.load_state_dict(adapted, strict=True)


def freeze_first(module: nn.Module, fraction: float) -> int:
    """Set requires_grad=False on the first floor(fraction * n) parameter tensors; returns how many."""
    params = list(module.parameters())
    # The epsilon keeps e.g. 0.29 * 100 from flooring to 28.
    count = math.floor(fraction * len(params) + 1e-9)
    for p in params[:count]:
        p.requires_grad_(False)
    return count


def _conv_bn_act(cin: int, cout: int, k: int, act: nn.Module, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), act]


def _check_size(x: Tensor, image_size: int, name: str) -> None:
    if x.shape[-2:] != (image_size, image_size):
        raise ValueError(
            f"backbone {name!r} was built for data.image_size={image_size} but got input "
            f"{tuple(x.shape[-2:])}; its flatten size depends on the image size"
        )


@register_backbone("simple_cnn", min_image_size=16)
def simple_cnn(
    in_channels: int, image_size: int, *, widths: Sequence[int] = (32, 64, 128, 256), stem_stride: int = 1
) -> tuple[nn.Module, int]:
    """Small fast CNN: conv3x3-BN-ReLU-maxpool blocks, then global average pooling.

    stem_stride > 1 makes the first block downsample with its convolution's stride instead of a max-pool, so a
    larger input (more detail for small features such as brows) costs about what a smaller one did.
    """
    widths = tuple(int(w) for w in widths)
    stem_stride = int(stem_stride)
    if stem_stride < 1:
        raise ConfigError(f"backbone.stem_stride={stem_stride} must be a positive integer (1 = no strided stem)")
    needed = 2 ** len(widths) if stem_stride == 1 else stem_stride * 2 ** (len(widths) - 1)
    if image_size < needed:
        raise ConfigError(
            f"data.image_size={image_size} is too small for {len(widths)} downsampling blocks "
            f"(needs {needed}); shorten backbone.widths, lower backbone.stem_stride or raise data.image_size"
        )
    layers: list[nn.Module] = []
    cin = in_channels
    for i, w in enumerate(widths):
        if i == 0 and stem_stride > 1:
            layers += _conv_bn_act(cin, w, 3, nn.ReLU(inplace=True), stride=stem_stride)
        else:
            layers += [*_conv_bn_act(cin, w, 3, nn.ReLU(inplace=True)), nn.MaxPool2d(2)]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), cin


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (projected when shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@register_backbone("small_resnet", min_image_size=1)
def small_resnet(
    in_channels: int,
    image_size: int,
    *,
    widths: Sequence[int] = (32, 64, 128, 256),
    blocks_per_stage: int = 1,
    stem_stride: int = 1,
) -> tuple[nn.Module, int]:
    """Small residual CNN for 48x48 faces: a 3x3 stem (stride stem_stride), then one stage of residual blocks per
    width, each stage after the first starting with a stride-2 block; global average pooling at the end."""
    widths = tuple(int(w) for w in widths)
    if not widths or blocks_per_stage < 1:
        raise ConfigError("backbone.widths must be non-empty and backbone.blocks_per_stage >= 1")
    if int(stem_stride) < 1:
        raise ConfigError(f"backbone.stem_stride={stem_stride} must be a positive integer (1 = full-resolution stem)")
    layers: list[nn.Module] = _conv_bn_act(in_channels, widths[0], 3, nn.ReLU(inplace=True), stride=int(stem_stride))
    cin = widths[0]
    for stage, w in enumerate(widths):
        for block in range(blocks_per_stage):
            layers.append(BasicBlock(cin, w, stride=2 if stage > 0 and block == 0 else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), cin


class SeedCNN(nn.Module):
    """Seed 004's final CNN: conv 3/5/7 with 32/64/128 filters, BN, LeakyReLU(0.01), maxpool 2, dropout, flatten."""

    def __init__(self, in_channels: int, image_size: int, dropout: float):
        super().__init__()
        self.image_size = image_size
        layers: list[nn.Module] = []
        cin = in_channels
        for cout, k in ((32, 3), (64, 5), (128, 7)):
            # Seed 004 keeps the conv bias even before BN; kept for a faithful parameter count.
            layers += [
                nn.Conv2d(cin, cout, k, padding=k // 2),
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.01),
                nn.MaxPool2d(2, 2),
            ]
            cin = cout
        layers += [nn.Dropout(dropout), nn.Flatten()]
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        _check_size(x, self.image_size, "seed_cnn")
        return self.features(x)


@register_backbone("seed_cnn", min_image_size=8)
def seed_cnn(in_channels: int, image_size: int, *, dropout: float = 0.1) -> tuple[nn.Module, int]:
    """Seed 004 section 5.5 CNN; feature dim 128 * (image_size // 8) ** 2 (4608 at 48x48)."""
    return SeedCNN(in_channels, image_size, dropout), 128 * (image_size // 8) ** 2


def _vgg_side(image_size: int) -> int:
    side = image_size
    for _ in range(4):  # valid 3x3 conv, then 2x2 max pool
        side = (side - 2) // 2
    return side


class VGGStyle(nn.Module):
    """Seed 001 appendix C: four valid 3x3 convs (64/128/256/256), ReLU then BN, maxpool; dense 128 and 64."""

    def __init__(self, in_channels: int, image_size: int, dropout_conv: float, dropout_dense: float):
        super().__init__()
        self.image_size = image_size
        layers: list[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate((64, 128, 256, 256)):
            layers.append(nn.Conv2d(cin, cout, 3))
            if i == 1:
                layers.append(nn.Dropout(dropout_conv))  # the seed puts it between conv 2 and its activation
            layers += [nn.ReLU(inplace=True), nn.BatchNorm2d(cout), nn.MaxPool2d(2)]
            cin = cout
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        flat = 256 * _vgg_side(image_size) ** 2
        self.dense = nn.Sequential(
            nn.Linear(flat, 128),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(128),
            nn.Dropout(dropout_dense),
            nn.Linear(128, 64),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(64),
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_size(x, self.image_size, "vgg_style")
        return self.dense(self.features(x))


@register_backbone("vgg_style", min_image_size=46)
def vgg_style(
    in_channels: int, image_size: int, *, dropout_conv: float = 0.3, dropout_dense: float = 0.25
) -> tuple[nn.Module, int]:
    """Seed 001's VGG-type Keras model without its softmax layer; 64 features."""
    return VGGStyle(in_channels, image_size, dropout_conv, dropout_dense), 64


def _with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if in_channels == conv.in_channels:
        return conv
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )


@register_backbone("alexnet", min_image_size=63, weights_enum=tvm.AlexNet_Weights, dropped_prefixes=("classifier.",))
def alexnet(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """torchvision AlexNet up to its adaptive 6x6 pool; 9216 features."""
    model = tvm.alexnet(weights=None)
    model.features[0] = _with_in_channels(model.features[0], in_channels)
    model.classifier = nn.Identity()
    return model, 256 * 6 * 6


def _resnet(factory: Callable[..., tvm.ResNet], in_channels: int) -> tuple[nn.Module, int]:
    model = factory(weights=None)
    model.conv1 = _with_in_channels(model.conv1, in_channels)
    feat_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, feat_dim


@register_backbone("resnet18", weights_enum=tvm.ResNet18_Weights, dropped_prefixes=("fc.",))
def resnet18(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """torchvision ResNet-18 without its fc layer; 512 features."""
    return _resnet(tvm.resnet18, in_channels)


@register_backbone("resnet50", weights_enum=tvm.ResNet50_Weights, dropped_prefixes=("fc.",))
def resnet50(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """torchvision ResNet-50 without its fc layer; 2048 features."""
    return _resnet(tvm.resnet50, in_channels)


@register_backbone("mobilenet_v2", weights_enum=tvm.MobileNet_V2_Weights, dropped_prefixes=("classifier.",))
def mobilenet_v2(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """torchvision MobileNetV2 without its classifier; 1280 features."""
    model = tvm.mobilenet_v2(weights=None)
    model.features[0][0] = _with_in_channels(model.features[0][0], in_channels)
    model.classifier = nn.Identity()
    return model, model.last_channel
