"""The paper's architectures, written out so that no download or extra package is needed.

Module names, types and shapes follow the originals, so component selections
and counts (and ``state_dict`` keys) are the same:

- :func:`resnet50`, :func:`vit_b_16` -- torchvision's ``resnet50`` and
  ``vit_b_16`` (torchvision is not a dependency; its wheels also pin one torch
  version each). Where torchvision is installed, prefer its models for trained
  weights: the structure is identical.
- :func:`mini_resnet` -- the seed's CIFAR-10 "MiniResNet" (conv stem, one stage
  of BasicBlocks at a single width, average pool 8, linear head);
  :func:`cifar_resnet18` -- the seed's CIFAR ResNet-18 (3x3 stem, no max-pool).
- :func:`gpt2_small` -- Hugging Face's ``GPT2LMHeadModel`` with the default
  ``GPT2Config`` (12 layers, width 768), including its transposed ``Conv1D``.

Build them under ``torch.device("meta")`` to count components instantly with
no memory (see :mod:`coar_dask.zoo.presets`); the initialisation here is a plain
one, not the originals' (these are random models unless weights are loaded).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["resnet50", "vit_b_16", "mini_resnet", "cifar_resnet18", "gpt2_small", "Conv1D"]


def _nn():
    import torch
    from torch import nn

    return torch, nn


# ---------------------------------------------------------------- ResNets


def _torchvision_resnet_classes():
    torch, nn = _nn()

    class Bottleneck(nn.Module):
        """torchvision's Bottleneck (ResNet v1.5: the stride is on the 3x3 conv)."""

        expansion = 4

        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Any = None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * self.expansion)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample
            self.stride = stride

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            return self.relu(out + identity)

    class ResNet(nn.Module):
        """torchvision's ImageNet ResNet with Bottleneck blocks."""

        def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._make_layer(64, layers[0])
            self.layer2 = self._make_layer(128, layers[1], stride=2)
            self.layer3 = self._make_layer(256, layers[2], stride=2)
            self.layer4 = self._make_layer(512, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def _make_layer(self, planes: int, blocks: int, stride: int = 1):
            downsample = None
            if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * Bottleneck.expansion),
                )
            layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * Bottleneck.expansion
            layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet


def resnet50(num_classes: int = 1000) -> Any:
    """torchvision's ``resnet50`` structure (random weights); 224x224 RGB inputs."""
    return _torchvision_resnet_classes()(num_classes=num_classes)


def _cifar_block_class():
    torch, nn = _nn()
    F = torch.nn.functional

    class BasicBlock(nn.Module):
        """The seed's CIFAR BasicBlock: conv1, bn1, conv2, bn2, shortcut."""

        expansion = 1

        def __init__(self, in_planes: int, planes: int, stride: int = 1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + self.shortcut(x))

    return BasicBlock


def mini_resnet(num_blocks: int = 4, in_planes: int = 256, num_classes: int = 10) -> Any:
    """The seed's CIFAR-10 MiniResNet: 3x3 stem ``3 -> in_planes``, ``num_blocks`` BasicBlocks, pool, linear.

    As in the seed, the blocks are also registered as ``block0``, ``block1``...
    (aliases of ``layer.0``...), so the seed's checkpoints load; aliases are not
    listed twice by ``named_modules()``.
    """
    torch, nn = _nn()
    F = torch.nn.functional
    BasicBlock = _cifar_block_class()

    class MiniResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, in_planes, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(in_planes)
            self.layer = nn.Sequential(*[BasicBlock(in_planes, in_planes) for _ in range(num_blocks)])
            for idx, block in enumerate(self.layer):
                setattr(self, f"block{idx}", block)
            self.flatten = nn.Flatten()
            self.avg_pool_2d = nn.AvgPool2d(8)
            self.linear = nn.Linear(in_planes * 16, num_classes)

        def forward(self, x):
            out = self.layer(F.relu(self.bn1(self.conv1(x))))
            return self.linear(self.flatten(self.avg_pool_2d(out)))

    return MiniResNet()


def cifar_resnet18(num_classes: int = 10, width: int = 64) -> Any:
    """The seed's CIFAR ResNet-18 (3x3 stem, no max-pool, widths w, 2w, 4w, 8w); 32x32 inputs."""
    torch, nn = _nn()
    F = torch.nn.functional
    BasicBlock = _cifar_block_class()

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [width, 2 * width, 4 * width, 8 * width]
            self.in_planes = widths[0]
            self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.layer1 = self._make_layer(widths[0], 2, 1)
            self.layer2 = self._make_layer(widths[1], 2, 2)
            self.layer3 = self._make_layer(widths[2], 2, 2)
            self.layer4 = self._make_layer(widths[3], 2, 2)
            self.avg_pool_2d = nn.AvgPool2d(4)
            self.linear = nn.Linear(widths[3], num_classes)

        def _make_layer(self, planes: int, n: int, stride: int):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(self.in_planes, planes, s))
                self.in_planes = planes
            return nn.Sequential(*blocks)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            return self.linear(self.avg_pool_2d(out).flatten(1))

    return ResNet()


# -------------------------------------------------------------------- ViT


def vit_b_16(num_classes: int = 1000, image_size: int = 224, num_layers: int = 12, hidden_dim: int = 768,
             num_heads: int = 12, mlp_dim: int = 3072, patch_size: int = 16) -> Any:
    """torchvision's ``vit_b_16`` structure (random weights).

    Per encoder block: ``ln_1``, ``self_attention`` (``nn.MultiheadAttention``,
    batch first, packed ``in_proj_weight`` of ``3 * hidden_dim`` rows plus an
    ``out_proj`` Linear), ``ln_2`` and ``mlp`` (``mlp.0`` Linear to ``mlp_dim``,
    GELU, dropout, ``mlp.3`` Linear back); blocks are
    ``encoder.layers.encoder_layer_<i>``; the head is ``heads.head``.
    """
    from collections import OrderedDict

    torch, nn = _nn()

    class MLPBlock(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                             nn.Linear(mlp_dim, hidden_dim), nn.Dropout(0.0))

    class EncoderBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = num_heads
            self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
            self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0, batch_first=True)
            self.dropout = nn.Dropout(0.0)
            self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
            self.mlp = MLPBlock()

        def forward(self, inputs):
            x = self.ln_1(inputs)
            x, _ = self.self_attention(x, x, x, need_weights=False)
            x = self.dropout(x) + inputs
            return x + self.mlp(self.ln_2(x))

    class Encoder(nn.Module):
        def __init__(self, seq_length: int):
            super().__init__()
            self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
            self.dropout = nn.Dropout(0.0)
            self.layers = nn.Sequential(OrderedDict(
                (f"encoder_layer_{i}", EncoderBlock()) for i in range(num_layers)))
            self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

        def forward(self, x):
            return self.ln(self.layers(self.dropout(x + self.pos_embedding)))

    class VisionTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.image_size = image_size
            self.patch_size = patch_size
            self.hidden_dim = hidden_dim
            self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, stride=patch_size)
            seq_length = (image_size // patch_size) ** 2 + 1
            self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
            self.encoder = Encoder(seq_length)
            self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))

        def forward(self, x):
            n = x.shape[0]
            x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
            x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
            return self.heads(self.encoder(x)[:, 0])

    return VisionTransformer()


# ------------------------------------------------------------------ GPT-2


def _conv1d_class():
    torch, nn = _nn()

    class Conv1D(nn.Module):
        """Hugging Face's GPT-2 ``Conv1D``: a linear layer with ``weight`` stored as ``(nx, nf)`` = (in, out).

        ``forward(x) = x @ weight + bias``; the class name is what
        :mod:`coar_dask.core.components` matches (kind ``conv1d``).
        """

        def __init__(self, nf: int, nx: int):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.empty(nx, nf).normal_(std=0.02))
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x):
            size_out = x.size()[:-1] + (self.nf,)
            x = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
            return x.view(size_out)

    return Conv1D


def Conv1D(nf: int, nx: int) -> Any:  # noqa: N802 - mirrors transformers' class
    """A GPT-2 ``Conv1D(nf, nx)`` (``nf`` outputs, ``nx`` inputs)."""
    return _conv1d_class()(nf, nx)


def gpt2_small(vocab_size: int = 50257, n_positions: int = 1024, n_embd: int = 768, n_layer: int = 12,
               n_head: int = 12) -> Any:
    """Hugging Face ``GPT2LMHeadModel(GPT2Config())``'s structure: ``forward(input_ids) -> logits (B, T, V)``.

    Module names as in ``transformers``: ``transformer.h.<i>.attn.c_attn``,
    ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` (``Conv1D``), ``ln_1``,
    ``ln_2``, ``transformer.wte``, ``wpe``, ``ln_f``, ``lm_head`` (tied to ``wte``).
    """
    torch, nn = _nn()
    F = torch.nn.functional
    C1D = _conv1d_class()

    class GPT2Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = C1D(3 * n_embd, n_embd)
            self.c_proj = C1D(n_embd, n_embd)
            self.attn_dropout = nn.Dropout(0.0)
            self.resid_dropout = nn.Dropout(0.0)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(n_embd, dim=2)
            q, k, v = (z.view(b, t, n_head, c // n_head).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))

    class GPT2MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = C1D(4 * n_embd, n_embd)
            self.c_proj = C1D(n_embd, 4 * n_embd)
            self.act = nn.GELU(approximate="tanh")
            self.dropout = nn.Dropout(0.0)

        def forward(self, x):
            return self.dropout(self.c_proj(self.act(self.c_fc(x))))

    class GPT2Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
            self.attn = GPT2Attention()
            self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
            self.mlp = GPT2MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT2Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab_size, n_embd)
            self.wpe = nn.Embedding(n_positions, n_embd)
            self.drop = nn.Dropout(0.0)
            self.h = nn.ModuleList(GPT2Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)

        def forward(self, input_ids):
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.drop(self.wte(input_ids) + self.wpe(pos))
            for block in self.h:
                x = block(x)
            return self.ln_f(x)

    class GPT2LMHeadModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = GPT2Model()
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight

        def forward(self, input_ids):
            return self.lm_head(self.transformer(input_ids))

    model = GPT2LMHeadModel()
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
            with torch.no_grad():
                p.normal_(std=0.02 / math.sqrt(2 * n_layer))
    return model
