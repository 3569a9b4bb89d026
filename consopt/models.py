"""Built-in models: the architectures the papers study, at sizes that run on a laptop CPU.

Used by the profiler presets, the benchmarks and the tests. torchvision is not needed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MLP", "BasicBlock", "Bottleneck", "ResNet", "resnet_small", "resnet18", "resnet50",
           "TransformerClassifier", "LlamaBlock", "LlamaClassifier", "ResidualMLP"]


class MLP(nn.Sequential):
    """Linear → act → … → Linear. `sizes` = [in, hidden..., out]."""

    def __init__(self, sizes, activation=nn.ReLU, bias=True):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)


class ResidualMLP(nn.Module):
    """stem Linear, blocks x + U σ(V x), head Linear: the residual-stream law's textbook case."""

    def __init__(self, d_in, width, hidden, d_out, blocks=2, stream_relu=False):
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.V = nn.ModuleList(nn.Linear(width, hidden) for _ in range(blocks))
        self.U = nn.ModuleList(nn.Linear(hidden, width) for _ in range(blocks))
        self.head = nn.Linear(width, d_out)
        self.stream_relu = stream_relu

    def forward(self, x):
        x = self.stem(x)
        for V, U in zip(self.V, self.U):
            x = x + U(torch.relu(V(x)))
            if self.stream_relu:
                x = torch.relu(x)
        return self.head(x)


def _norm(c, bn):
    return nn.BatchNorm2d(c) if bn else nn.Identity()


def _downsample(cin, cout, stride, bn):
    """1×1 projection of the skip path when the block changes width or resolution, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not bn), _norm(cout, bn))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1, bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.bn1 = _norm(cout, bn)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        self.bn2 = _norm(cout, bn)
        self.downsample = _downsample(cin, cout, stride, bn)

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1, bn=True):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=not bn)
        self.bn1 = _norm(width, bn)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=not bn)
        self.bn2 = _norm(width, bn)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=not bn)
        self.bn3 = _norm(cout, bn)
        self.downsample = _downsample(cin, cout, stride, bn)

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + idt)


class ResNet(nn.Module):
    """ResNet (He et al. 2016) with a CIFAR-style 3×3 stem (`small_input`) or the ImageNet stem."""

    def __init__(self, block, layers, widths=(64, 128, 256, 512), in_channels=3, num_classes=10, bn=True,
                 small_input=True):
        super().__init__()
        c = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=not bn)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, c, 7, 2, 3, bias=not bn)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = _norm(c, bn)
        stages = []
        cin = c
        for i, (w, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, w, stride, bn))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_small(in_channels=1, num_classes=10, bn=True, width=8):
    """A two-stage ResNet for 8×8 digits: 2 basic blocks per stage."""
    return ResNet(BasicBlock, [1, 1], widths=(width, 2 * width), in_channels=in_channels,
                  num_classes=num_classes, bn=bn)


def resnet18(in_channels=3, num_classes=10, bn=True, small_input=True):
    return ResNet(BasicBlock, [2, 2, 2, 2], in_channels=in_channels, num_classes=num_classes, bn=bn,
                  small_input=small_input)


def resnet50(in_channels=3, num_classes=1000, bn=True, small_input=False):
    return ResNet(Bottleneck, [3, 4, 6, 3], in_channels=in_channels, num_classes=num_classes, bn=bn,
                  small_input=small_input)


class TransformerClassifier(nn.Module):
    """Token embedding + learned positions + nn.TransformerEncoder (ReLU MLP) + mean pool + head."""

    def __init__(self, vocab=17, seq_len=64, d_model=32, nhead=2, layers=2, dim_ff=64, num_classes=10,
                 dropout=0.0, norm_first=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_ff, dropout=dropout, activation="relu",
                                           batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        return self.head(self.encoder(x).mean(1))


class RMSNorm(nn.Module):
    """x / rms(x) · γ, written out (as in Llama's reference code)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LlamaBlock(nn.Module):
    """Pre-norm block: RMSNorm, grouped-query attention (SDPA), RMSNorm, SwiGLU MLP."""

    def __init__(self, d=32, n_heads=4, n_kv_heads=2, hidden=64, native_norm=True):
        super().__init__()
        self.h, self.kv, self.dh = n_heads, n_kv_heads, d // n_heads
        norm = (lambda: nn.RMSNorm(d)) if native_norm else (lambda: RMSNorm(d))
        self.attn_norm = norm()
        self.wq = nn.Linear(d, n_heads * self.dh, bias=False)
        self.wk = nn.Linear(d, n_kv_heads * self.dh, bias=False)
        self.wv = nn.Linear(d, n_kv_heads * self.dh, bias=False)
        self.wo = nn.Linear(n_heads * self.dh, d, bias=False)
        self.mlp_norm = norm()
        self.w_gate = nn.Linear(d, hidden, bias=False)
        self.w_up = nn.Linear(d, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        y = self.attn_norm(x)
        q = self.wq(y).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.wk(y).view(B, T, self.kv, self.dh).transpose(1, 2)
        v = self.wv(y).view(B, T, self.kv, self.dh).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(a.transpose(1, 2).reshape(B, T, self.h * self.dh))
        y = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(y)) * self.w_up(y))


class LlamaClassifier(nn.Module):
    def __init__(self, vocab=17, d=32, n_heads=4, n_kv_heads=2, hidden=64, layers=1, num_classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, n_heads, n_kv_heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, num_classes, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x).mean(1))
