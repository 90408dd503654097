"""Frozen ImageNet feature networks of the projected discriminator (recipe section E), in plain PyTorch.

Three networks whose state_dict names and shapes equal the released weight files, so those files load as is:
torchvision's vgg16_bn, timm's tf_efficientnet_lite0 and timm's deit_base_distilled_patch16_224. Each one
maps an image in [-1, 1] to the four feature maps ("taps") of recipe E.4. The cross-channel / cross-scale
projections and the mini-discriminators built on top of these taps live in gdd.py.

Weights: build_backbone(name, weights=PATH_OR_URL) reads a torch.save'd state dict (torch.load with
weights_only=True) or a .safetensors file (own reader below, no extra dependency). weights=None gives the
deterministic fill of tests/fixtures/backbones/README.md section 2, which is what --bench and the tests use.
"""

import json
import math
import os
import sys
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import edm_nets

BACKBONES = ('vgg16_bn', 'tf_efficientnet_lite0', 'deit_base_distilled_patch16_224')

# The files the official code loads (torchvision IMAGENET1K_V1; the timm 0.5.4 sources, recipe E.2).
# The same timm weights are also on the Hugging Face hub as safetensors (both formats load):
#   https://huggingface.co/timm/tf_efficientnet_lite0.in1k/resolve/main/model.safetensors
#   https://huggingface.co/timm/deit_base_distilled_patch16_224.fb_in1k/resolve/main/model.safetensors
WEIGHT_URLS = {
    'vgg16_bn': 'https://download.pytorch.org/models/vgg16_bn-6c64b313.pth',
    'tf_efficientnet_lite0': 'https://github.com/rwightman/pytorch-image-models/releases/download/'
                             'v0.1-weights/tf_efficientnet_lite0-0aa007d2.pth',
    'deit_base_distilled_patch16_224': 'https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth',
}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocess(x, mean, std, size=224):
    """Recipe E.3: [-1,1] -> [0,1] -> (x - mean) / std per channel -> bilinear resize to 224 (after the
    normalisation, align_corners=False, no antialiasing). The official code resizes only inputs below 224
    (and always for DeiT); every preset's data is 32 or 64 px, so here every input is brought to 224."""
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = ((x + 1) / 2 - mean) / std
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=False)
    return x


class FeatureNetwork(nn.Module):
    """Frozen backbone: forward(x in [-1,1], N x 3 x R x R) -> list of 4 tap maps. Always in eval mode, so
    BatchNorm uses the ImageNet running statistics (recipe E.9). Subclasses define taps() on a preprocessed
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
    tap_ends = (13, 23, 33, 43)   # recipe E.4: taps are features[0:13], [13:23], [23:33], [33:43]

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
# EfficientNet-lite0, TensorFlow port (timm layout). Recipe E.2: TF "SAME" padding, BatchNorm eps 1e-3, ReLU6,
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
    mean = std = (0.5, 0.5, 0.5)  # recipe E.3: the official code's "Inception" list, not ImageNet statistics
    channels = [24, 40, 112, 320]
    head_prefixes = ('conv_head.', 'bn2.', 'classifier.')
    stages = [(3, 1, 16, 1), (3, 2, 24, 2), (5, 2, 40, 2), (3, 2, 80, 3),   # (kernel, stride, channels, blocks)
              (5, 1, 112, 3), (5, 2, 192, 4), (3, 1, 320, 1)]
    tap_stages = ((0, 1), (2,), (3, 4), (5, 6))  # recipe E.4: stem + blocks[0:2], [2], [3:5], [5:7]

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
# DeiT-B distilled (timm layout): patch 16, width 768, 12 pre-norm blocks of 12 heads, tokens [cls, dist, 196].

class Attention(nn.Module):
    def __init__(self, dim=768, heads=12):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        # qkv outputs are laid out [q | k | v], each head-major (heads x 64).
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        # Explicit softmax(q k^T / sqrt(64)) v rather than fused attention kernels: R1 needs double backward.
        a = torch.softmax(q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, dim=768, hidden=3072):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, hidden), fc2=nn.Linear(hidden, dim)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))   # exact (erf) GELU


class DropTokens(nn.Module):
    """Readout 'ignore' (recipe E.4): drop the cls and distillation tokens."""
    def forward(self, x):
        return x[:, 2:]


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class DeiTBaseDistilled(FeatureNetwork):
    channels = [96, 192, 384, 768]
    head_prefixes = ('norm.', 'head.', 'head_dist.')
    random_prefixes = ('layer1.', 'layer2.', 'layer3.', 'layer4.')
    hooks = (2, 5, 8, 11)  # recipe E.4: outputs of these blocks (before the final LayerNorm) are the taps

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
        # Post-processing layers of recipe E.4 (random, frozen, in no released file): tokens -> 768x14x14 map
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

# ----------------------------------------------------------------------------------------------------------
# Building and weight loading.

NETWORKS = dict(zip(BACKBONES, (VGG16BN, TFEfficientNetLite0, DeiTBaseDistilled)))


@torch.no_grad()
def fill_deterministic_(net, keys=None):
    """Deterministic fill of tests/fixtures/backbones/README.md section 2: each tensor from its own generator
    seeded with crc32(key), so it depends only on the key and the shape. Keeps activations at a sane scale
    without any download (--bench, tests)."""
    for key, t in net.state_dict().items():
        if keys is not None and key not in keys:
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode('utf-8')))
        leaf, shape = key.rsplit('.', 1)[-1], t.shape
        if leaf == 'num_batches_tracked':
            v = torch.zeros(shape, dtype=torch.int64)
        elif leaf == 'running_mean':
            v = torch.randn(shape, generator=g) * 0.1
        elif leaf == 'running_var':
            v = torch.rand(shape, generator=g) + 0.5
        elif leaf in ('cls_token', 'dist_token', 'pos_embed'):
            v = torch.randn(shape, generator=g) * 1.0
        elif t.dim() == 1 and leaf == 'weight':
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif t.dim() == 1 and leaf == 'bias':
            v = 0.1 * torch.randn(shape, generator=g)
        elif t.dim() >= 2:
            v = torch.randn(shape, generator=g) * (1.0 / math.sqrt(t[0].numel()))
        else:
            raise ValueError(f'no fill rule for {key} {tuple(shape)}')
        t.copy_(v)


@torch.no_grad()
def init_random_layers_(net, seed=0):
    """PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, fan_in = weight[0]
    .numel(), drawn from a local generator so every rank builds the same frozen layers (recipe E.4)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.random_layers():
        bound = 1 / math.sqrt(m.weight[0].numel())
        for p in (m.weight, m.bias):
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)


SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                      'U8': torch.uint8, 'BOOL': torch.bool}


SAFETENSORS_MAX_HEADER = 100 * 2**20   # the format's own limit on the JSON header


def read_safetensors(path):
    """Read a .safetensors file: u64 little-endian header size N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (plus optional __metadata__), then the raw little-endian C-order bytes.
    Checked as the format requires: header within the file and at most 100 MB, no duplicate names, int shapes,
    and the data ranges, sorted, must tile the data section exactly (no overlap, no gap, nothing after)."""
    if sys.byteorder != 'little':
        raise ValueError('reading safetensors needs a little-endian machine')
    with open(path, 'rb') as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(data)
    if len(data) < 8:
        raise ValueError(f'{path}: not a safetensors file (too short)')
    n = int.from_bytes(data[:8], 'little')
    if n > min(len(data) - 8, SAFETENSORS_MAX_HEADER):
        raise ValueError(f'{path}: safetensors header size {n} exceeds the file or the 100 MB limit')

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f'duplicate name {next(k for k in keys if keys.count(k) > 1)!r}')
        return dict(pairs)
    try:
        header = json.loads(bytes(data[8:8 + n]).decode('utf-8'), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f'{path}: safetensors header is not valid JSON ({str(e)[:200]})') from None
    if not isinstance(header, dict):
        raise ValueError(f'{path}: safetensors header is not a JSON object')
    base, entries = 8 + n, []
    for name, info in header.items():
        if name == '__metadata__':
            continue
        ok = isinstance(info, dict) and info.get('dtype') in SAFETENSORS_DTYPES and isinstance(info.get('shape'), list)
        shape, offsets = (info.get('shape'), info.get('data_offsets')) if ok else (None, None)
        ok = ok and len(shape) <= 16 and all(type(s) is int and s >= 0 for s in shape) and isinstance(offsets, list) \
            and len(offsets) == 2 and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]
        if not ok:
            raise ValueError(f'{path}: bad safetensors entry for {name!r:.80}: {str(info)[:200]}')
        dtype = SAFETENSORS_DTYPES[info['dtype']]
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise ValueError(f'{path}: safetensors entry {name!r:.80} has {offsets[1] - offsets[0]} bytes for shape {shape} {info["dtype"]}')
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort()
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            raise ValueError(f'{path}: safetensors data of {name!r:.80} starts at {begin}, expected {pos} '
                             f'({"overlaps the previous tensor" if begin < pos else "a gap"})')
        pos = end
    if pos != len(data) - base:
        raise ValueError(f'{path}: safetensors data section has {len(data) - base} bytes, the header describes {pos}')
    out = {}
    for begin, _, name, dtype, shape in entries:
        numel = math.prod(shape)
        t = torch.frombuffer(data, dtype=dtype, count=numel, offset=base + begin) if numel else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


def read_state_dict(path):
    """Flat name -> tensor dict from a .safetensors file or a torch.save'd state dict (edm_nets.load_torch_file:
    validated torch.load with weights_only=True, no code from the file runs). The legacy DeiT release nests it
    under 'model'."""
    with open(path, 'rb') as f:
        head = f.read(9)
    if str(path).endswith('.safetensors') or (len(head) == 9 and head[8:9] == b'{'):
        return read_safetensors(path)
    sd = edm_nets.load_torch_file(path)
    if isinstance(sd, dict) and isinstance(sd.get('model'), dict):
        sd = sd['model']
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f'{path}: not a state dict (expected a dict of name -> tensor)')
    return sd


def _resolve(name, source):
    hint = f'download {WEIGHT_URLS[name]} and pass its local path'
    if str(source).startswith(('http://', 'https://')):
        try:
            return edm_nets.open_url(source)   # URL download + cache shared with load_network
        except OSError as e:
            msg = (str(e).splitlines() or [''])[0]
            if source not in msg:
                msg = f'could not download {source} ({msg}); download it elsewhere and pass the local path'
            raise OSError(f'{msg} (train_min.py: --backbone-weights {name}=PATH)') from None
    from pathlib import Path
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f'{name} weights not found at {path}; {hint}')
    return path


@torch.no_grad()
def load_weights_(net, name, source):
    """Strict load of released weights into the pretrained part of `net`. Tolerated: absent
    num_batches_tracked counters (older files; set to 0) and, when net has no classifier, the head keys
    (dropped on purpose). Anything else missing, unexpected or mis-shaped is an error."""
    path = _resolve(name, source)
    sd = read_state_dict(path)
    own = {k: v for k, v in net.state_dict().items() if net.is_pretrained_key(k)}
    missing = [k for k in own if k not in sd and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in sd if k not in own and not k.startswith(net.head_prefixes)]
    wrong = [f'{k} {tuple(sd[k].shape)} {sd[k].dtype} vs {tuple(v.shape)} {v.dtype}' for k, v in own.items()
             if k in sd and (sd[k].shape != v.shape or sd[k].dtype != v.dtype)]   # no silent casts
    if missing or unexpected or wrong:
        def few(ks):
            return ', '.join(ks[:4]) + (f' (+{len(ks) - 4} more)' if len(ks) > 4 else '')
        raise ValueError(f'{path} is not a {name} state dict: missing [{few(missing)}], unexpected [{few(unexpected)}], '
                         f'shape or dtype mismatch [{few(wrong)}]')
    for k in own:
        if k in sd and not edm_nets.all_finite(sd[k]):
            raise ValueError(f'{path}: tensor {k} has non-finite values (NaN or inf)')
    for k, v in own.items():
        v.copy_(sd[k] if k in sd else torch.zeros_like(v))


def build_backbone(name, weights=None, seed=0, classifier=False):
    """Frozen feature network `name` (one of BACKBONES) in eval mode.
    weights: None -> deterministic fill (fill_deterministic_); a local path or http(s) URL -> released weights.
    seed: seeds the random frozen DeiT post-processing layers (recipe E.4); unused by the other two.
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
