"""EDM networks (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"),
written to load the official EDM checkpoints exactly and safely.

- Layers, SongUNet (DDPM++ / NCSN++), DhariwalUNet (ADM) and the preconditioning wrappers EDMPrecond,
  VPPrecond, VEPrecond, iDDPMPrecond. Constructor keyword arguments and state_dict names/shapes are those of
  the official checkpoints (edm-network-facts.md), so load_state_dict(strict=True) works for every official file.
- The validation layer for every file from outside (section "Untrusted files"): read_pickle for EDM's pickles
  (an inert pickle machine: nothing from the file runs, nothing real is handed to it), load_torch_file (a
  validated torch.load), NpzFile, and load_network() for EDM pickles and this project's own checkpoints.
- edm_sampler: EDM's Heun sampler (EDM paper, Algorithm 2), the multi-step teacher baseline.

Mixed precision (recipe A.4, quirk I.11): with use_fp16 the U-Net runs in bfloat16 on CUDA, not via autocast.
Convolutions and linear layers cast their fp32 master weights to the input dtype; the noise embedding, the
mapping MLP and the per-block affine layers see fp32 inputs (so they run in fp32), GroupNorm and the attention
softmax are computed in fp32, and the wrapper casts the U-Net output back to fp32.
"""

import collections
import contextlib
import copy
import functools
import hashlib
import inspect
import io
import math
import os
import pickle
import pickletools
import re
import sys
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Layers. Parameters are fp32 masters cast to the dtype of the input, which is all the bf16 path needs.

def _param(shape, init_mode, fan_in, fan_out, gain):
    """Random fp32 parameter with EDM's init modes (checkpoints overwrite it): gain * w with w ~ U(-a, a),
    a = sqrt(6 / (fan_in + fan_out)) for 'xavier_uniform' or sqrt(3 / fan_in) for 'kaiming_uniform',
    or w ~ N(0, 1 / fan_in) for 'kaiming_normal'."""
    if init_mode == 'kaiming_normal':
        w = math.sqrt(1 / fan_in) * torch.randn(shape)
    elif init_mode in ('xavier_uniform', 'kaiming_uniform'):
        a = math.sqrt(6 / (fan_in + fan_out)) if init_mode == 'xavier_uniform' else math.sqrt(3 / fan_in)
        w = a * (2 * torch.rand(shape) - 1)
    else:
        raise ValueError(f'unknown init_mode {init_mode!r}')
    return torch.nn.Parameter(w * gain)


# Initialisation of the U-Nets' layers by role, (init_mode, weight gain, bias gain) as in EDM. 'out' layers end a
# residual branch (or the network) and start at ~0, so every block starts close to the identity. ADM's
# kaiming_uniform * sqrt(1/3) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. PyTorch's default layer init.
INIT = {'song': {'layer': ('xavier_uniform', 1, 0), 'out': ('xavier_uniform', 1e-5, 0),
                 'qkv': ('xavier_uniform', math.sqrt(0.2), 0)},
        'adm': {'layer': ('kaiming_uniform', math.sqrt(1 / 3), math.sqrt(1 / 3)), 'out': ('kaiming_uniform', 0, 0),
                'qkv': ('kaiming_uniform', math.sqrt(1 / 3), math.sqrt(1 / 3))}}

def _init(scheme, role):
    mode, weight_gain, bias_gain = INIT[scheme][role]
    return dict(init_mode=mode, init_weight=weight_gain, init_bias=bias_gain)


class Linear(torch.nn.Module):
    """y = x W^T + b."""
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(init_mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = _param([out_features, in_features], gain=init_weight, **fans)
        self.bias = _param([out_features], gain=init_bias, **fans) if bias else None

    def forward(self, x):
        y = x @ self.weight.to(x.dtype).t()
        return y if self.bias is None else y + self.bias.to(x.dtype)


def fir_filter(taps):
    """2-D resampling filter outer(v, v) / sum(v)^2 as [1, 1, L, L]: unit DC gain; v = [1, 1] (box) or [1, 3, 3, 1]."""
    v = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(v, v) / v.sum() ** 2)[None, None]


def upsample_fir(x, f, padding):
    """2x up-sampling: insert zeros, then filter with 4 f (4 = 2x2 restores the mean); one transposed depthwise
    convolution with stride 2."""
    return F.conv_transpose2d(x, (4 * f).repeat(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=padding)


def downsample_fir(x, f, padding):
    """2x down-sampling: filter with f, keep every second pixel; one depthwise convolution with stride 2."""
    return F.conv2d(x, f.repeat(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=padding)


class Conv2d(torch.nn.Module):
    """k x k convolution (padding k // 2) with optional 2x FIR up/down-sampling; kernel=0: resampling only."""
    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1, 1],     # 1-D taps v of the resampling filter
                 fused_resample=False,       # one resampling pass at the high resolution, around the convolution
                 init_mode='kaiming_normal', init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(init_mode=init_mode, fan_in=in_channels * kernel ** 2, fan_out=out_channels * kernel ** 2)
        self.weight = _param([out_channels, in_channels, kernel, kernel], gain=init_weight, **fans) if kernel else None
        self.bias = _param([out_channels], gain=init_bias, **fans) if kernel and bias else None
        self.register_buffer('resample_filter', fir_filter(resample_filter) if up or down else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        k_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if w is not None and self.fused_resample and self.up:      # filter first; the paddings are shared
            x = F.conv2d(upsample_fir(x, f, max(f_pad - k_pad, 0)), w, padding=max(k_pad - f_pad, 0))
        elif w is not None and self.fused_resample and self.down:  # convolve first, padded for both
            x = downsample_fir(F.conv2d(x, w, padding=k_pad + f_pad), f, 0)
        else:
            x = upsample_fir(x, f, f_pad) if self.up else downsample_fir(x, f, f_pad) if self.down else x
            x = x if w is None else F.conv2d(x, w, padding=k_pad)
        return x if self.bias is None else x + self.bias.to(x.dtype).reshape(-1, 1, 1)


class GroupNorm(torch.nn.Module):
    """GroupNorm with min(num_groups, C // min_channels_per_group) groups. Recipe A.4: normalised in fp32 and
    cast back (EDM normalises in the input dtype; identical in fp32)."""
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding of the noise label: [cos(x f_i), sin(x f_i)], f_i = (1/max_positions)^(i / (C/2 - e)),
    i = 0..C/2-1, e = 1 with endpoint (so the last frequency is 1/max_positions), computed in fp32 (facts)."""
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        angles = torch.outer(x, ((1 / self.max_positions) ** exponent).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features (NCSN++): [cos(x g), sin(x g)], g = 2 pi freqs, freqs ~ N(0, scale^2) (a buffer)."""
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def self_attention(qkv, num_heads):
    """Multi-head dot-product attention over the H*W positions (edm-network-facts.md, UNetBlock).
    qkv: [N, 3C, H, W] with channels grouped per head and, within a head, as (q, k, v) triples -> [N, C, H, W].
    Weights softmax_keys(q^T k / sqrt(d)), d = C / heads, in fp32 (k is scaled before the product, as in EDM)."""
    n, _, height, width = qkv.shape
    q, k, v = qkv.reshape(n * num_heads, -1, 3, height * width).unbind(2)             # each [N*heads, d, HW]
    logits = torch.einsum('bdi,bdj->bij', q.float(), (k / math.sqrt(k.shape[1])).float())  # [N*heads, HW, HW]
    weights = logits.softmax(dim=2).to(v.dtype)
    return torch.einsum('bij,bdj->bdi', weights, v).reshape(n, -1, height, width)


class UNetBlock(torch.nn.Module):
    """Pre-activation residual block conditioned on the embedding, with optional self-attention after it
    (edm-network-facts.md, UNetBlock). Submodules are created in checkpoint (state_dict) order."""
    def __init__(self, in_channels, out_channels, emb_channels,
                 up=False, down=False,       # 2x resampling in conv0 and in the skip path
                 attention=False,
                 num_heads=None,             # None: out_channels // channels_per_head
                 channels_per_head=64,
                 dropout=0,                  # before conv1, training only
                 skip_scale=1,               # residual sums are multiplied by this (sqrt(1/2) in SongUNet)
                 eps=1e-5,                   # GroupNorm epsilon
                 resample_filter=[1, 1],
                 resample_proj=False,        # 1x1 conv on a resampling skip even when the width is unchanged
                 adaptive_scale=True,        # ADM: emb -> (scale, shift) around norm1; else emb is added before it
                 init='adm'):                # initialisation scheme, a key of INIT
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (out_channels // channels_per_head if num_heads is None else num_heads) if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        layer, out, qkv = _init(init, 'layer'), _init(init, 'out'), _init(init, 'qkv')
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **resample, **layer)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **layer)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **out)
        self.skip = None  # identity, unless the shape changes: then a 1x1 projection and/or pure resampling
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, **resample, **layer)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, **qkv)
            self.proj = Conv2d(out_channels, out_channels, 1, **out)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        p = self.affine(emb)[:, :, None, None].to(h.dtype)  # affine runs in fp32 (emb is fp32, recipe A.4)
        if self.adaptive_scale:
            scale, shift = p.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), 1 + scale))  # shift + norm1(h) * (1 + scale)
        else:
            h = F.silu(self.norm1(h + p))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            h = (self.proj(self_attention(self.qkv(self.norm2(h)), self.num_heads)) + h) * self.skip_scale
        return h

# ----------------------------------------------------------------------------------------------------------------
# U-Nets. Both are called as model(x, noise_labels, class_labels, augment_labels=None) and return F(x).
# The encoder `enc` and decoder `dec` are ModuleDicts with entries '<res>x<res>_<role>' (checkpoint names); the
# role (conv, down, block, in, up, or aux_* for SongUNet's image branches) says how an entry is applied.

def _role(name):
    """'16x16_block3' -> 'block', '16x16_aux_skip' -> 'aux_skip'."""
    return name.split('_', 1)[1].rstrip('0123456789')


def _levels(img_resolution, model_channels, channel_mult):
    """Per resolution level, highest first: (name prefix 'RxR', R, block width)."""
    return [(f'{img_resolution >> i}x{img_resolution >> i}', img_resolution >> i, model_channels * m) for i, m in enumerate(channel_mult)]


def _encoder(levels, in_channels, stem_width, num_blocks, block, attn_resolutions, skip_channels, layer, image_branch=None):
    """Encoder entries of both U-Nets (facts), highest resolution first: a 3x3 'conv' stem at level 0, a 'down'
    block elsewhere (then image_branch(key, width)'s entries), then num_blocks blocks with attention at
    attn_resolutions. The width of every encoder output the decoder consumes is appended to skip_channels."""
    width = in_channels
    for level, (key, res, level_width) in enumerate(levels):
        if level == 0:
            width = stem_width
            yield f'{key}_conv', Conv2d(in_channels, width, 3, **layer)
        else:
            yield f'{key}_down', block(width, width, down=True)
            yield from image_branch(key, width) if image_branch else ()
        skip_channels.append(width)
        for i in range(num_blocks):
            yield f'{key}_block{i}', block(width, level_width, attention=res in attn_resolutions)
            width = level_width
            skip_channels.append(width)


def _decoder(levels, num_blocks, block, skip_channels, attention, output_head=None):
    """Decoder entries of both U-Nets (facts), lowest resolution first: 'in0' (with attention) and 'in1' at the
    lowest level, 'up' elsewhere, then num_blocks + 1 blocks that each take one more encoder output (last-first)
    and attend where attention(i, res), then output_head(level, key, width)'s entries."""
    width = skip_channels[-1]
    for level, (key, res, level_width) in reversed(list(enumerate(levels))):
        if level == len(levels) - 1:
            yield f'{key}_in0', block(width, width, attention=True)
            yield f'{key}_in1', block(width, width)
        else:
            yield f'{key}_up', block(width, width, up=True)
        for i in range(num_blocks + 1):
            yield f'{key}_block{i}', block(width + skip_channels.pop(), level_width, attention=attention(i, res))
            width = level_width
        yield from output_head(level, key, width) if output_head else ()


class _UNet(torch.nn.Module):
    def drop_labels(self, labels, batch_size):
        """Training only: each row of the class labels is zeroed with probability label_dropout (facts)."""
        if self.training and self.label_dropout:
            labels = labels * (torch.rand([batch_size, 1], device=labels.device) >= self.label_dropout).to(labels.dtype)
        return labels

    def encode_decode(self, x, emb):
        """Encoder, then decoder; returns the decoder features and the sum of the aux output heads (or None)."""
        skips, image = [], x  # image: SongUNet's encoder image branch, starting from the input
        for name, m in self.enc.items():
            role = _role(name)
            if role == 'aux_down':          # 'skip' encoder: the input image, down-sampled once more per level,
                image = m(image)
            elif role == 'aux_skip':        # is added to the level's first features through a 1x1 conv
                x = skips[-1] = x + m(image)
            elif role == 'aux_residual':    # 'residual' encoder: (x + conv(image)) / sqrt(2) is the next image
                x = skips[-1] = image = (x + m(image)) / math.sqrt(2)
            else:
                x = m(x) if role == 'conv' else m(x, emb)
                skips.append(x)
        image = None                        # decoder output: the heads' sum, up-sampled from level to level
        for name, m in self.dec.items():
            role = _role(name)
            if role == 'aux_up':
                image = m(image)
            elif role == 'aux_norm':
                head = F.silu(m(x))
            elif role == 'aux_conv':
                image = m(head) if image is None else m(head) + image
            else:                           # each decoder block consumes the latest unused encoder output
                x = m(torch.cat([x, skips.pop()], dim=1) if role == 'block' else x, emb)
        return x, image


class SongUNet(_UNet):
    """DDPM++ / NCSN++ U-Net (Song et al. 2021) as used by EDM (edm-network-facts.md, SongUNet)."""
    def __init__(self, img_resolution, in_channels, out_channels,
                 label_dim=0,                    # 0 = unconditional
                 augment_dim=0,                  # augmentation label dimensionality, 0 = none
                 model_channels=128,
                 channel_mult=[1, 2, 2, 2],      # per resolution level
                 channel_mult_emb=4,             # embedding width = model_channels * channel_mult_emb
                 num_blocks=4,                   # residual blocks per level
                 attn_resolutions=[16],
                 dropout=0.10,
                 label_dropout=0,                # probability of dropping the class label while training
                 embedding_type='positional',    # 'positional' (DDPM++) or 'fourier' (NCSN++)
                 channel_mult_noise=1,           # noise embedding width = model_channels * channel_mult_noise
                 encoder_type='standard',        # 'standard' (DDPM++), 'skip', 'residual' (NCSN++)
                 decoder_type='standard',        # 'standard' or 'skip'
                 resample_filter=[1, 1]):        # [1,1] (DDPM++) or [1,3,3,1] (NCSN++)
        assert embedding_type in ['fourier', 'positional']
        assert encoder_type in ['standard', 'skip', 'residual']
        assert decoder_type in ['standard', 'skip']
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        layer, out = _init('song', 'layer'), _init('song', 'out')
        block = functools.partial(UNetBlock, emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                                  eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init='song')
        resample = dict(resample_filter=resample_filter)

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == 'positional'
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **layer) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **layer) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **layer)
        self.map_layer1 = Linear(emb_channels, emb_channels, **layer)

        image_width = in_channels  # width of the encoder's image branch

        def image_branch(key, width):
            nonlocal image_width
            if encoder_type == 'skip':      # the input image, down-sampled once per level, added through a 1x1 conv
                yield f'{key}_aux_down', Conv2d(image_width, image_width, 0, down=True, **resample)
                yield f'{key}_aux_skip', Conv2d(image_width, width, 1, **layer)
            if encoder_type == 'residual':  # the previous level's features through a strided 3x3 conv
                yield f'{key}_aux_residual', Conv2d(image_width, width, 3, down=True, fused_resample=True, **resample, **layer)
                image_width = width

        def output_head(level, key, width):  # at level 0, or at every level for the 'skip' decoder (summed)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    yield f'{key}_aux_up', Conv2d(out_channels, out_channels, 0, up=True, **resample)
                yield f'{key}_aux_norm', GroupNorm(width, eps=1e-6)
                yield f'{key}_aux_conv', Conv2d(width, out_channels, 3, **out)

        levels, skip_channels = _levels(img_resolution, model_channels, channel_mult), []
        self.enc = torch.nn.ModuleDict(_encoder(levels, in_channels, model_channels, num_blocks, block, attn_resolutions,
                                                skip_channels, layer, image_branch))
        self.dec = torch.nn.ModuleDict(_decoder(levels, num_blocks, block, skip_channels,
                                                lambda i, res: i == num_blocks and res in attn_resolutions, output_head))

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)  # facts: the two halves are swapped
        if self.map_label is not None:
            labels = self.drop_labels(class_labels, x.shape[0])
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        return self.encode_decode(x, emb)[1]


class DhariwalUNet(_UNet):
    """ADM U-Net (Dhariwal & Nichol 2021) as used by EDM (edm-network-facts.md, DhariwalUNet)."""
    def __init__(self, img_resolution, in_channels, out_channels,
                 label_dim=0,                    # 0 = unconditional
                 augment_dim=0,                  # augmentation label dimensionality, 0 = none
                 model_channels=192,
                 channel_mult=[1, 2, 3, 4],      # per resolution level
                 channel_mult_emb=4,             # embedding width = model_channels * channel_mult_emb
                 num_blocks=3,                   # residual blocks per level
                 attn_resolutions=[32, 16, 8],
                 dropout=0.10,
                 label_dropout=0):               # probability of dropping the class label while training
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        layer, out = _init('adm', 'layer'), _init('adm', 'out')
        block = functools.partial(UNetBlock, emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init='adm')

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **out) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **layer)
        self.map_layer1 = Linear(emb_channels, emb_channels, **layer)
        # A class embedding table with N(0, 1) entries (kaiming_normal has std 1 / sqrt(fan_in)).
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal', init_weight=math.sqrt(label_dim))
                          if label_dim else None)

        levels, skip_channels = _levels(img_resolution, model_channels, channel_mult), []
        self.enc = torch.nn.ModuleDict(_encoder(levels, in_channels, levels[0][2], num_blocks, block, attn_resolutions,
                                                skip_channels, layer))
        self.dec = torch.nn.ModuleDict(_decoder(levels, num_blocks, block, skip_channels, lambda i, res: res in attn_resolutions))
        self.out_norm = GroupNorm(levels[0][2])
        self.out_conv = Conv2d(levels[0][2], out_channels, 3, **out)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(self.drop_labels(class_labels, x.shape[0]))
        x, _ = self.encode_decode(x, F.silu(emb))
        return self.out_conv(F.silu(self.out_norm(x)))


UNETS = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}

# ----------------------------------------------------------------------------------------------------------------
# Preconditioning (EDM paper, Table 1): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

# Device types on which use_fp16 switches the U-Net to bfloat16 (recipe A.4). Tests add 'cpu' to exercise
# the reduced-precision arithmetic without a GPU.
_REDUCED_PRECISION_DEVICES = {'cuda'}


class _Precond(torch.nn.Module):
    """Shared wrapper logic: input casting, label handling, the mixed-precision switch and init_kwargs."""
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, model_kwargs):
        super().__init__()
        if model_type not in UNETS:
            raise ValueError(f'unknown model_type {model_type!r}; supported: {", ".join(UNETS)}')
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = img_resolution, img_channels, label_dim, use_fp16
        self.model = UNETS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                       out_channels=out_channels, label_dim=label_dim, **model_kwargs)
        # Subclasses add their own arguments: type(net)(**net.init_kwargs) rebuilds the network.
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, model_type=model_type, **model_kwargs)

    def prepare(self, x, sigma, class_labels):
        """fp32 x, sigma as [N, 1, 1, 1], labels as fp32 [N, label_dim] (a zero row when missing) or None."""
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if not self.label_dim:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)  # broadcasts over the batch
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels

    def unet(self, x, sigma, class_labels, force_fp32, c_in, c_noise, **model_kwargs):
        """F(c_in x; c_noise) as fp32, computed in bfloat16 when use_fp16 applies (recipe A.4)."""
        reduced = self.use_fp16 and not force_fp32 and x.device.type in _REDUCED_PRECISION_DEVICES
        dtype = torch.bfloat16 if reduced else torch.float32
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        return F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0, sigma_max=float('inf'),  # supported noise levels
                 sigma_data=0.5,                       # expected standard deviation of the data
                 model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.init_kwargs.update(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)                # EDM Table 1
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * self.unet(x, sigma, class_labels, force_fp32, c_in, c_noise, **model_kwargs)


class VPPrecond(_Precond):
    """Variance preserving (DDPM++ baseline): sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 beta_d=19.9, beta_min=0.1,  # slope and start of the linear beta(t)
                 M=1000,                     # number of discrete time steps the network was trained with
                 epsilon_t=1e-5,             # smallest t
                 model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.init_kwargs.update(beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t)
        def sigma_of_t(t):  # in fp32, like EDM: sigma_min = 0.0009765625, sigma_max = 152.16697692871094
            t = torch.tensor(t, device='cpu')
            return float(((0.5 * beta_d * t ** 2 + beta_min * t).exp() - 1).sqrt())
        self.sigma_min, self.sigma_max = sigma_of_t(epsilon_t), sigma_of_t(1.0)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        # c_noise = (M - 1) t(sigma), t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d
        t = ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d
        return x - sigma * self.unet(x, sigma, class_labels, force_fp32, c_in, (self.M - 1) * t, **model_kwargs)  # c_skip = 1, c_out = -sigma


class VEPrecond(_Precond):
    """Variance exploding (NCSN++ baseline)."""
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0.02, sigma_max=100, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.init_kwargs.update(sigma_min=sigma_min, sigma_max=sigma_max)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        c_noise = (0.5 * sigma).log()
        return x + sigma * self.unet(x, sigma, class_labels, force_fp32, 1, c_noise, **model_kwargs)  # c_skip = c_in = 1, c_out = sigma


class iDDPMPrecond(_Precond):
    """Improved DDPM (ADM baseline): discrete cosine schedule; the U-Net also predicts variances (2x channels)."""
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 C_1=0.001,  # clamp of the ratio abar(j-1) / abar(j)
                 C_2=0.008,  # offset of the cosine schedule
                 M=1000,     # number of discrete noise levels
                 model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels * 2, model_kwargs)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        self.init_kwargs.update(C_1=C_1, C_2=C_2, M=M)
        # Noise levels u_0 > ... > u_M = 0 (facts), one fp32 step at a time like EDM:
        # u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1) / abar(j), C_1) - 1), abar(j) = sin(pi/2 * j / (M (C_2 + 1)))^2.
        abar = lambda j: (0.5 * math.pi * torch.tensor(j, device='cpu') / M / (C_2 + 1)).sin() ** 2
        u = [torch.tensor(0.0, device='cpu')]
        for j in range(M, 0, -1):
            u.append(((u[-1] ** 2 + 1) / (abar(j - 1) / abar(j)).clip(min=C_1) - 1).sqrt())
        self.register_buffer('u', torch.stack(u[::-1]))
        self.sigma_min, self.sigma_max = float(self.u[M - 1]), float(self.u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)  # M - 1 - j
        F_x = self.unet(x, sigma, class_labels, force_fp32, c_in, c_noise, **model_kwargs)
        return x - sigma * F_x[:, :self.img_channels]  # c_skip = 1, c_out = -sigma; the variance channels are unused

    def round_sigma(self, sigma, return_index=False):
        """The nearest u_j (or j). Distances come from torch.cdist as in EDM, whose fp32 rounding breaks near-ties."""
        sigma = torch.as_tensor(sigma)
        dist = torch.cdist(sigma.to(self.u.device, torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        j = dist.argmin(2).reshape(sigma.shape)
        return (j if return_index else self.u[j].to(sigma.dtype)).to(sigma.device)


NETWORKS = {cls.__name__: cls for cls in [EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond]}

# ----------------------------------------------------------------------------------------------------------------
# Untrusted files: one validation layer for everything read from outside (EDM / GDD pickles, gdd-min checkpoints
# and training states, torch.save'd backbone weights, npz statistics and images), used by edm_nets, gdd,
# backbones and fid_min. The rules (README, "Security and failure behaviour"):
# - Nothing from a file is executed, and no real object is handed to the pickle machine: a global becomes an
#   inert stand-in holding its name, a call becomes a record, and tensors / networks are built afterwards from
#   checked plain data. So a pickle can neither run code nor change anything in the process (it cannot BUILD
#   new __defaults__ onto torch._utils._rebuild_tensor_v2, say).
# - Every declared size is checked against the bytes the file really holds before anything large is allocated
#   or decompressed; every walk visits each object once and has a depth bound; sizes in init_kwargs are bounded.
# - A bad file raises ValueError('<file>: <problem>') in one line (UnsafePickleError, also a ValueError, for what
#   a pickle may not contain), which the command lines print as their one-line error.

MAX_NESTING = 100            # containers inside containers (an EDM network pickle needs ~25)
MAX_PICKLE_OPS = 2_000_000   # opcodes per pickle (56k in an ImageNet ADM pickle): bounds time and memory
MAX_ZIP_MEMBERS = 100_000    # members of a torch / npz zip archive (torch.save writes ~one per tensor)


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The file holds something its format does not allow (a foreign global, BUILD on a global, ...); nothing
    it references was executed."""


class _BadFile(ValueError):
    """A failed check; the public readers prefix it with the file's name."""


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

# --- The inert pickle machine -----------------------------------------------------------------------------------

class _Global:
    """Stand-in for a global that a pickle names: only the name, never the object."""
    __slots__ = ('module', 'name')

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __repr__(self):
        return f'{self.module}.{self.name}'


class _Call:
    """Inert record of a call in a pickle (REDUCE / NEWOBJ): func(*args), the state of a following BUILD, and
    (permissive mode only) items written into it. Interpreted after unpickling, never called."""
    __slots__ = ('func', 'args', 'state', 'items')

    def __init__(self, func, args):
        self.func, self.args, self.state, self.items = func, args, None, []

    def key(self):
        return self.func.module, self.func.name


_PERSISTENT_ID = _Global('pickle', 'persistent_id')


def _describe(obj):
    if type(obj) is _Global:
        return f'global {obj}'
    return f'the result of {obj.func}(...)' if type(obj) is _Call else f'a {type(obj).__name__}'


class _BoundedReader:
    """The file up to `end`; a read longer than what is left fails before anything is allocated for it (a pickle
    can declare a 2^60-byte bytes object in 9 bytes)."""
    def __init__(self, f, end):
        self.f, self.end = f, end

    def read(self, n):
        left = self.end - self.f.tell()
        if n > left:
            raise _BadFile(f'truncated (an item declares {n} bytes, {max(left, 0)} are left)')
        return self.f.read(n)

    def readline(self):
        return self.f.readline(max(self.end - self.f.tell(), 0))


class _Unpickler(pickle._Unpickler):
    """Python's own pickle machine (the pure-Python one: the C one cannot be changed) with every opcode that could
    reach a real object replaced: GLOBAL -> a _Global stand-in (refused unless in `allowed`), REDUCE / NEWOBJ ->
    a _Call record, BUILD only on a record whose global is in `buildable`, SETITEM(S) / APPEND(S) / ADDITEMS only
    on the plain dict / list / set the pickle itself made. Persistent ids become records collected in
    `persistent_ids`. allowed=None accepts every name and buildable=None lets BUILD and item writes land on any
    record: the permissive pre-scan of torch files, which still runs nothing (torch's weights_only unpickler
    judges their globals afterwards)."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, end, allowed=frozenset(), buildable=frozenset(), persistent_ids=None, what='this format'):
        super().__init__(_BoundedReader(file, end))
        self.allowed, self.buildable, self.persistent_ids, self.what, self.ops = allowed, buildable, persistent_ids, what, 0
        self.ordered_dicts = {}     # id -> the plain dicts made for OrderedDict(): they take one BUILD, ignored

    def find_class(self, module, name):
        if self.allowed is not None and (module, name) not in self.allowed:
            allowed = ', '.join(sorted(f'{m}.{n}' for m, n in self.allowed)) or 'none'
            raise UnsafePickleError(f'refusing to load global {module}.{name} (not part of {self.what}; allowed: {allowed})')
        return _Global(module, name)

    def persistent_load(self, pid):
        if self.persistent_ids is None:
            raise UnsafePickleError(f'unexpected persistent id (not part of {self.what})')
        record = _Call(_PERSISTENT_ID, (pid,))
        self.persistent_ids.append(record)
        return record

    def _call(self, func, args, op):
        if type(func) is not _Global or type(args) is not tuple:
            raise UnsafePickleError(f'refusing {op} of {_describe(func)} (only named globals are called, as records)')
        if (func.module, func.name) == ('collections', 'OrderedDict') and not args:
            d = {}  # a plain dict (ordered); its items follow as SETITEMS
            self.ordered_dicts[id(d)] = d
            return d
        return _Call(func, args)

    def _reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, 'REDUCE')

    def _newobj(self):
        args = self.stack.pop()
        self.append(self._call(self.stack.pop(), args, 'NEWOBJ'))

    def _newobj_ex(self):
        kwargs, args = self.stack.pop(), self.stack.pop()
        if kwargs:
            raise UnsafePickleError('refusing NEWOBJ_EX with keyword arguments')
        self.append(self._call(self.stack.pop(), args, 'NEWOBJ_EX'))

    def _build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is dict and self.ordered_dicts.pop(id(inst), None) is inst and type(state) is dict:
            return      # a module state_dict's attributes (its '_metadata' versions): our own dict, nothing to set
        if type(inst) is not _Call or (self.buildable is not None and inst.key() not in self.buildable):
            names = ', '.join(sorted(f'{m}.{n}' for m, n in self.buildable or ()))
            allowed = 'call records' if self.buildable is None else f'records of {names}' if names else 'nothing in this format'
            raise UnsafePickleError(f'refusing BUILD (setting state) on {_describe(inst)} (accepted only on {allowed})')
        if inst.state is not None or state is None:
            raise UnsafePickleError(f'refusing a second or empty BUILD on {_describe(inst)}')
        inst.state = state

    def _write(self, kind, items, op):
        target = self.stack[-1]
        if type(target) is kind and kind is dict:
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        elif type(target) is kind:
            target.extend(items) if kind is list else target.update(items)
        elif type(target) is _Call and self.buildable is None:
            target.items.extend(items)
        else:
            raise UnsafePickleError(f'refusing {op} on {_describe(target)} (only on the plain {kind.__name__} the pickle made)')

    def _setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._write(dict, [key, value], 'SETITEM')

    def _setitems(self):
        self._write(dict, self.pop_mark(), 'SETITEMS')

    def _append(self):
        self._write(list, [self.stack.pop()], 'APPEND')

    def _appends(self):
        self._write(list, self.pop_mark(), 'APPENDS')

    def _additems(self):
        self._write(set, self.pop_mark(), 'ADDITEMS')

    for _op, _f in [(pickle.REDUCE, _reduce), (pickle.NEWOBJ, _newobj), (pickle.NEWOBJ_EX, _newobj_ex), (pickle.BUILD, _build),
                    (pickle.SETITEM, _setitem), (pickle.SETITEMS, _setitems), (pickle.APPEND, _append),
                    (pickle.APPENDS, _appends), (pickle.ADDITEMS, _additems)]:
        dispatch[_op[0]] = _f
    # Opcodes no format here uses: class instantiation of protocols 0/1, the copyreg extension registry (it
    # resolves globals behind find_class's back) and protocol 5's out-of-band buffers (BYTEARRAY8 allocates its
    # declared size before reading).
    for _op in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4, pickle.BYTEARRAY8,
                pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch[_op[0]] = lambda self, _name=pickletools.code2op[_op.decode('latin-1')].name: self._refuse(_name)
    del _op, _f

    def _refuse(self, name):
        raise UnsafePickleError(f'refusing pickle opcode {name} (not part of {self.what})')


def _counted(op):
    def run(self):
        self.ops += 1
        if self.ops > MAX_PICKLE_OPS:
            raise _BadFile(f'more than {MAX_PICKLE_OPS:,} pickle opcodes (no network file of this format has that many)')
        op(self)
    return run


_Unpickler.dispatch = {code: _counted(op) for code, op in _Unpickler.dispatch.items()}

# --- Storages and tensor views ----------------------------------------------------------------------------------

_STORAGE_DTYPES = {'DoubleStorage': torch.float64, 'FloatStorage': torch.float32, 'HalfStorage': torch.float16,
                   'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
                   'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
                   'BoolStorage': torch.bool, 'ComplexFloatStorage': torch.complex64,
                   'ComplexDoubleStorage': torch.complex128, 'UntypedStorage': torch.uint8}
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950a86a20f9469cfc6c, 1001


def _storages(pids):
    """{key: (dtype, numel)} of torch.save persistent ids ('storage', torch.<Type>Storage, key, location, numel[, None]);
    dtypes without a typed storage class (uint16, float8, ...) are saved as torch.storage.UntypedStorage of bytes."""
    out = {}
    for record in pids:
        pid = record.args[0]
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == 'storage' and type(pid[1]) is _Global
                and pid[1].module in ('torch', 'torch.storage') and type(pid[2]) is str and type(pid[3]) is str
                and type(pid[4]) is int and pid[4] >= 0 and (len(pid) == 5 or pid[5] is None)):
            raise _BadFile(f'unsupported storage record {pid!r:.100}')
        dtype = _STORAGE_DTYPES.get(pid[1].name)
        if dtype is None:
            raise _BadFile(f'unsupported storage type torch.{pid[1].name}')
        if out.setdefault(pid[2], (dtype, pid[4])) != (dtype, pid[4]):
            raise _BadFile(f'storage {pid[2]!r} declared twice with different types or sizes')
    return out


def _legacy_layout(f, end, allowed=None, what='a torch.save file'):
    """Check a legacy (non-zip) torch.save stream in f up to `end` (EDM's storage blobs, old .pth files): five
    pickles (magic number, protocol 1001, sys info, the object with storages as persistent ids, the list of
    storage keys), then per key an int64 element count and the raw data. Every count must equal the declared
    one and the data must end exactly at `end`, so whatever loads it allocates only what the file holds.
    Returns (object as records, its persistent-id records, {key: (dtype, numel, offset of the data)})."""
    def load(**kwargs):
        return _Unpickler(f, end, what=what, **kwargs).load()
    if load() != _LEGACY_MAGIC:
        raise _BadFile('not a torch.save file (no torch magic number)')
    if load() != _LEGACY_PROTOCOL:
        raise _BadFile('unsupported legacy torch.save protocol version')
    info = load()
    if type(info) is not dict or info.get('little_endian') is not True or sys.byteorder != 'little':
        raise _BadFile('big-endian torch.save data (or a malformed header)')
    pids = []
    obj = load(allowed=allowed, buildable=None if allowed is None else frozenset(), persistent_ids=pids)
    keys, storages = load(), _storages(pids)
    if type(keys) is not list or len(set(keys)) != len(keys) or set(keys) != set(storages):
        raise _BadFile('storage key list does not match the storages of the object')
    layout, pos = {}, f.tell()
    for key in keys:
        dtype, numel = storages[key]
        f.seek(pos)
        head = f.read(8)
        if len(head) != 8 or int.from_bytes(head, 'little', signed=True) != numel:
            raise _BadFile(f'storage {key!r} declares {numel} elements but its data says otherwise')
        layout[key] = (dtype, numel, pos + 8)
        pos += 8 + numel * dtype.itemsize
        if pos > end:
            raise _BadFile(f'storage {key!r} declares {numel} x {dtype} but the data ends {pos - end} bytes early')
    if pos != end:
        raise _BadFile(f'{end - pos} unexpected bytes after the storage data')
    return obj, pids, layout


def _check_view(numel, offset, size, stride):
    """A tensor view must lie inside its storage of `numel` elements without overlapping itself: with the dims
    sorted by stride, each stride is at least the extent of the smaller ones (no stride 0). So no view holds
    more elements than its storage (stride-0 views would let a 28 KB file describe a 200M-parameter network)."""
    if not (type(size) in (tuple, list) and type(stride) in (tuple, list) and len(size) == len(stride) <= 16
            and all(type(v) is int and v >= 0 for v in (*size, *stride)) and type(offset) is int and offset >= 0):
        raise _BadFile(f'malformed tensor view (offset {offset!r:.40}, size {size!r:.80}, stride {stride!r:.80})')
    if 0 in size:
        return
    extent = 1  # elements spanned by the dims so far
    for n, s in sorted(((n, s) for n, s in zip(size, stride) if n > 1), key=lambda d: d[1]):
        if s < extent:
            raise _BadFile(f'tensor view of size {list(size)} with stride {list(stride)} overlaps itself')
        extent += s * (n - 1)
    if offset + extent > numel:
        raise _BadFile(f'tensor view of size {list(size)} reaches past its storage of {numel} elements')

# --- EDM network pickles (format: the fixtures' edm-formats.md, section a) --------------------------------------
#
# EDM pickles store every network layer as a call _reconstruct_persistent_obj(meta), where meta holds the class
# name, the source code of its module and the object's __dict__. EDM's loader executes that source; we never do.
# read_pickle runs the inert machine with exactly the format's globals, then interprets its records: a persistent
# object becomes a plain `Persistent` record, a ModuleDict a `ModuleDictRecord`, each tensor a fresh tensor copied
# from its checked storage blob, a NumPy scalar a Python number.

_EDM_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): 'persistent',
    ('torch.nn.modules.container', 'ModuleDict'): 'module_dict',
    ('collections', 'OrderedDict'): 'ordered_dict',       # only OrderedDict(), which the machine makes a plain dict
    ('torch._utils', '_rebuild_parameter'): 'parameter',
    ('torch._utils', '_rebuild_tensor_v2'): 'tensor',
    ('torch.storage', '_load_from_bytes'): 'storage',
    ('numpy._core.multiarray', 'scalar'): 'scalar',       # NumPy >= 2
    ('numpy.core.multiarray', 'scalar'): 'scalar',        # NumPy 1.x
    ('numpy', 'dtype'): 'dtype',
}
_EDM_BUILDABLE = frozenset({('torch.nn.modules.container', 'ModuleDict'), ('numpy', 'dtype')})
_STORAGE_GLOBALS = frozenset(('torch', name) for name in _STORAGE_DTYPES)
_PLAIN = (bool, int, float, complex, str, bytes)


class Persistent:
    """Data of one EDM persistent object: class_name, init_args, init_kwargs and state (its __dict__)."""
    def __init__(self, meta):
        if type(meta) is not dict or meta.get('type') != 'class' or meta.get('version') != 6:
            raise _BadFile('unsupported EDM persistent object record (expected type "class", version 6)')
        self.class_name, self.state = meta.get('class_name'), meta.get('state')
        if type(self.class_name) is not str or type(self.state) is not dict:
            raise _BadFile('EDM persistent object record without a class_name string and a state dict')
        init_args, init_kwargs = self.state.get('_init_args', ()), self.state.get('_init_kwargs', {})
        if type(init_args) not in (tuple, list) or type(init_kwargs) is not dict or not all(type(k) is str for k in init_kwargs):
            raise _BadFile(f'{self.class_name}: _init_args / _init_kwargs are not a tuple / a dict of names')
        self.init_args, self.init_kwargs = tuple(init_args), dict(init_kwargs)

    def __repr__(self):
        return f'Persistent({self.class_name}, init_kwargs={self.init_kwargs})'


class ModuleDictRecord:
    """Stand-in for a pickled torch.nn.ModuleDict: its BUILD state (its __dict__, with `_modules`)."""
    def __init__(self, state):
        self.state = state


class _EDMData:
    """Second stage of read_pickle: the machine's plain data and records -> plain data, Persistent /
    ModuleDictRecord records and tensors. Each object is interpreted once (memo: shared children stay shared,
    and cost once), nesting is bounded, and all tensors together may not hold more bytes than the storages."""
    def __init__(self):
        self.memo, self.storages, self.storage_bytes, self.tensor_bytes = {}, {}, 0, 0

    def value(self, obj, depth=0):
        if obj is None or type(obj) in _PLAIN:
            return obj
        if id(obj) in self.memo:
            return self.memo[id(obj)]
        if depth > MAX_NESTING:
            raise _BadFile(f'data nested deeper than {MAX_NESTING} levels')
        kind = type(obj)
        if kind is dict:
            out = self.memo[id(obj)] = {}
            for k, v in obj.items():
                out[self.key(k)] = self.value(v, depth + 1)
        elif kind is list:
            out = self.memo[id(obj)] = []
            for v in obj:
                out.append(self.value(v, depth + 1))
        elif kind is tuple:
            out = self.memo[id(obj)] = tuple([self.value(v, depth + 1) for v in obj])
        elif kind in (set, frozenset):
            for v in obj:
                self.key(v)
            out = self.memo[id(obj)] = obj
        elif kind is _Call:
            out = self.memo[id(obj)] = self.call(obj, depth)
        else:
            raise _BadFile(f'{_describe(obj)} used as a value')
        return out

    def key(self, k):
        if k is None or type(k) in _PLAIN or (type(k) is tuple and all(x is None or type(x) in _PLAIN for x in k)):
            return k
        raise _BadFile(f'{_describe(k)} used as a dict key or set element')

    def call(self, rec, depth):
        kind, args = _EDM_GLOBALS.get(rec.key()), rec.args
        if kind == 'persistent' and len(args) == 1 and rec.state is None:
            return Persistent(self.value(args[0], depth + 1))
        if kind == 'module_dict' and not args and type(rec.state) is dict:
            return ModuleDictRecord(self.value(rec.state, depth + 1))
        if kind == 'tensor':
            return self.tensor(rec)
        if kind == 'parameter' and len(args) == 3 and type(args[0]) is _Call and args[0].key() == ('torch._utils', '_rebuild_tensor_v2'):
            if type(args[1]) is not bool or not (type(args[2]) is dict and not args[2]) or rec.state is not None:
                raise _BadFile('torch Parameter record with hooks or state (not part of the EDM format)')
            return self.value(args[0], depth + 1)  # a plain tensor; build_network copies it into a parameter
        if kind == 'scalar' and len(args) == 2 and type(args[1]) is bytes:
            dtype = self.numpy_dtype(args[0])
            if len(args[1]) != dtype.itemsize:
                raise _BadFile('malformed NumPy scalar')
            return np.frombuffer(args[1], dtype=dtype)[0].item()  # plain Python float / int / bool
        raise _BadFile(f'malformed or misplaced record {rec.func}({len(args)} arguments)')

    def numpy_dtype(self, rec):
        # numpy.dtype('f8', False, True) + BUILD state (3, '<', None, None, None, -1, -1, 0): a numeric scalar type.
        if not (type(rec) is _Call and rec.key() == ('numpy', 'dtype') and len(rec.args) == 3 and type(rec.args[0]) is str
                and re.fullmatch(r'[biuf][1248]', rec.args[0]) and type(rec.state) is tuple and len(rec.state) == 8
                and rec.state[1] in ('<', '>', '|', '=')):
            raise _BadFile('malformed NumPy dtype record (only numeric scalar types are expected)')
        return np.dtype(rec.state[1] + rec.args[0])

    def storage(self, rec):
        if not (type(rec) is _Call and rec.key() == ('torch.storage', '_load_from_bytes') and len(rec.args) == 1
                and type(rec.args[0]) is bytes and rec.state is None):
            raise _BadFile('tensor record whose storage is not a torch.storage._load_from_bytes blob')
        if id(rec) not in self.storages:
            blob = rec.args[0]
            obj, pids, layout = _legacy_layout(io.BytesIO(blob), len(blob), _STORAGE_GLOBALS, 'a storage blob')
            if len(pids) != 1 or obj is not pids[0]:
                raise _BadFile('storage blob that is not exactly one storage')
            dtype, numel, start = next(iter(layout.values()))
            self.storages[id(rec)] = (dtype, numel, blob, start)
            self.storage_bytes += numel * dtype.itemsize
        return self.storages[id(rec)]

    def tensor(self, rec):
        # _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        args = rec.args
        if len(args) not in (6, 7) or rec.state is not None:
            raise _BadFile('malformed torch._utils._rebuild_tensor_v2 record')
        dtype, numel, blob, start = self.storage(args[0])
        offset, size, stride, requires_grad, hooks = args[1:6]
        if type(requires_grad) is not bool or not (type(hooks) is dict and not hooks) or (len(args) == 7 and args[6] not in (None, {})):
            raise _BadFile('tensor record with hooks or metadata (not part of the EDM format)')
        _check_view(numel, offset, size, stride)
        count = math.prod(size)
        self.tensor_bytes += count * dtype.itemsize
        if self.tensor_bytes > self.storage_bytes:
            raise _BadFile(f'tensors describe more data ({self.tensor_bytes} bytes so far) than the file holds '
                           f'({self.storage_bytes} bytes of storages): views share a storage')
        # A fresh tensor, sharing nothing with the blob or other tensors. Contiguous views (all of EDM's) are one
        # bytearray copy, which is also much faster than a multi-threaded copy_ on a busy machine.
        if count and all(s == math.prod(size[i + 1:]) for i, (n, s) in enumerate(zip(size, stride)) if n > 1):
            first = start + offset * dtype.itemsize
            return torch.frombuffer(bytearray(memoryview(blob)[first:first + count * dtype.itemsize]), dtype=dtype).reshape(size)
        out = torch.empty(size, dtype=dtype)
        if count:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # frombuffer warns that bytes are read-only; they are only read
                flat = torch.frombuffer(blob, dtype=dtype, count=numel, offset=start)
            out.copy_(flat.as_strided(size, stride, offset))
        return out


def read_pickle(path_or_file):
    """Read an EDM-format pickle as plain data (dicts, lists, numbers, tensors, Persistent / ModuleDictRecord
    records). Never executes code from the file and never hands it a real object; raises UnsafePickleError for
    what the format does not allow (foreign globals, BUILD on anything but a ModuleDict / NumPy dtype record),
    ValueError for a corrupt or oversized file."""
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, 'rb') as f:
            return read_pickle(f)
    f = path_or_file
    name = getattr(f, 'name', 'input')
    try:
        start = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(start)
        records = _Unpickler(f, end, set(_EDM_GLOBALS), _EDM_BUILDABLE, what='the EDM pickle format').load()
        return _EDMData().value(records)
    except UnsafePickleError as e:
        raise UnsafePickleError(f'{name}: {e}') from None
    except Exception as e:  # truncated streams, wrong opcodes, failed checks: all are "not an EDM pickle"
        reason = str(e) if isinstance(e, _BadFile) else f'{type(e).__name__}: {_first_line(e)}'
        raise ValueError(f'{name}: not a readable EDM network pickle ({reason})') from None


def pickle_values(data):
    """Every distinct object inside read_pickle data (containers, the states of records, leaves), each once:
    walking a DAG costs its distinct nodes, never its paths (2^40 of them fit in a few KB)."""
    seen, stack = set(), [data]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, (Persistent, ModuleDictRecord)):
            stack.append(x.state)


def persistent_state_dict(obj, prefix=''):
    """state_dict (name -> tensor, in nn.Module.state_dict order) of a Persistent module tree. Each module is
    visited once: one reached twice (a DAG, whose paths could number 2^40) is refused, as is a malformed state."""
    out, seen = collections.OrderedDict(), set()

    def field(state, key, kind, where):
        value = state.get(key, {})
        if not isinstance(value, kind):
            raise ValueError(f'module {where or "<root>"}: {key} is a {type(value).__name__}')
        return value

    def walk(module, prefix, depth):
        where = prefix[:-1]
        if id(module) in seen:
            raise ValueError(f'module {where} appears twice in the module tree (EDM networks are trees)')
        if depth > MAX_NESTING:
            raise ValueError(f'module tree deeper than {MAX_NESTING} levels')
        seen.add(id(module))
        state = module.state
        non_persistent = field(state, '_non_persistent_buffers_set', (set, frozenset, dict), where)
        tensors = [*field(state, '_parameters', dict, where).items(),
                   *((k, v) for k, v in field(state, '_buffers', dict, where).items() if k not in non_persistent)]
        for name, value in tensors:
            if type(name) is not str or not name or '.' in name or prefix + name in out or not (value is None or isinstance(value, torch.Tensor)):
                raise ValueError(f'module {where or "<root>"}: entry {name!r:.40} is not a tensor with a unique plain name')
            if value is not None:
                out[prefix + name] = value
        for name, child in field(state, '_modules', dict, where).items():
            if child is None:
                continue
            if type(name) is not str or not name or '.' in name or not isinstance(child, (Persistent, ModuleDictRecord)):
                raise ValueError(f'module {where or "<root>"}: child {name!r:.40} is not a module record')
            walk(child, prefix + name + '.', depth + 1)

    walk(obj, prefix, 0)
    return out

# --- torch.save files (gdd-min checkpoints and training states, backbone weights) -------------------------------

def _open_zip(f, size):
    """zipfile.ZipFile(f) once the end record says that the central directory is no larger than MAX_ZIP_MEMBERS
    entries need (zipfile makes an object per entry before anyone could count them)."""
    end = zipfile._EndRecData(f)
    if end is None:
        raise _BadFile('not a zip archive (no end-of-directory record)')
    if end[zipfile._ECD_SIZE] > min(size, MAX_ZIP_MEMBERS * 1024):
        raise _BadFile(f'zip directory of {end[zipfile._ECD_SIZE]} bytes, more than the file or {MAX_ZIP_MEMBERS:,} members need')
    zf = zipfile.ZipFile(f)
    if len(zf.infolist()) > MAX_ZIP_MEMBERS:
        raise _BadFile(f'zip archive with {len(zf.infolist())} members, more than {MAX_ZIP_MEMBERS:,}')
    return zf


def _torch_zip(f, size, deflated_limit=0):
    """Check the central directory of a torch zip archive (torch.save, torch.jit.save) before anything reads a
    member: a directory no larger than MAX_ZIP_MEMBERS entries need, unique names under one top folder, every
    member inside the file and stored uncompressed (torch.save) -- or deflated, up to deflated_limit declared
    bytes in total (the code files of torch.jit.save). Returns (ZipFile, top folder)."""
    zf = _open_zip(f, size)
    infos = zf.infolist()
    if not infos or len({i.filename for i in infos}) != len(infos):
        raise _BadFile(f'zip archive with {len(infos)} members or duplicate names')
    top = infos[0].filename.split('/', 1)[0]
    inflated = 0
    for i in infos:
        if not i.filename.startswith(top + '/'):
            raise _BadFile(f'zip member {i.filename!r:.80} outside the archive folder {top!r:.80}')
        if i.compress_type == zipfile.ZIP_DEFLATED and deflated_limit:
            inflated += i.file_size
        elif i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size:
            raise _BadFile(f'zip member {i.filename!r:.80} is compressed (torch archives store their data uncompressed)')
        if i.header_offset + 30 + len(i.filename) + i.compress_size > size:
            raise _BadFile(f'zip member {i.filename!r:.80} reaches past the end of the file')
    if inflated > deflated_limit:
        raise _BadFile(f'zip members declare {inflated} bytes of compressed data (at most {deflated_limit} accepted)')
    return zf, top


def check_torch_zip(source, deflated_limit=0):
    """_torch_zip for a path or a binary file (e.g. the TorchScript archive inside a detector pickle), before
    torch.jit.load reads it; raises ValueError('<name>: <problem>')."""
    name = getattr(source, 'name', None) or str(source)
    try:
        with (open(source, 'rb') if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source)) as f:
            _torch_zip(f, f.seek(0, os.SEEK_END), deflated_limit)
            f.seek(0)
    except (_BadFile, zipfile.BadZipFile) as e:
        raise ValueError(f'{name}: {e}') from None


def _check_loaded(obj):
    """Walk torch.load's result once (each container once, nesting bounded): every tensor a plain CPU view that
    lies in its storage without overlapping itself, and all of them together no more bytes than their storages
    (torch accepts stride-0 views, which can describe gigabytes with a 4-byte storage)."""
    seen, storages, tensor_bytes, stack = set(), {}, 0, [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        if x is None or type(x) in _PLAIN or id(x) in seen:
            continue
        seen.add(id(x))
        if depth > MAX_NESTING:
            raise _BadFile(f'data nested deeper than {MAX_NESTING} levels')
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided or x.device.type != 'cpu' or x.is_quantized:
                raise _BadFile(f'a {x.layout} / {x.device} tensor (only plain CPU tensors are expected)')
            s = x.untyped_storage()
            _check_view(s.nbytes() // x.element_size(), x.storage_offset(), tuple(x.shape), x.stride())
            storages[s.data_ptr(), s.nbytes()] = s.nbytes()
            tensor_bytes += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend((v, depth + 1) for v in x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in x)
    if tensor_bytes > sum(storages.values()):
        raise _BadFile(f'tensors describe {tensor_bytes} bytes but the file holds {sum(storages.values())} (shared views)')


def _weights_only_reason(e):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(('Weights only load failed', 'Check the documentation', 'Please file an issue'))]
    return (useful or lines or [type(e).__name__])[0].removeprefix('WeightsUnpickler error: ')


def _check_crcs(zf):
    # torch.load does not verify the zip CRC-32s, so a flipped bit in a weight would load as a silently wrong
    # value. Reading each member once (streamed) lets zipfile check it; CRC 0 marks a writer that skipped it
    # (torch.serialization.config.save.compute_crc32 = False).
    for info in zf.infolist():
        if info.CRC == 0 and info.file_size:
            continue
        with zf.open(info) as member:
            try:
                while member.read(1 << 22):
                    pass
            except zipfile.BadZipFile:
                raise _BadFile(f'zip member {info.filename!r:.80} fails its CRC-32 check (the file is corrupted)') from None


def load_torch_file(path):
    """Validated torch.load(path, map_location='cpu', weights_only=True) for any torch.save file that comes from
    outside (gdd-min checkpoints and training states, backbone weights): a hostile or broken file costs no more
    time and memory than the bytes it really holds, and is refused in one line.
    - Before torch reads anything: a zip archive must pass _torch_zip (members stored, inside the file, bounded
      count) and its data.pkl is pre-read by the inert machine, so every storage it declares has exactly the
      bytes of its record, and every member's CRC-32 is checked; a legacy (non-zip) file must pass
      _legacy_layout. Anything else (a tar file, a bare pickle) is refused.
    - torch's weights_only unpickler then loads it; its refusals become one line.
    - The result is walked once (_check_loaded): plain CPU tensors, non-overlapping views inside their storages.
    Returns the loaded object. Raises FileNotFoundError, or ValueError('<path>: <problem>') (UnsafePickleError,
    a ValueError, when a global or opcode is refused)."""
    name = str(path)
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(4) == b'PK\x03\x04':
                zf, top = _torch_zip(f, size)
                pids, data = [], zf.read(f'{top}/data.pkl')
                _Unpickler(io.BytesIO(data), len(data), None, None, pids, 'a torch.save file').load()
                for key, (dtype, numel) in _storages(pids).items():
                    info = zf.NameToInfo.get(f'{top}/data/{key}')
                    if info is None or info.file_size != numel * dtype.itemsize:
                        raise _BadFile(f'storage {key!r} declares {numel} x {dtype}, its record holds '
                                       f'{"nothing" if info is None else f"{info.file_size} bytes"}')
                _check_crcs(zf)
            else:
                f.seek(0)
                _legacy_layout(f, size)
    except FileNotFoundError:
        raise FileNotFoundError(f'no such file: {path}') from None
    except UnsafePickleError as e:
        raise UnsafePickleError(f'{name}: {e}') from None
    except Exception as e:
        reason = str(e) if isinstance(e, _BadFile) else f'{type(e).__name__}: {_first_line(e)}'
        raise ValueError(f'{name}: not a readable torch.save file ({reason})') from None
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f'{name}: refused by torch.load(weights_only=True): {_weights_only_reason(e)}') from None
    except Exception as e:
        raise ValueError(f'{name}: torch.load failed ({type(e).__name__}: {_first_line(e)})') from None
    try:
        _check_loaded(obj)
    except _BadFile as e:
        raise ValueError(f'{name}: {e}') from None
    return obj

# --- npz files (reference statistics, generated images) ---------------------------------------------------------

class NpzFile:
    """An .npz (np.savez / np.savez_compressed) read member by member, each checked before its data is
    decompressed: at most MAX_ZIP_MEMBERS members, stored or deflated; a member's .npy header must declare a
    plain numeric dtype and a shape whose byte size is exactly the member's declared size, and array() reads
    only up to the caller's bound. So a 1 MB file cannot inflate to gigabytes unasked. Errors:
    ValueError('<path>: <problem>')."""
    def __init__(self, path):
        self.path, self.file = str(path), open(path, 'rb')
        try:
            self.zip = _open_zip(self.file, os.fstat(self.file.fileno()).st_size)
            infos = self.zip.infolist()
            if any(i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) for i in infos):
                raise _BadFile('a member uses a compression other than deflate')
        except (_BadFile, zipfile.BadZipFile, OSError, EOFError) as e:
            self.file.close()
            raise ValueError(f'{self.path}: not an npz file ({_first_line(e)})') from None
        self.members = {i.filename[:-4]: i for i in infos if i.filename.endswith('.npy')}
        self.files = list(self.members)

    def open(self, key):
        """(binary file positioned at the data, shape, dtype, fortran_order) of member `key`, header checked."""
        info = self.members[key]
        try:
            f = self.zip.open(info)
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f'unsupported .npy version {version}')
            size = f.read(2 if version == (1, 0) else 4)   # header length: bounded before the header is read
            if len(size) not in (2, 4) or int.from_bytes(size, 'little') > 10000:
                raise ValueError(f'header of {int.from_bytes(size, "little")} bytes')
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(io.BytesIO(size + f.read(int.from_bytes(size, 'little'))), max_header_size=10000)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f'{self.path}: array {key!r} has a bad .npy header ({_first_line(e)})') from None
        if dtype.kind not in 'biuf' or dtype.fields is not None or dtype.subdtype is not None:
            raise ValueError(f'{self.path}: array {key!r} has dtype {dtype} (only plain numbers are accepted)')
        nbytes = math.prod(shape) * dtype.itemsize
        if info.file_size != f.tell() + nbytes:
            raise ValueError(f'{self.path}: array {key!r} declares {list(shape)} {dtype} but its member holds '
                             f'{info.file_size - f.tell()} bytes of data')
        return f, shape, dtype, fortran

    def array(self, key, max_bytes):
        """Member `key` as an array, refused when it would take more than max_bytes."""
        f, shape, dtype, fortran = self.open(key)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > max_bytes:
            raise ValueError(f'{self.path}: array {key!r} of {list(shape)} {dtype} ({nbytes:,} bytes) exceeds the limit '
                             f'of {max_bytes:,} bytes for it')
        return np.frombuffer(self.read(f, nbytes), dtype).reshape(shape, order='F' if fortran else 'C')

    def read(self, f, n):
        """Exactly n bytes of an open member, read in pieces of 1 MiB; corrupt or truncated data (CRC checked at the
        member's end) is a ValueError."""
        out = []
        try:
            while n > 0 and (chunk := f.read(min(n, 1 << 20))):
                n -= len(chunk)
                out.append(chunk)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f'{self.path}: corrupt data ({_first_line(e)})') from None
        if n > 0:
            raise ValueError(f'{self.path}: truncated data')
        return b''.join(out)

    def close(self):
        self.zip.close()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

# --- init_kwargs and building networks -------------------------------------------------------------------------
#
# A file's init_kwargs are checked before anything is built: plain values of the right type, within bounds
# (construction must not loop or allocate without end: iDDPMPrecond computes its M noise levels one at a time,
# and model_channels / channel_mult / num_blocks decide the network's size), and only names the constructor
# takes. The network is then built on the meta device and its state_dict names, shapes and dtypes compared with
# the file's before any memory is allocated for it, so its size is what the file really holds.

_KWARG_RULES = {  # name: (kind, lo, hi[, max list length])
    'img_resolution': ('int', 1, 4096), 'img_channels': ('int', 1, 64), 'label_dim': ('int', 0, 100_000),
    'augment_dim': ('int', 0, 1024), 'model_channels': ('int', 1, 4096), 'channel_mult_emb': ('int', 1, 64),
    'channel_mult_noise': ('int', 1, 64), 'num_blocks': ('int', 0, 32), 'M': ('int', 1, 10_000),
    'channel_mult': ('ints', 1, 64, 12), 'attn_resolutions': ('ints', 1, 4096, 16), 'resample_filter': ('taps', 0, 1e6, 16),
    'dropout': ('float', 0, 1), 'label_dropout': ('float', 0, 1), 'use_fp16': ('bool',),
    'model_type': ('str',), 'embedding_type': ('str',), 'encoder_type': ('str',), 'decoder_type': ('str',),
    'sigma_min': ('float', 0, math.inf), 'sigma_max': ('float', 0, math.inf), 'sigma_data': ('float', 1e-12, 1e6),
    'beta_d': ('float', -1e6, 1e6), 'beta_min': ('float', -1e6, 1e6), 'epsilon_t': ('float', 0, 1),
    'C_1': ('float', 0, 1e6), 'C_2': ('float', 0, 1e6), 'eps': ('float', 0, 1e6),
}


def _check_kwarg(name, v, rule):
    kind, lo, hi, length = (*rule, None, None, None)[:4]
    number = lambda x: type(x) in (int, float) and lo <= x <= hi  # not bool; NaN fails both comparisons
    ok = {'int': lambda: type(v) is int and lo <= v <= hi, 'float': lambda: number(v), 'bool': lambda: type(v) is bool,
          'str': lambda: type(v) is str and len(v) <= 100,
          'ints': lambda: type(v) in (list, tuple) and len(v) <= length and all(type(x) is int and lo <= x <= hi for x in v),
          'taps': lambda: type(v) in (list, tuple) and len(v) <= length and all(map(number, v)) and sum(v) > 0}[kind]()
    if not ok:
        expected = {'int': f'an int in [{lo}, {hi}]', 'float': f'a number in [{lo}, {hi}]', 'bool': 'True or False',
                    'str': 'a string of at most 100 characters', 'ints': f'a list of at most {length} ints in [{lo}, {hi}]',
                    'taps': f'a list of at most {length} non-negative numbers with a positive sum'}[kind]
        raise ValueError(f'init_kwargs {name}={v!r:.60} is not {expected}')


def check_init_kwargs(cls, kwargs):
    """Refuse init_kwargs that cls (a _Precond wrapper) could not be built from safely: see the comment above."""
    if type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
        raise ValueError('init_kwargs is not a dict of names')
    # The wrapper's own arguments (its class and bases up to _Precond), then those it passes on to the U-Net.
    mro = cls.__mro__[:cls.__mro__.index(_Precond)] if _Precond in cls.__mro__ else cls.__mro__[:1]
    wrapper = [inspect.signature(c.__init__).parameters for c in mro if '__init__' in c.__dict__]
    model_type = kwargs.get('model_type', next((p['model_type'].default for p in wrapper if 'model_type' in p), None))
    if model_type not in UNETS:
        raise ValueError(f'unknown model_type {model_type!r}; supported: {", ".join(UNETS)}')
    unet = inspect.signature(UNETS[model_type].__init__).parameters
    def named(params, drop=()):
        return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ('self', *drop)}
    accepted = set().union(*map(named, wrapper)) | named(unet, ('img_resolution', 'in_channels', 'out_channels', 'label_dim'))
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f'unknown init_kwargs for {cls.__name__} with {model_type}: {", ".join(unknown)}')
    for name, v in kwargs.items():
        if name in _KWARG_RULES:
            _check_kwarg(name, v, _KWARG_RULES[name])
        elif not (v is None or type(v) in (bool, int, float, str) or
                  (type(v) in (list, tuple) and len(v) <= 64 and all(x is None or type(x) in (bool, int, float, str) for x in v))):
            raise ValueError(f'init_kwargs {name} is a {type(v).__name__} (only plain numbers, strings and lists are accepted)')
    levels, resolution = len(kwargs.get('channel_mult', unet['channel_mult'].default)), kwargs.get('img_resolution')
    if resolution is not None and resolution % (1 << (levels - 1)):
        raise ValueError(f'init_kwargs img_resolution={resolution} is not divisible by 2^{levels - 1} ({levels} resolution levels)')


def _check_state_dict(net, state_dict, class_name):
    """The file's state_dict against the (meta) network's: same names, shapes and dtypes (never cast silently: EDM
    files store fp32 parameters), plain CPU tensors, finite values."""
    if not isinstance(state_dict, dict):
        raise ValueError('state_dict is not a dict')
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [str(k) for k in state_dict if k not in expected]
    wrong = []
    for k, v in expected.items():
        t = state_dict.get(k)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type != 'cpu':
            wrong.append(f'{k} is a {type(t).__name__}, not a CPU tensor')
        elif t.shape != v.shape or t.dtype != v.dtype:
            wrong.append(f'{k} {list(t.shape)} {t.dtype} vs {list(v.shape)} {v.dtype}')
    if missing or unexpected or wrong:
        def few(ks):
            return ', '.join(ks[:3]) + (f' (+{len(ks) - 3} more)' if len(ks) > 3 else '')
        problems = [f'{what} [{few(ks)}]' for what, ks in [('missing', missing), ('unexpected', unexpected),
                                                              ('wrong shape or dtype', wrong)] if ks]
        raise ValueError(f'state_dict does not match {class_name}(**init_kwargs): {", ".join(problems)}')
    for k, t in state_dict.items():
        if not all_finite(t):
            raise ValueError(f'tensor {k} has non-finite values (NaN or inf)')


def all_finite(t):
    """No NaN / inf in t. A non-finite value makes the sum non-finite (inf - inf is NaN), and finite weights do not
    sum to 1e38, so the sum decides (many times faster than isfinite(t).all() on a busy machine); only a sum that
    overflows is checked element by element."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32 if t.element_size() < 4 else None))) or bool(torch.isfinite(t).all())


def build_network(class_name, init_kwargs, state_dict=None, classes=None):
    """Construct a wrapper by class name (NETWORKS, extended by `classes`) and strictly load state_dict, after
    check_init_kwargs and, on the meta device, _check_state_dict. Errors: ValueError (the caller names the file)."""
    known = {**NETWORKS, **(classes or {})}
    if class_name not in known:
        raise ValueError(f'unsupported network class {class_name!r}; supported: {", ".join(sorted(known))}')
    cls = known[class_name]
    check_init_kwargs(cls, init_kwargs)
    if state_dict is None:
        return cls(**init_kwargs)
    try:
        with torch.device('meta'):  # nothing allocated yet; every tensor is then copied from state_dict
            net = cls(**init_kwargs)
    except (TypeError, ValueError, AssertionError, ArithmeticError, LookupError, RuntimeError) as e:
        raise ValueError(f'cannot build {class_name} from its init_kwargs ({type(e).__name__}: {_first_line(e)})') from None
    _check_state_dict(net, state_dict, class_name)
    net = net.to_empty(device='cpu')
    net.load_state_dict(state_dict, strict=True)  # copies, so two networks built from one state_dict never share memory
    return net

# ----------------------------------------------------------------------------------------------------------------
# Project checkpoints, downloads, loading networks.

def net_to_dict(net):
    """Plain-data description of a wrapper (loadable with torch.load(weights_only=True))."""
    return {'class_name': type(net).__name__, 'init_kwargs': copy.deepcopy(net.init_kwargs),
            'state_dict': {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}


def atomic_save(obj, path):
    """torch.save to a temporary file next to `path`, fsync, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_url(source, cache_dir=None):
    """Local path as is, or an http(s) URL downloaded once into the cache ($GDD_CACHE, else ~/.cache/gdd-min)."""
    source = str(source)
    if not re.match(r'^https?://', source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f'no such file: {source}')
        return path
    cache_dir = Path(cache_dir or os.environ.get('GDD_CACHE') or Path.home() / '.cache' / 'gdd-min')
    base = re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(urllib.parse.urlparse(source).path)) or 'download'
    path = cache_dir / f'{hashlib.sha256(source.encode()).hexdigest()[:16]}_{base}'
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        try:
            r = urllib.request.urlopen(source, timeout=60)
        except (OSError, ValueError) as e:   # URLError, HTTPError and timeouts are OSErrors
            reason = _first_line(getattr(e, 'reason', None) or e)
            raise OSError(f'could not download {source} ({reason}); download it elsewhere and pass the local path') from None
        with r, open(tmp, 'wb') as f:
            total = int(r.headers.get('Content-Length') or 0)
            done = 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                print(f'\rdownloading {base}: {done / 2**20:.1f}' + (f' / {total / 2**20:.1f}' if total else '') + ' MiB',
                      end='', file=sys.stderr, flush=True)
            print(file=sys.stderr)
            if total and done != total:
                raise OSError(f'download of {source} incomplete ({done} of {total} bytes)')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def is_zip(path):
    """A zip archive (torch.save / torch.jit.save), told by its first bytes: zipfile.is_zipfile also accepts a
    pickle that merely holds an archive near its end."""
    with open(path, 'rb') as f:
        return f.read(4) == b'PK\x03\x04'


def load_network(source, key='ema', classes=None, device='cpu'):
    """Network from an official EDM/GDD pickle (read_pickle) or a gdd-min checkpoint (load_torch_file), in eval
    mode; everything in the file is validated first (see the section above). source: local path or http(s) URL;
    key: entry of the file ('ema', or 'net' for training checkpoints)."""
    path = open_url(source)
    if is_zip(path):  # torch.save archive: our own checkpoint format
        ckpt = load_torch_file(path)
        if not isinstance(ckpt, dict) or ckpt.get('format') != 'gdd-min':
            raise ValueError(f'{path}: a torch archive, but not a gdd-min checkpoint')
        if key not in ckpt:
            raise ValueError(f'{path}: no {key!r} entry (has: {", ".join(map(str, list(ckpt)[:10]))})')
        d = ckpt[key]
        if not (isinstance(d, dict) and type(d.get('class_name')) is str and isinstance(d.get('init_kwargs'), dict)
                and isinstance(d.get('state_dict'), dict)):
            raise ValueError(f'{path}: entry {key!r} is not a network (class_name, init_kwargs, state_dict)')
        obj, class_name, init_kwargs, state_dict = None, d['class_name'], dict(d['init_kwargs']), d['state_dict']
    else:
        data = read_pickle(path)
        obj = data.get(key) if isinstance(data, dict) else None
        if not isinstance(obj, Persistent):
            raise ValueError(f'{path}: no network under key {key!r}')
        class_name, init_kwargs, state_dict = obj.class_name, obj.init_kwargs, None
        if obj.init_args:
            raise ValueError(f'{path}: positional init_args (EDM passes every constructor argument by name)')
    try:
        state_dict = persistent_state_dict(obj) if state_dict is None else state_dict
        net = build_network(class_name, init_kwargs, state_dict, classes)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    return net.eval().to(device)

# ----------------------------------------------------------------------------------------------------------------
# EDM sampler (EDM paper, Algorithm 2): Heun's 2nd-order method with optional stochastic churn, in float64.

def sigma_steps(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, device='cpu'):
    """EDM Eq. 5: t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, float64."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    frac = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    return (hi + frac * (lo - hi)) ** rho


@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, randn_like=torch.randn_like):
    """Sample x_0 from latents ~ N(0, I) with 2 * num_steps - 1 network evaluations; returns float64 images."""
    def dx_dt(x, t):  # probability-flow ODE with sigma(t) = t (EDM Eq. 4 / Algorithm 2): (x - D(x; t)) / t
        return (x - net(x, t, class_labels).to(torch.float64)) / t

    sigmas = sigma_steps(num_steps, max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max), rho, latents.device)
    sigmas = F.pad(net.round_sigma(sigmas), (0, 1))  # t_N = 0
    x = latents.to(torch.float64) * sigmas[0]
    for i in range(num_steps):
        t, t_next = sigmas[i], sigmas[i + 1]
        # Churn: raise the noise level to t_hat = t + gamma t with fresh noise (drawn even when gamma = 0, as EDM).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t <= S_max else 0
        t_hat = net.round_sigma(t + gamma * t)
        x_hat = x + (t_hat ** 2 - t ** 2).sqrt() * S_noise * randn_like(x)
        slope = dx_dt(x_hat, t_hat)
        x = x_hat + (t_next - t_hat) * slope                           # Euler step
        if i < num_steps - 1:                                          # Heun correction (not at t_N = 0):
            x = x_hat + (t_next - t_hat) * ((slope + dx_dt(x, t_next)) / 2)  # trapezoidal rule
    return x

# ----------------------------------------------------------------------------------------------------------------

if __name__ == '__main__':
    import argparse
    import time
    parser = argparse.ArgumentParser(description='Micro-benchmark: forward+backward of the CIFAR-10 NCSN++ network '
                                                 '(kwargs of edm-cifar10-32x32-uncond-ve.pkl) at sigma = 80.')
    parser.add_argument('--bench', action='store_true', help='run the benchmark')
    parser.add_argument('--batch', type=int, default=8, help='batch size (default: 8)')
    parser.add_argument('--iters', type=int, default=3, help='timed iterations after one warm-up (default: 3)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    parser.add_argument('--load', metavar='FILE', help='instead: time the validated loading of FILE (an EDM / GDD pickle '
                                                       'or a gdd-min checkpoint) and report peak memory')
    args = parser.parse_args()
    if args.load:
        import resource
        t0 = time.perf_counter()
        data = load_torch_file(args.load) if is_zip(args.load) else read_pickle(args.load)
        t1 = time.perf_counter()
        del data
        net = load_network(args.load)
        t2 = time.perf_counter()
        print(f'{args.load}: {os.path.getsize(args.load) / 2**20:.0f} MiB, {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M '
              f'parameters: read and checked in {t1 - t0:.2f} s; load_network {t2 - t1:.2f} s (network built and checked); '
              f'peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')
        raise SystemExit(0)
    if not args.bench:
        parser.print_help()
        raise SystemExit(0)
    if args.batch < 1 or args.iters < 1:
        parser.error('--batch and --iters must be positive')
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=32, img_channels=3, model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                     decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                     channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13, use_fp16=args.device == 'cuda').to(args.device).train()
    x = torch.randn(args.batch, 3, 32, 32, device=args.device) * 80
    sigma = torch.full([args.batch], 80.0, device=args.device)
    times = []
    for i in range(args.iters + 1):
        t0 = time.perf_counter()
        net(x, sigma).square().mean().backward()
        if args.device == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f'iter {i}: {times[-1]:.3f} s' + (' (warm-up)' if i == 0 else ''), file=sys.stderr)
    params = sum(p.numel() for p in net.parameters())
    print(f'NCSN++ CIFAR-10 ({params / 1e6:.1f}M params), batch {args.batch}, {args.device}, {torch.get_num_threads()} threads'
          f'{", bf16" if net.use_fp16 else ""}: forward+backward median {np.median(times[1:]):.2f} s, min {min(times[1:]):.2f} s over {args.iters} iterations')
