"""Backbone registry, shapes, gradients, freezing, local-only pretrained weights, and the multi-task head."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from fer_lightning.config import ConfigError
from fer_lightning.models.backbones import (
    BACKBONE_INFO,
    BACKBONES,
    WeightsMismatchError,
    WeightsNotFoundError,
    build_backbone,
    register_backbone,
)
from fer_lightning.models.heads import MultiTaskHead

FEAT_DIMS = {
    "simple_cnn": lambda s: 256,
    "small_resnet": lambda s: 256,
    "seed_cnn": lambda s: 128 * (s // 8) ** 2,
    "vgg_style": lambda s: 64,
    "alexnet": lambda s: 9216,
    "resnet18": lambda s: 512,
    "resnet50": lambda s: 2048,
    "mobilenet_v2": lambda s: 1280,
}
MIN_SIZES = {
    "simple_cnn": 16,
    "small_resnet": 1,
    "seed_cnn": 8,
    "vgg_style": 46,
    "alexnet": 63,
    "resnet18": 1,
    "resnet50": 1,
    "mobilenet_v2": 1,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registry_holds_every_backbone():
    assert set(BACKBONES) == set(FEAT_DIMS)
    assert {n: BACKBONE_INFO[n].min_image_size for n in BACKBONES} == MIN_SIZES


CASES = [(n, c, s) for n in FEAT_DIMS for c in (1, 3) for s in (48, 64) if s >= MIN_SIZES[n]]
# ResNet-50 is the slow one on CPU: one grayscale-48 and one RGB-64 case cover both input adaptations.
CASES = [case for case in CASES if case[0] != "resnet50" or case[1:] in ((1, 48), (3, 64))]


@pytest.mark.parametrize(("name", "channels", "size"), CASES)
def test_shape_and_gradients(name, channels, size):
    torch.manual_seed(0)
    model, feat_dim = build_backbone(name, in_channels=channels, image_size=size)
    assert feat_dim == FEAT_DIMS[name](size)
    x = torch.randn(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, feat_dim)
    # A random projection: summing BN outputs over the batch would give zero gradients by construction.
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    first = next(model.parameters())
    assert first.shape[1] == channels and first.grad.abs().sum() > 0
    # channels_last input gives the same features (no view() on a non-contiguous tensor).
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(x.contiguous(memory_format=torch.channels_last)), model(x), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("name", ["alexnet", "resnet50", "mobilenet_v2"])
def test_imagenet_size(name):
    model, feat_dim = build_backbone(name, in_channels=3, image_size=224)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, feat_dim)


@pytest.mark.parametrize(("name", "minimum"), [("alexnet", 63), ("vgg_style", 46), ("seed_cnn", 8), ("simple_cnn", 16)])
def test_smallest_supported_size(name, minimum):
    with pytest.raises(ConfigError, match=f"data.image_size={minimum - 1} is too small for backbone '{name}'"):
        build_backbone(name, in_channels=1, image_size=minimum - 1)
    model, feat_dim = build_backbone(name, in_channels=1, image_size=minimum)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, minimum, minimum)).shape == (1, feat_dim)


def test_seed_cnn_structure_and_parameter_count():
    model, feat_dim = build_backbone("seed_cnn", in_channels=1, image_size=48)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (1, 1)),
        (32, 64, (5, 5), (2, 2)),
        (64, 128, (7, 7), (3, 3)),
    ]
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "LeakyReLU", "MaxPool2d"] * 3 + ["Dropout", "Flatten"]
    assert all(m.negative_slope == 0.01 for m in model.modules() if isinstance(m, nn.LeakyReLU))
    assert next(m for m in model.modules() if isinstance(m, nn.Dropout)).p == 0.1
    # By hand: conv = k*k*cin*cout + cout (bias), BN = 2*cout; 48 -> 24 -> 12 -> 6 after three pools.
    expected = (3 * 3 * 1 * 32 + 32 + 2 * 32) + (5 * 5 * 32 * 64 + 64 + 2 * 64) + (7 * 7 * 64 * 128 + 128 + 2 * 128)
    assert expected == 453568
    assert sum(p.numel() for p in model.parameters()) == expected
    assert feat_dim == 128 * 6 * 6
    with pytest.raises(ValueError, match="data.image_size=48"):
        model(torch.randn(1, 1, 64, 64))


def test_vgg_style_flatten_size():
    # Valid 3x3 conv then pool, four times: 48 -> 23 -> 10 -> 4 -> 1 and 64 -> 31 -> 14 -> 6 -> 2.
    for size, side in ((48, 1), (64, 2)):
        model, _ = build_backbone("vgg_style", in_channels=3, image_size=size)
        assert model.dense[0].in_features == 256 * side * side
    kinds = [type(m).__name__ for m in model.features]
    assert kinds[:10] == [
        "Conv2d",
        "ReLU",
        "BatchNorm2d",
        "MaxPool2d",
        "Conv2d",
        "Dropout",
        "ReLU",
        "BatchNorm2d",
        "MaxPool2d",
        "Conv2d",
    ]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.25]


def test_freeze_fraction_freezes_first_tensors():
    model, _ = build_backbone("simple_cnn", in_channels=1, image_size=48, freeze_fraction=0.5)
    # 4 blocks x (conv weight, BN weight, BN bias) = 12 tensors; half = the first two blocks.
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["0.weight", "1.weight", "1.bias", "4.weight", "5.weight", "5.bias"]
    out = model(torch.randn(2, 1, 48, 48))
    (out * torch.randn_like(out)).sum().backward()
    assert all((p.grad is None) != p.requires_grad for p in model.parameters())

    resnet, _ = build_backbone("resnet18", in_channels=3, image_size=64, freeze_fraction=0.25)
    names = [n for n, _ in resnet.named_parameters()]
    # conv1 + bn1 (3) + layer1 (2 blocks x 6) + layers 2-4 (15 each, with downsample) = 60 tensors, fc removed.
    assert len(names) == 60
    assert [n for n, p in resnet.named_parameters() if not p.requires_grad] == names[:15]


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_freeze_fraction_range(fraction):
    with pytest.raises(ConfigError, match=r"backbone.freeze_fraction must be in \[0, 1\)"):
        build_backbone("simple_cnn", freeze_fraction=fraction)


def test_unknown_name_and_option():
    with pytest.raises(ConfigError, match="unknown backbone 'vit'.*resnet18"):
        build_backbone("vit")
    with pytest.raises(
        ConfigError,
        match="backbone.depth is not an option of backbone .simple_cnn.; its options are: widths, stem_stride",
    ):
        build_backbone("simple_cnn", depth=3)
    model, feat_dim = build_backbone("small_resnet", in_channels=1, image_size=48, widths=[16, 32], blocks_per_stage=2)
    assert feat_dim == 32 and model(torch.randn(2, 1, 48, 48)).shape == (2, 32)


def test_pretrained_without_file_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone("resnet18", pretrained=True)
    message = str(err.value)
    assert str(expected) in message
    assert "backbone.weights_path=" in message and "backbone.pretrained=false" in message
    with pytest.raises(WeightsNotFoundError, match="'seed_cnn' has no published pretrained weights"):
        build_backbone("seed_cnn", image_size=48, pretrained=True)


def test_pretrained_from_hub_cache_sums_rgb_kernels_for_grayscale(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    published = tvm.mobilenet_v2(weights=None)  # stands in for the ImageNet file: same layout, keys and classifier
    for m in published.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running stats so eval outputs depend on them
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth"
    path.parent.mkdir(parents=True)
    torch.save(published.state_dict(), path)

    rgb, _ = build_backbone("mobilenet_v2", in_channels=3, image_size=64, pretrained=True)
    gray, _ = build_backbone("mobilenet_v2", in_channels=1, image_size=64, pretrained=True)
    first = published.features[0][0].weight
    torch.testing.assert_close(gray.features[0][0].weight, first.sum(dim=1, keepdim=True))
    published.classifier = nn.Identity()
    x = torch.rand(2, 1, 64, 64)
    for m in (published, rgb, gray):
        m.eval()
    with torch.no_grad():
        expected = published(x.expand(-1, 3, -1, -1))
        torch.testing.assert_close(rgb(x.expand(-1, 3, -1, -1)), expected)
        # A gray image is R = G = B, so the summed kernel sees exactly what the RGB kernel saw.
        torch.testing.assert_close(gray(x), expected, rtol=1e-4, atol=1e-5)


def _trained_state(name: str, **kwargs):
    torch.manual_seed(1)
    model, _ = build_backbone(name, **kwargs)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"]))  # moves BN stats
    return model


def test_weights_path_round_trip(tmp_path):
    model = _trained_state("seed_cnn", in_channels=1, image_size=48)
    raw = tmp_path / "raw.pt"
    torch.save(model.state_dict(), raw)
    # A training checkpoint: the whole model's state dict under 'state_dict', backbone keys prefixed.
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save(
        {
            "state_dict": {
                **{f"backbone.{k}": v for k, v in model.state_dict().items()},
                "head.classifier.weight": torch.zeros(8, 4608),
            },
            "epoch": 3,
        },
        wrapped,
    )
    x = torch.randn(3, 1, 48, 48)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    for path in (raw, wrapped):
        fresh, _ = build_backbone("seed_cnn", in_channels=1, image_size=48, weights_path=str(path))
        fresh.eval()
        with torch.no_grad():
            assert torch.equal(fresh(x), reference)


def test_weights_path_mismatch_and_missing(tmp_path):
    small = tmp_path / "small.pt"
    torch.save(_trained_state("small_resnet", in_channels=1, image_size=48).state_dict(), small)
    with pytest.raises(WeightsMismatchError, match="shape mismatches"):
        build_backbone("small_resnet", in_channels=1, image_size=48, widths=(16, 32, 64, 128), weights_path=str(small))
    with pytest.raises(WeightsMismatchError, match="missing keys.*unexpected keys"):
        build_backbone("seed_cnn", in_channels=1, image_size=48, weights_path=str(small))
    with pytest.raises(WeightsNotFoundError, match="backbone.weights_path=.*nope.pt does not exist"):
        build_backbone("seed_cnn", in_channels=1, image_size=48, weights_path=str(tmp_path / "nope.pt"))
    not_a_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_dict)
    with pytest.raises(WeightsMismatchError, match="not a state dict"):
        build_backbone("seed_cnn", in_channels=1, image_size=48, weights_path=str(not_a_dict))


def test_register_backbone_adds_and_rejects_duplicates():
    @register_backbone("tiny_test", min_image_size=4)
    def tiny(in_channels: int, image_size: int, *, width: int = 3):
        return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), width

    try:
        model, dim = build_backbone("tiny_test", in_channels=1, image_size=8, width=5)
        assert dim == 5 and model(torch.randn(2, 1, 8, 8)).shape == (2, 5)
        with pytest.raises(ValueError, match="registered twice"):
            register_backbone("tiny_test")(tiny)
    finally:
        BACKBONES.pop("tiny_test")
        BACKBONE_INFO.pop("tiny_test")


def test_multitask_head_outputs():
    torch.manual_seed(0)
    head = MultiTaskHead(16, 8, va=True, landmarks=True)
    out = head(torch.randn(5, 16) * 10)  # large features push tanh/sigmoid toward their bounds
    assert set(out) == {"logits", "va", "landmarks"}
    assert out["logits"].shape == (5, 8) and out["va"].shape == (5, 2) and out["landmarks"].shape == (5, 68, 2)
    assert out["va"].abs().max() <= 1 and out["landmarks"].min() >= 0 and out["landmarks"].max() <= 1
    x = torch.randn(5, 16)
    out = head(x)
    torch.testing.assert_close(out["logits"], head.classifier(x))
    torch.testing.assert_close(out["va"], torch.tanh(head.va(x)))
    torch.testing.assert_close(out["landmarks"][:, 3], torch.sigmoid(head.landmarks(x))[:, 6:8])


def test_multitask_head_options_and_parameter_count():
    logits_only = MultiTaskHead(16, 6, va=False)
    assert set(logits_only(torch.randn(2, 16))) == {"logits"}
    assert sum(p.numel() for p in logits_only.parameters()) == 16 * 6 + 6
    hidden = MultiTaskHead(16, 6, va=True, hidden=32, dropout=0.2)
    # trunk 16->32, logits 32->6, va 32->2, all with biases.
    assert sum(p.numel() for p in hidden.parameters()) == (16 * 32 + 32) + (32 * 6 + 6) + (32 * 2 + 2)
    hidden.eval()
    x = torch.randn(3, 16)
    h = torch.relu(hidden.trunk[1](x))
    torch.testing.assert_close(hidden(x)["va"], torch.tanh(hidden.va(h)))
    with pytest.raises(ValueError, match=r"head.dropout must be in \[0, 1\)"):
        MultiTaskHead(16, 6, dropout=1.0)
    with pytest.raises(ValueError, match="head.hidden must be >= 0"):
        MultiTaskHead(16, 6, hidden=-1)


def test_backbone_and_head_train_together():
    torch.manual_seed(0)
    backbone, dim = build_backbone("simple_cnn", in_channels=1, image_size=32)
    head = MultiTaskHead(dim, 3)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1)
    x = torch.randn(12, 1, 32, 32)
    y = torch.arange(12) % 3
    x[y == 1] += 1.0  # separable by brightness
    x[y == 2] -= 1.0
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(head(backbone(x))["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_simple_cnn_strided_stem_replaces_first_pool():
    # stem_stride=2: the first block halves the size by its stride (no max-pool), the others pool as before
    plain, _ = build_backbone("simple_cnn", in_channels=3, image_size=64, widths=[8, 8, 8], stem_stride=1)
    strided, dim = build_backbone("simple_cnn", in_channels=3, image_size=64, widths=[8, 8, 8], stem_stride=2)
    convs = [m for m in strided.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in strided.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1)] and len(pools) == 2
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in plain.modules()) == 3
    x = torch.randn(2, 3, 64, 64)
    # spatial size just before global pooling: 64 -> 32 (stride) -> 16 -> 8 (pools)
    assert strided[:-2](x).shape == (2, 8, 8, 8) and plain[:-2](x).shape == (2, 8, 8, 8)
    assert dim == 8 and strided(x).shape == (2, 8)
    with pytest.raises(ConfigError, match=r"backbone.stem_stride=0 must be a positive integer"):
        build_backbone("simple_cnn", stem_stride=0)
    with pytest.raises(ConfigError, match=r"data.image_size=16 is too small for 4 downsampling blocks \(needs 32\)"):
        build_backbone("simple_cnn", image_size=16, widths=[8, 8, 8, 8], stem_stride=4)


def test_small_resnet_strided_stem_halves_the_input_first():
    x = torch.randn(2, 1, 48, 48)
    full, _ = build_backbone("small_resnet", in_channels=1, image_size=48, widths=[8, 16])
    strided, dim = build_backbone("small_resnet", in_channels=1, image_size=48, widths=[8, 16], stem_stride=2)
    assert full[0].stride == (1, 1) and strided[0].stride == (2, 2)
    # stem 48 -> 24 (stride 2), second stage -> 12; without the strided stem: 48 -> 48 -> 24
    assert strided[:-2](x).shape == (2, 16, 12, 12) and full[:-2](x).shape == (2, 16, 24, 24)
    assert dim == 16 and strided(x).shape == (2, 16)
    with pytest.raises(ConfigError, match=r"backbone.stem_stride=0 must be a positive integer"):
        build_backbone("small_resnet", stem_stride=0)
