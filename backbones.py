"""Frozen feature networks in plain PyTorch: the projected discriminator's and the metrics'.

Three ImageNet networks whose state_dict names and shapes equal the released weight files, so those files load
as is: torchvision's vgg16_bn, timm's tf_efficientnet_lite0 and timm's deit_base_distilled_patch16_224 (the
official code's choices, train.py:234-241). Each one maps an image in [-1, 1] to four feature maps ("taps"), as
the official pg_modules/projector.py taps them. And, for the offline toy demo, TeacherFeatures: the frozen
teacher's own encoder. The cross-channel / cross-scale projections and the mini-discriminators built on top of
these taps live in gdd.py.

For the metrics of fid_min.py: CLIP ViT-B/32's image encoder (FD_CLIP) and DINOv2 ViT-L/14 (FD_DINOv2), with the
names of OpenAI's and Meta's released files; they share the transformer block and attention with DeiT.

Weights: build_backbone(name, weights=PATH_OR_URL) reads a torch.save'd state dict or a .safetensors file
through safe_files.read_state_dict (no code from the file runs); build_metric_network(name, weights) likewise,
and also OpenAI's TorchScript archive (its tensors only). weights=None gives the deterministic fill of
tests/fixtures/backbones/README.md section 2 (tests/fixtures/metrics/README.md section 1), which is what --bench
and the tests use.
"""

import copy
import math
import zlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import safe_files

BACKBONES = ('vgg16_bn', 'tf_efficientnet_lite0', 'deit_base_distilled_patch16_224')

# The files the official code loads (torchvision IMAGENET1K_V1; the timm 0.5.4 sources it pins).
# The same timm weights are also on the Hugging Face hub as safetensors (both formats load):
#   https://huggingface.co/timm/tf_efficientnet_lite0.in1k/resolve/main/model.safetensors
#   https://huggingface.co/timm/deit_base_distilled_patch16_224.fb_in1k/resolve/main/model.safetensors
WEIGHT_URLS = {
    'vgg16_bn': 'https://download.pytorch.org/models/vgg16_bn-6c64b313.pth',
    'tf_efficientnet_lite0': 'https://github.com/rwightman/pytorch-image-models/releases/download/'
                             'v0.1-weights/tf_efficientnet_lite0-0aa007d2.pth',
    'deit_base_distilled_patch16_224': 'https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth',
    # The metrics' feature networks (fid_min.py). OpenAI's file is a TorchScript archive, read without running it;
    # open_clip's copy of the same weights, https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/
    # open_clip_model.safetensors, has the same names and loads too.
    'clip_vit_b_32': 'https://openaipublic.azureedge.net/clip/models/'
                     '40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt',
    'dinov2_vitl14': 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth',
}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocess(x, mean, std, size=224):
    """Each feature network's input, as the official projected discriminator prepares it (its forward in
    pg_modules/discriminator.py, after Projected GAN): [-1,1] -> [0,1] -> (x - mean) / std per channel -> bilinear
    resize to 224 (after the normalisation, align_corners=False, no antialiasing). The official code resizes only
    inputs below 224 (and always for DeiT); every preset's data is 32 or 64 px, so every input is brought to 224."""
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = ((x + 1) / 2 - mean) / std
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=False)
    return x


class FeatureNetwork(nn.Module):
    """Frozen backbone: forward(x in [-1,1], N x 3 x R x R) -> list of 4 tap maps. Always in eval mode, so
    BatchNorm uses the ImageNet running statistics, as in the official code. Subclasses define taps() on a preprocessed
    224x224 input, and logits() when built with classifier=True (used by the fingerprint tests)."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    channels = []                 # channel counts of the 4 taps returned by forward()
    head_prefixes = ()            # state_dict keys of the classifier head, dropped when classifier=False
    random_prefixes = ()          # frozen, randomly initialised layers that are in no released file

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x):
        return self.taps(preprocess(x, self.mean, self.std))

    def random_layers(self):
        return [m for name, m in self.named_modules()
                if name.startswith(self.random_prefixes) and isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]

    def is_pretrained_key(self, key):
        return not key.startswith(self.random_prefixes)

# ----------------------------------------------------------------------------------------------------------
# VGG16-BN (torchvision layout): `features` = 13 x (conv3x3 pad 1 -> BN eps 1e-5 -> ReLU), max pools at 6, 13,
# 23, 33, 43.

class VGG16BN(FeatureNetwork):
    channels = [128, 256, 512, 512]
    head_prefixes = ('classifier.',)
    cfg = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M']
    tap_ends = (13, 23, 33, 43)   # taps are features[0:13], [13:23], [23:33], [33:43] (the final pool excluded)

    def __init__(self, classifier=False):  # classifier: also build avgpool + classifier (logits())
        super().__init__()
        layers, c_in = [], 3
        for c in self.cfg:
            layers += [nn.MaxPool2d(2, 2)] if c == 'M' else [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c if c != 'M' else c_in
        self.features = nn.Sequential(*layers)
        if classifier:
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(),
                                            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 1000))

    def taps(self, x):
        out, start = [], 0
        for end in self.tap_ends:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    def logits(self, x):
        x = self.features[43](self.taps(x)[-1])
        return self.classifier(torch.flatten(self.avgpool(x), 1))

# ----------------------------------------------------------------------------------------------------------
# EfficientNet-lite0, TensorFlow port (timm layout; the weights were trained in TensorFlow): TF "SAME" padding, BatchNorm eps 1e-3, ReLU6,
# no squeeze-excitation.

class Conv2dSame(nn.Conv2d):
    """TF 'SAME' padding computed from the input size: total = max((ceil(n/s) - 1)*s + k - n, 0), with
    total//2 before and the rest after (the extra pixel goes right/bottom)."""
    def forward(self, x):
        pad = []
        for n, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):   # width first (F.pad order)
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pad += [total // 2, total - total // 2]
        return self._conv_forward(F.pad(x, pad), self.weight, self.bias)


def tf_conv(c_in, c_out, k, stride=1, groups=1):
    # For stride 1 TF 'SAME' is the symmetric padding (k-1)/2 (odd k), which the built-in conv does faster.
    if stride == 1:
        return nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False)
    return Conv2dSame(c_in, c_out, k, stride, groups=groups, bias=False)


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm (TF eps 1e-3) followed by ReLU6 when act=True (timm's BatchNormAct2d, same keys)."""
    def __init__(self, c, act=True):
        super().__init__(c, eps=1e-3)
        self.act = act

    def forward(self, x):
        x = super().forward(x)
        return F.relu6(x) if self.act else x


class DepthwiseSeparable(nn.Module):
    """Stage 0: depthwise 3x3 -> BN + ReLU6 -> 1x1 -> BN (no activation, no residual: 32 -> 16 channels)."""
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv_dw, self.bn1 = tf_conv(c_in, c_in, 3, groups=c_in), BatchNormAct(c_in)
        self.conv_pw, self.bn2 = tf_conv(c_in, c_out, 1), BatchNormAct(c_out, act=False)

    def forward(self, x):
        return self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))


class InvertedResidual(nn.Module):
    """1x1 expand x6 -> BN + ReLU6 -> depthwise kxk (stride s) -> BN + ReLU6 -> 1x1 project -> BN, plus the
    input when stride is 1 and the channels are unchanged."""
    def __init__(self, c_in, c_out, k, stride, expand=6):
        super().__init__()
        c_mid = c_in * expand
        self.conv_pw, self.bn1 = tf_conv(c_in, c_mid, 1), BatchNormAct(c_mid)
        self.conv_dw, self.bn2 = tf_conv(c_mid, c_mid, k, stride, groups=c_mid), BatchNormAct(c_mid)
        self.conv_pwl, self.bn3 = tf_conv(c_mid, c_out, 1), BatchNormAct(c_out, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return x + y if self.residual else y


class TFEfficientNetLite0(FeatureNetwork):
    mean = std = (0.5, 0.5, 0.5)  # the official code's "Inception" normalisation, not ImageNet statistics
    channels = [24, 40, 112, 320]
    head_prefixes = ('conv_head.', 'bn2.', 'classifier.')
    stages = [(3, 1, 16, 1), (3, 2, 24, 2), (5, 2, 40, 2), (3, 2, 80, 3),   # (kernel, stride, channels, blocks)
              (5, 1, 112, 3), (5, 2, 192, 4), (3, 1, 320, 1)]
    tap_stages = ((0, 1), (2,), (3, 4), (5, 6))  # stem + blocks[0:2], [2], [3:5], [5:7]; the head unused

    def __init__(self, classifier=False):  # classifier: also build conv_head, bn2, classifier (logits())
        super().__init__()
        self.conv_stem, self.bn1 = tf_conv(3, 32, 3, 2), BatchNormAct(32)
        stages, c_in = [], 32
        for i, (k, s, c, n) in enumerate(self.stages):
            blocks = [DepthwiseSeparable(c_in, c) if i == 0 else InvertedResidual(c_in if j == 0 else c, c, k, s if j == 0 else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.blocks = nn.Sequential(*stages)
        if classifier:
            self.conv_head, self.bn2 = tf_conv(320, 1280, 1), BatchNormAct(1280)
            self.classifier = nn.Linear(1280, 1000)

    def taps(self, x):
        x, out = self.bn1(self.conv_stem(x)), []
        for stage_ids in self.tap_stages:
            for i in stage_ids:
                x = self.blocks[i](x)
            out.append(x)
        return out

    def logits(self, x):
        x = self.bn2(self.conv_head(self.taps(x)[-1]))
        return self.classifier(x.mean((2, 3)))

# ----------------------------------------------------------------------------------------------------------
# Vision transformers (Dosovitskiy et al. 2021). One pre-norm block serves DeiT-B distilled (the discriminator's
# features: patch 16, width 768, 12 blocks of 12 heads, tokens [cls, dist, 196]) and DINOv2 ViT-L/14 (FD_DINOv2,
# with LayerScale); CLIP's image encoder (FD_CLIP) uses the same attention under OpenAI's names, with QuickGELU.

def attention(qkv, heads):
    """softmax(q k^T / sqrt(d)) v of every head, from the fused projection qkv (B, T, 3C) whose features are laid out
    [q | k | v], each head-major (heads x d): (B, T, C), before the output projection. Written out rather than a
    fused kernel: R1 needs its double backward."""
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = qkv.view(B, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)     # (B, nh, T, hs)
    a = torch.softmax(q @ k.transpose(-2, -1) * (C // heads) ** -0.5, dim=-1)
    return (a @ v).transpose(1, 2).reshape(B, T, C)


class Attention(nn.Module):
    def __init__(self, dim=768, heads=12):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(attention(self.qkv(x), self.heads))


class LayerScale(nn.Module):
    """DINOv2's learned per-channel scale of each residual branch (LayerScale of CaiT, Touvron et al. 2021)."""
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block (timm and DINOv2 names): x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))),
    LayerNorm eps 1e-6, exact (erf) GELU. DeiT has no LayerScale (ls1, ls2 are identities), DINOv2 has."""
    def __init__(self, dim=768, hidden=3072, heads=12, layer_scale=False):
        super().__init__()
        scale = (lambda: LayerScale(dim)) if layer_scale else nn.Identity
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), scale()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, hidden), fc2=nn.Linear(hidden, dim)))
        self.ls2 = scale()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)))))


class DropTokens(nn.Module):
    """Readout 'ignore' (DPT's readout option, as the official projector uses it): drop the cls and distillation tokens."""
    def forward(self, x):
        return x[:, 2:]


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class DeiTBaseDistilled(FeatureNetwork):
    channels = [96, 192, 384, 768]
    head_prefixes = ('norm.', 'head.', 'head_dist.')
    random_prefixes = ('layer1.', 'layer2.', 'layer3.', 'layer4.')
    hooks = (2, 5, 8, 11)  # outputs of these blocks (before the final LayerNorm) are the taps

    def __init__(self, classifier=False, dim=768, depth=12):  # classifier: also build norm, head, head_dist
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + 14 * 14, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        if classifier:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.head, self.head_dist = nn.Linear(dim, 1000), nn.Linear(dim, 1000)
        # Post-processing layers of the official projector (random, frozen, in no released file): tokens -> 768x14x14 map
        # (indices 0..2, parameter-free), then convs to 96x56x56, 192x28x28, 384x14x14, 768x7x7. The names
        # layerN.M follow the official projector so that the fixtures' keys apply.
        def post(*convs):
            return nn.Sequential(DropTokens(), Transpose(), nn.Unflatten(2, (14, 14)), *convs)
        self.layer1 = post(nn.Conv2d(dim, 96, 1), nn.ConvTranspose2d(96, 96, 4, stride=4))
        self.layer2 = post(nn.Conv2d(dim, 192, 1), nn.ConvTranspose2d(192, 192, 2, stride=2))
        self.layer3 = post(nn.Conv2d(dim, 384, 1))
        self.layer4 = post(nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 3, stride=2, padding=1))

    def embed(self, x):
        # Patch tokens row-major over the 14x14 grid, then [cls, dist, patches] + pos_embed. The official code
        # resizes pos_embed to the grid; inputs are always resized to 224 here, where that is the identity.
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)                        # (B, 196, 768)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], dim=1)
        return x + self.pos_embed

    def tokens(self, x):
        """Raw outputs of blocks 2, 5, 8, 11: 4 x (B, 198, 768)."""
        x, out = self.embed(x), []
        for i, block in enumerate(self.blocks[:self.hooks[-1] + 1]):
            x = block(x)
            if i in self.hooks:
                out.append(x)
        return out

    def taps(self, x):
        return [layer(t) for layer, t in zip((self.layer1, self.layer2, self.layer3, self.layer4), self.tokens(x))]

    def logits(self, x):
        x = self.norm(self.blocks(self.embed(x)))
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2   # eval-mode distilled classifier


class CLIPAttention(nn.Module):
    """The parameters of torch.nn.MultiheadAttention, which OpenAI's CLIP uses: in_proj_weight rows [q | k | v]."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight, self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, dim)), nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.out_proj(attention(F.linear(x, self.in_proj_weight, self.in_proj_bias), self.heads))


class CLIPBlock(nn.Module):
    """CLIP's ResidualAttentionBlock (openai/CLIP clip/model.py): Block under OpenAI's names, LayerNorm eps 1e-5 and
    QuickGELU x * sigmoid(1.702 x), the activation the released weights were trained with (not erf GELU)."""
    def __init__(self, dim, heads):
        super().__init__()
        self.attn, self.ln_1 = CLIPAttention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(dim, 4 * dim), c_proj=nn.Linear(4 * dim, dim)))
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class CLIPImageEncoder(nn.Module):
    """CLIP ViT-B/32's image encoder (Radford et al. 2021; VisionTransformer of openai/CLIP clip/model.py), with the
    names of ViT-B-32.pt after 'visual.'. forward(x normalised, B x 3 x 224 x 224) -> the 512-d embedding after the
    projection, not L2-normalised (clean-fid's CLIP-FID feature); project=False gives the 768-d ln_post output."""
    def __init__(self, width=768, layers=12, patch=32, grid=7, out_dim=512):
        super().__init__()
        self.resolution = patch * grid
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.proj = nn.Parameter(torch.empty(width, out_dim))
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[CLIPBlock(width, width // 64) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x, project=True):
        x = self.conv1(x).flatten(2).transpose(1, 2)                    # (B, 49, 768), row-major over the 7x7 grid
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_post(self.transformer.resblocks(self.ln_pre(x))[:, 0])
        return x @ self.proj if project else x


class DINOv2(nn.Module):
    """DINOv2 ViT-L/14 (Oquab et al. 2024; facebookresearch/dinov2 dinov2/models/vision_transformer.py), with the
    names of dinov2_vitl14_pretrain.pth. forward(x normalised, B x 3 x 224 x 224) -> the final-normed class token
    (B, 1024), EDM2's FD_DINOv2 feature."""
    def __init__(self, dim=1024, depth=24, patch=14, grid=37, hidden=4096):
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + grid * grid, dim))    # the 37x37 grid of 518-pixel training
        self.mask_token = nn.Parameter(torch.empty(1, dim))                      # in the file; used in training only
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[Block(dim, hidden, dim // 64, layer_scale=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def pos_embed_for(self, h, w):
        """pos_embed for an h x w patch grid as DINOv2's interpolate_pos_encoding resamples it: token 0 kept, the
        37x37 grid resized by bicubic interpolation (a = -0.75, no antialiasing) with the scale factor (h + 0.1) / 37,
        not to a size, so at 224 pixels output i samples the source at (i + 0.5) * 37 / 16.1 - 0.5. DINOv2 does it
        in float32; here in the model's dtype (float32 in use, float64 in the tests)."""
        n = math.isqrt(self.pos_embed.shape[1] - 1)
        if (h, w) == (n, n):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode='bicubic', antialias=False)
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, x):
        x = self.patch_embed.proj(x)                                    # (B, 1024, 16, 16)
        pos = self.pos_embed_for(*x.shape[-2:])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + pos
        return self.norm(self.blocks(x))[:, 0]

# ----------------------------------------------------------------------------------------------------------
# Building and weight loading.

NETWORKS = dict(zip(BACKBONES, (VGG16BN, TFEfficientNetLite0, DeiTBaseDistilled)))


@torch.no_grad()
def fill_deterministic_(net, keys=None, prefix=''):
    """Deterministic fill of tests/fixtures/backbones/README.md section 2 and tests/fixtures/metrics/README.md
    section 1: each tensor from its own generator seeded with crc32(prefix + key), so it depends only on the key and
    the shape (prefix: 'visual.' for CLIP, whose file names its encoder so). Keeps activations at a sane scale
    without any download (--bench, tests)."""
    for key, t in net.state_dict().items():
        if keys is not None and key not in keys:
            continue
        g = torch.Generator().manual_seed(zlib.crc32((prefix + key).encode('utf-8')))
        leaf, shape = key.rsplit('.', 1)[-1], t.shape
        if leaf == 'num_batches_tracked':
            v = torch.zeros(shape, dtype=torch.int64)
        elif leaf == 'running_mean':
            v = torch.randn(shape, generator=g) * 0.1
        elif leaf == 'running_var':
            v = torch.rand(shape, generator=g) + 0.5
        elif leaf in ('cls_token', 'dist_token', 'pos_embed', 'mask_token', 'class_embedding', 'positional_embedding'):
            v = torch.randn(shape, generator=g) * 1.0
        elif leaf == 'gamma':
            v = 0.5 + 0.1 * torch.randn(shape, generator=g)
        elif t.dim() == 1 and leaf == 'weight':
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif t.dim() == 1 and leaf.endswith('bias'):
            v = 0.1 * torch.randn(shape, generator=g)
        elif t.dim() >= 2:
            v = torch.randn(shape, generator=g) * (1.0 / math.sqrt(t[0].numel()))
        else:
            raise ValueError(f'no fill rule for {key} {tuple(shape)}')
        t.copy_(v)


@torch.no_grad()
def default_init_(conv, generator):
    """PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, fan_in =
    weight[0].numel(), drawn from a local generator so that every rank builds the same frozen random layers."""
    bound = 1 / math.sqrt(conv.weight[0].numel())
    for p in (conv.weight, conv.bias):
        p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)


def init_random_layers_(net, seed=0):
    """The frozen random layers of `net` (DeiT's post-processing) by default_init_, from a generator seeded with seed."""
    g = torch.Generator().manual_seed(seed)
    for m in net.random_layers():
        default_init_(m, g)


WEIGHT_OPTIONS = {'clip_vit_b_32': 'fid_min.py: --clip-weights PATH', 'dinov2_vitl14': 'fid_min.py: --dinov2-weights PATH'}


def resolve_weights(name, source):
    """Local path of a weight file: `source` itself, or an http(s) URL downloaded once into the cache. A missing
    file or a failed download is one line naming what to download and which option takes it."""
    hint = f'download {WEIGHT_URLS[name]} and pass its local path'
    option = WEIGHT_OPTIONS.get(name, f'train_min.py: --backbone-weights {name}=PATH')
    if safe_files.is_url(source):
        try:
            return safe_files.open_url(source)   # URL download + cache shared with load_network
        except OSError as e:
            msg = cli.error_line(e)
            if source not in msg:
                msg = f'could not download {source} ({msg}); download it elsewhere and pass the local path'
            raise OSError(f'{msg} ({option})') from None
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f'{name} weights not found at {path}; {hint} ({option})')
    return path


@torch.no_grad()
def load_weights_(net, name, source):
    """Strict load of released weights into the pretrained part of `net` (safe_files.check_tensors). Tolerated:
    absent num_batches_tracked counters (older files; set to 0) and, when net has no classifier, the head keys
    (dropped on purpose). Anything else missing, unexpected or mis-shaped is an error."""
    path = resolve_weights(name, source)
    sd = safe_files.read_state_dict(path)
    own = {k: v for k, v in net.state_dict().items() if net.is_pretrained_key(k)}
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(net.head_prefixes)}
    sd.update({k: torch.zeros_like(v) for k, v in own.items() if k.endswith('num_batches_tracked') and k not in sd})
    safe_files.check_tensors(sd, own, f'{path}: not a {name} state dict')
    for k, v in own.items():
        v.copy_(sd[k])


def build_backbone(name, weights=None, seed=0, classifier=False):
    """Frozen feature network `name` (one of BACKBONES) in eval mode.
    weights: None -> deterministic fill (fill_deterministic_); a local path or http(s) URL -> released weights.
    seed: seeds the random frozen DeiT post-processing layers; unused by the other two.
    classifier: also build the ImageNet classifier head (for logits(); the tests check it)."""
    if name not in NETWORKS:
        raise ValueError(f'unknown backbone {name!r}; choose from {", ".join(BACKBONES)}')
    with torch.device('meta'):           # no default init: every tensor is filled or loaded below
        net = NETWORKS[name](classifier=classifier)
    net = net.to_empty(device='cpu')
    init_random_layers_(net, seed)
    if weights is None:
        fill_deterministic_(net, keys={k for k in net.state_dict() if net.is_pretrained_key(k)})
    else:
        load_weights_(net, name, weights)
    return net.requires_grad_(False).eval()


METRIC_NETWORKS = {'clip_vit_b_32': CLIPImageEncoder, 'dinov2_vitl14': DINOv2}


def metric_network_sizes(name, sd):
    """Constructor arguments read off a state dict's shapes, as openai/CLIP's build_model does for CLIP: the released
    files give the defaults of the classes (ViT-B/32, ViT-L/14), small stand-ins (the tests) smaller networks."""
    blocks = lambda head, i: len({k.split('.')[i] for k in sd if k.startswith(head)})
    try:
        if name == 'clip_vit_b_32':
            conv, pos = sd['conv1.weight'], sd['positional_embedding']
            sizes = dict(width=conv.shape[0], layers=blocks('transformer.resblocks.', 2), patch=conv.shape[-1],
                         grid=math.isqrt(pos.shape[0] - 1), out_dim=sd['proj'].shape[-1])
        else:
            conv, pos = sd['patch_embed.proj.weight'], sd['pos_embed']
            sizes = dict(dim=conv.shape[0], depth=blocks('blocks.', 1), patch=conv.shape[-1],
                         grid=math.isqrt(pos.shape[-2] - 1), hidden=sd['blocks.0.mlp.fc1.weight'].shape[0])
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f'not a {name} state dict (no {cli.error_line(e)})') from None
    if not all(v >= 1 for v in sizes.values()) or sizes.get('width', sizes.get('dim')) % 64:
        raise ValueError(f'not a {name} state dict (sizes {sizes}; the width must be a multiple of the 64-channel heads)')
    return sizes


def build_metric_network(name, weights=None):
    """Frozen feature network of a metric in eval mode: 'clip_vit_b_32' (CLIPImageEncoder) or 'dinov2_vitl14' (DINOv2).
    weights: None -> the released sizes with the deterministic fill (fill_deterministic_); a local path or http(s)
    URL -> a released file, read by safe_files.read_state_dict (OpenAI's TorchScript ViT-B-32.pt, open_clip's
    safetensors, DINOv2's .pth). CLIP takes the 'visual.*' tensors of the whole model. The sizes come from the
    file's shapes and every tensor must then match by name and shape; float16 / bfloat16 values are cast to float32
    (how clip.load runs on a CPU), so the network always computes in float32."""
    if name not in METRIC_NETWORKS:
        raise ValueError(f'unknown metric network {name!r}; choose from {", ".join(METRIC_NETWORKS)}')
    prefix = 'visual.' if name == 'clip_vit_b_32' else ''
    if weights is None:
        with torch.device('meta'):
            net = METRIC_NETWORKS[name]()
        net = net.to_empty(device='cpu')
        fill_deterministic_(net, prefix=prefix)
        return net.requires_grad_(False).eval()
    path = resolve_weights(name, weights)
    sd = {k[len(prefix):]: v for k, v in safe_files.read_state_dict(path).items() if k.startswith(prefix)}
    sd = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in sd.items()}
    try:
        with torch.device('meta'):
            net = METRIC_NETWORKS[name](**metric_network_sizes(name, sd))
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    safe_files.check_tensors(sd, net.state_dict(), f'{path}: not a {name} state dict')
    net = net.to_empty(device='cpu')
    net.load_state_dict(sd)
    return net.requires_grad_(False).eval()

# ----------------------------------------------------------------------------------------------------------
# The toy demo's feature network: the teacher's own encoder (no download).

TEACHER_FEATURE_SIGMA = 0.5     # noise level at which the teacher encoder looks at images (see TeacherFeatures)

class _StopForward(Exception):
    pass


class TeacherFeatures(nn.Module):
    """The frozen teacher's U-Net encoder as a feature network (no download needed). The clean image is given
    to the denoiser labelled with a fixed small noise level sigma (no noise is added, so the features are
    deterministic and R1 sees a fixed function); the maps are the encoder outputs at the end of each
    resolution level (R, R/2, ...). The decoder is never run: a hook stops the forward after the last tap.
    sigma = 0.5 = sigma_data: at a large sigma a denoiser sees only the coarse layout (README, toy demo). Not
    the paper's discriminator, which uses ImageNet classifiers. Class labels are not passed (a conditional
    teacher sees its all-zero label row); the discriminator's conditional head handles the classes."""
    def __init__(self, teacher, sigma=TEACHER_FEATURE_SIGMA):
        super().__init__()
        self.net = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.sigma = sigma
        enc = self.net.model.enc
        last = {}                                   # resolution prefix '16x16' -> last module of that level
        for name in enc:
            last[name.split('_')[0]] = name
        self.tap_names = list(last.values())
        self._maps = None
        for i, name in enumerate(self.tap_names):
            enc[name].register_forward_hook(self._hook(i))
        R = teacher.img_resolution
        with torch.no_grad():
            self.channels = [m.shape[1] for m in self(torch.zeros([1, teacher.img_channels, R, R], device=next(self.net.parameters()).device))]

    def _hook(self, i):
        def hook(module, inputs, output):
            self._maps.append(output)
            if i == len(self.tap_names) - 1:
                raise _StopForward
        return hook

    def train(self, mode=True):
        return super().train(False)                 # frozen: dropout off, always

    def forward(self, x):
        self._maps = []
        sigma = torch.full([x.shape[0]], self.sigma, device=x.device)
        try:
            self.net(x, sigma, None, force_fp32=True)
        except _StopForward:
            pass
        maps, self._maps = self._maps, None
        return maps
