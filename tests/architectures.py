"""Small-width versions of the architectures people prune: ResNet-18, VGG, U-Net, MobileNetV2, GPT-2, BERT.

Each builder returns ``(model, example_inputs)``; transformers models are tiny random configs (nothing
is downloaded).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (four stages of two BasicBlocks, BatchNorm, 1x1 downsample) at width ``w``."""

    def __init__(self, w: int = 8, classes: int = 10, cin: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        widths = [w, 2 * w, 4 * w, 8 * w]
        stages, cin = [], w
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def vgg(w: int = 8, classes: int = 10) -> nn.Module:
    """VGG-style: conv-BN-ReLU stacks, max pooling, a two-layer classifier on the flattened map."""
    layers, cin = [], 3
    for cout in (w, "M", 2 * w, "M", 4 * w, 4 * w):
        if cout == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * 2 * 2, 4 * w), nn.ReLU(), nn.Linear(4 * w, classes))


class UNet(nn.Module):
    """U-Net-style: two down levels, transposed-conv upsampling, skips concatenated with the decoder."""

    def __init__(self, w: int = 6, cin: int = 3, classes: int = 2) -> None:
        super().__init__()

        def block(a, b):
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU())

        self.enc1, self.enc2, self.mid = block(cin, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = block(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = block(2 * w, w)
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        m = self.mid(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2-style: inverted residuals (1x1 expand, 3x3 depthwise, 1x1 project), residual adds."""

    def __init__(self, w: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(w, w, 1, 1),
            InvertedResidual(w, 2 * w, 2, 4),
            InvertedResidual(2 * w, 2 * w, 1, 4),
            InvertedResidual(2 * w, 3 * w, 2, 4),
            InvertedResidual(3 * w, 3 * w, 1, 4),
        )
        self.head = nn.Sequential(nn.Conv2d(3 * w, 8 * w, 1, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU6())
        self.classifier = nn.Linear(8 * w, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=61, bos_token_id=0, eos_token_id=0, use_cache=False
    )
    model = GPT2LMHeadModel(config)
    return model, {"input_ids": torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(0))}


def bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=61,
        max_position_embeddings=16,
        pad_token_id=0,
    )
    model = BertModel(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 61, (2, 8), generator=gen)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build(name: str, seed: int = 0):
    """``(model, example_inputs)`` of architecture ``name``, initialized with ``seed``."""
    torch.manual_seed(seed)
    image = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    if name == "resnet18":
        return ResNet18(), image
    if name == "vgg":
        return vgg(), image
    if name == "unet":
        return UNet(), image
    if name == "mobilenetv2":
        return MobileNetV2(), image
    if name == "gpt2":
        return gpt2()
    if name == "bert":
        return bert()
    raise ValueError(name)


ARCHITECTURES = ["resnet18", "vgg", "unet", "mobilenetv2", "gpt2", "bert"]
