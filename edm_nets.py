"""EDM networks (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"),
written to load the official EDM checkpoints exactly and safely.

- Layers, SongUNet (DDPM++ / NCSN++), DhariwalUNet (ADM) and the preconditioning wrappers EDMPrecond,
  VPPrecond, VEPrecond, iDDPMPrecond. Constructor keyword arguments and state_dict names/shapes are those of
  EDM's training/networks.py, so load_state_dict(strict=True) works for every official file.
- A safe reader for EDM's pickles (read_pickle): a restricted unpickler that never runs the Python source
  embedded in them, plus load_network() for those pickles and for this project's own checkpoints.
- edm_sampler: EDM's Heun sampler (EDM paper, Algorithm 2), the multi-step teacher baseline.

Mixed precision (recipe A.4, quirk I.11): with use_fp16 the U-Net runs in bfloat16 on CUDA, not via autocast.
Convolutions and linear layers cast their fp32 master weights to the input dtype; the noise embedding, the
mapping MLP and the per-block affine layers see fp32 inputs (so they run in fp32), GroupNorm and the attention
softmax are computed in fp32, and the wrapper casts the U-Net output back to fp32.
"""

import collections
import copy
import hashlib
import io
import math
import os
import pickle
import re
import sys
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Layers. Every layer casts its (fp32) parameters to the dtype of its input, which is how the bf16 path works.

# Weight initialisation used by EDM's constructors (only matters when training from scratch; checkpoints
# overwrite it). Uniform variants draw from U(-a, a).
_INIT = {
    'xavier_uniform':  lambda shape, fan_in, fan_out: math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1),
    'kaiming_uniform': lambda shape, fan_in, fan_out: math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1),
    'kaiming_normal':  lambda shape, fan_in, fan_out: math.sqrt(1 / fan_in) * torch.randn(*shape),
}

def _init_param(shape, mode, fan_in, fan_out, scale):
    return torch.nn.Parameter(_INIT[mode](shape, fan_in, fan_out) * scale)


class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _init_param([out_features, in_features], init_mode, in_features, out_features, init_weight)
        self.bias = _init_param([out_features], init_mode, in_features, out_features, init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x


class Conv2d(torch.nn.Module):
    """Convolution with optional 2x up/down-sampling by a separable FIR filter (kernel=0: resampling only)."""
    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1, 1], fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = _init_param([out_channels, in_channels, kernel, kernel], init_mode, fan_in, fan_out, init_weight) if kernel else None
        self.bias = _init_param([out_channels], init_mode, fan_in, fan_out, init_bias) if kernel and bias else None
        # 2-D filter = outer(v, v) / sum(v)^2, so it sums to 1 (up-sampling multiplies it by 4 = 2x2 zero stuffing).
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


class GroupNorm(torch.nn.Module):
    """GroupNorm with at most num_groups groups of at least min_channels_per_group channels.
    Recipe A.4: always normalised in fp32 and cast back (EDM normalises in the input dtype; same in fp32)."""
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        y = F.group_norm(x.float(), num_groups=self.num_groups, weight=self.weight.float(), bias=self.bias.float(), eps=self.eps)
        return y.to(x.dtype)


class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding of the noise label: [cos(x f_i), sin(x f_i)],
    f_i = (1/max_positions)^(i / (C/2 - endpoint)), i = 0..C/2-1."""
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features (NCSN++): [cos(2 pi freqs x), sin(2 pi freqs x)], freqs ~ N(0, scale^2) stored as a buffer."""
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(torch.nn.Module):
    """Pre-activation residual block with noise-embedding conditioning and optional self-attention."""
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None,             # None: out_channels // channels_per_head
                 channels_per_head=64,
                 dropout=0,
                 skip_scale=1,               # residual sums are multiplied by this (sqrt(1/2) in SongUNet)
                 eps=1e-5,                   # GroupNorm epsilon
                 resample_filter=[1, 1],
                 resample_proj=False,        # 1x1 conv on a resampling skip even when channels match
                 adaptive_scale=True,        # emb -> (scale, shift) as in ADM, else emb is added
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)  # affine runs in fp32 (emb is fp32)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))   # silu(shift + norm(x) * (1 + scale))
        else:
            x = F.silu(self.norm1(x.add_(params)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            # qkv channels are grouped per head, and within a head channel c owns 3 consecutive channels (q, k, v).
            q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
            w = attention_weights(q, k)
            a = torch.einsum('nqk,nck->ncq', w, v)              # (N*heads, C/heads, HW)
            x = self.proj(a.reshape(*x.shape)).add_(x)
            x = x * self.skip_scale
        return x


def attention_weights(q, k):
    """softmax_keys(q^T k / sqrt(d)) computed in fp32 (k is scaled first, as in EDM), returned in q's dtype.
    q, k: (N*heads, d, HW) -> (N*heads, HW_query, HW_key)."""
    w = torch.einsum('ncq,nck->nqk', q.float(), (k / np.sqrt(k.shape[1])).float())
    return w.softmax(dim=2).to(q.dtype)

# ----------------------------------------------------------------------------------------------------------------
# U-Nets. Both are called as model(x, noise_labels, class_labels, augment_labels=None) and return F(x).

class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net (Song et al. 2021), as reimplemented in EDM."""
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
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise embedding (+ labels, + augmentation labels) -> emb.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True) if embedding_type == 'positional' else FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. 'aux' modules carry a down-sampled copy of the input image (skip / residual encoders).
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder, from the lowest resolution up; each block consumes one encoder skip.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = labels * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(labels.dtype)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(torch.nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021), as reimplemented in EDM."""
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
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal', init_weight=math.sqrt(label_dim)) if label_dim else None

        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = labels * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


UNETS = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}

# ----------------------------------------------------------------------------------------------------------------
# Preconditioning (EDM paper, Table 1): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

# Device types on which use_fp16 switches the U-Net to bfloat16 (recipe A.4). Tests add 'cpu' to exercise
# the reduced-precision arithmetic without a GPU.
_REDUCED_PRECISION_DEVICES = {'cuda'}


class _Precond(torch.nn.Module):
    """Shared wrapper logic: input casting, label handling, the mixed-precision switch and the final sum."""
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        if model_type not in UNETS:
            raise ValueError(f'unknown model_type {model_type!r}; supported: {", ".join(UNETS)}')
        self.model = UNETS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                       out_channels=out_channels, label_dim=label_dim, **model_kwargs)

    def unet(self, x, sigma, class_labels, force_fp32, c_in, c_noise, **model_kwargs):
        """F(c_in x; c_noise) as float32, run in bfloat16 when use_fp16 applies."""
        dtype = torch.bfloat16 if (self.use_fp16 and not force_fp32 and x.device.type in _REDUCED_PRECISION_DEVICES) else torch.float32
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        return F_x.to(torch.float32)

    def prepare(self, x, sigma, class_labels):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)  # broadcasts over the batch
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0, sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16,
                                sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, model_type=model_type, **model_kwargs)

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
                 beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16,
                                beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t, model_type=model_type, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return x - sigma * self.unet(x, sigma, class_labels, force_fp32, c_in, c_noise, **model_kwargs)  # c_skip = 1, c_out = -sigma

    def sigma(self, t):
        t = torch.as_tensor(t, device='cpu') if not torch.is_tensor(t) else t
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        # t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    """Variance exploding (NCSN++ baseline)."""
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0.02, sigma_max=100, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16,
                                sigma_min=sigma_min, sigma_max=sigma_max, model_type=model_type, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        c_noise = (0.5 * sigma).log()
        return x + sigma * self.unet(x, sigma, class_labels, force_fp32, 1, c_noise, **model_kwargs)  # c_skip = c_in = 1, c_out = sigma


class iDDPMPrecond(_Precond):
    """Improved DDPM (ADM baseline): discrete cosine schedule; the U-Net also predicts variances (2x channels)."""
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 C_1=0.001, C_2=0.008, M=1000, model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels * 2, model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        # u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1) / abar(j), C_1) - 1), in float32.
        u = torch.zeros(M + 1, device='cpu')
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16,
                                C_1=C_1, C_2=C_2, M=M, model_type=model_type, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        F_x = self.unet(x, sigma, class_labels, force_fp32, c_in, c_noise, **model_kwargs)
        return x - sigma * F_x[:, :self.img_channels]  # c_skip = 1, c_out = -sigma; the variance channels are unused

    def alpha_bar(self, j):
        # abar(j) = sin(pi/2 * j / (M (C_2 + 1)))^2
        j = torch.as_tensor(j, device='cpu')
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """Nearest entry of the discrete schedule u (or its index)."""
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


NETWORKS = {cls.__name__: cls for cls in [EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond]}

# ----------------------------------------------------------------------------------------------------------------
# Safe reading of EDM network pickles (format: the fixtures' edm-formats.md, section a).
#
# EDM pickles store every network layer as a call _reconstruct_persistent_obj(meta), where meta holds the class
# name, the source code of its module and the object's __dict__. EDM's loader executes that source; we never do.
# The restricted unpickler below resolves only the globals the format needs, each to a harmless stand-in, so a
# persistent object comes back as a plain `Persistent` record and tensors come back as tensors.

class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing it references was executed."""


class Persistent:
    """Data of one EDM persistent object: class_name, init_args, init_kwargs and state (its __dict__)."""
    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != 6:
            raise pickle.UnpicklingError('unsupported EDM persistent object record (expected type "class", version 6)')
        self.class_name = meta['class_name']
        self.state = meta['state']
        self.init_args = tuple(self.state.get('_init_args', ()))
        self.init_kwargs = dict(self.state.get('_init_kwargs', {}))

    def __repr__(self):
        return f'Persistent({self.class_name}, init_kwargs={self.init_kwargs})'


class ModuleDictRecord:
    """Stand-in for a pickled torch.nn.ModuleDict: keeps the BUILD state (its __dict__, with `_modules`)."""
    def __setstate__(self, state):
        self.state = state


def _numpy_dtype(spec, align=False, copy=False):
    dtype = np.dtype(spec, align, True)  # always a fresh copy: the following BUILD mutates it
    if dtype.kind not in 'biuf':
        raise UnsafePickleError(f'refusing numpy dtype {dtype} (only numeric scalars are expected)')
    return dtype


def _numpy_scalar(dtype, data):
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError('malformed numpy scalar')
    return np.frombuffer(data, dtype=dtype)[0].item()  # plain python float/int


def _load_storage(blob):
    # Each storage is a complete legacy torch.save stream; torch's own weights_only unpickler reads it safely.
    return torch.load(io.BytesIO(blob), map_location='cpu', weights_only=True)


_PICKLE_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): Persistent,
    ('torch.nn.modules.container', 'ModuleDict'): ModuleDictRecord,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch.storage', '_load_from_bytes'): _load_storage,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,   # NumPy >= 2
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,    # NumPy 1.x
    ('numpy', 'dtype'): _numpy_dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            allowed = ', '.join(f'{m}.{n}' for m, n in _PICKLE_GLOBALS)
            raise UnsafePickleError(f'refusing to load global {module}.{name} (not part of the EDM pickle format; allowed: {allowed})')
        return _PICKLE_GLOBALS[(module, name)]


def read_pickle(path_or_file):
    """Read an EDM-format pickle as plain data (dicts, tensors, Persistent / ModuleDictRecord records).
    Never executes code from the file; raises UnsafePickleError for foreign globals, ValueError for a corrupt file."""
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, 'rb') as f:
            return read_pickle(f)
    try:
        return _RestrictedUnpickler(path_or_file).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated streams, wrong opcodes, foreign data: all are "not an EDM pickle"
        name = getattr(path_or_file, 'name', 'input')
        raise ValueError(f'{name}: not a readable EDM network pickle ({type(e).__name__}: {e})') from None


def persistent_state_dict(obj, prefix=''):
    """state_dict (name -> tensor, in nn.Module.state_dict order) of a Persistent module tree."""
    state = obj.state
    out = collections.OrderedDict()
    for name, value in state.get('_parameters', {}).items():
        if value is not None:
            out[prefix + name] = value.detach()
    non_persistent = state.get('_non_persistent_buffers_set', set())
    for name, value in state.get('_buffers', {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = value
    for name, child in state.get('_modules', {}).items():
        if child is not None:
            out.update(persistent_state_dict(child, prefix + name + '.'))
    return out

# ----------------------------------------------------------------------------------------------------------------
# Building networks, project checkpoints, downloads.

def build_network(class_name, init_kwargs, state_dict=None, classes=None):
    """Construct a wrapper by class name (NETWORKS, extended by `classes`) and strictly load state_dict."""
    known = {**NETWORKS, **(classes or {})}
    if class_name not in known:
        raise ValueError(f'unsupported network class {class_name!r}; supported: {", ".join(sorted(known))}')
    if state_dict is None:
        return known[class_name](**init_kwargs)
    with torch.device('meta'):  # skip the random init: every tensor is then copied from state_dict
        net = known[class_name](**init_kwargs)
    net = net.to_empty(device='cpu')
    net.load_state_dict(state_dict, strict=True)  # copies, so two networks built from one state_dict never share memory
    return net


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
        with urllib.request.urlopen(source, timeout=60) as r, open(tmp, 'wb') as f:
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


def load_network(source, key='ema', classes=None, device='cpu'):
    """Network from an official EDM/GDD pickle (safe reader) or a gdd-min checkpoint, in eval mode.
    source: local path or http(s) URL; key: entry of the file ('ema', or 'net' for training checkpoints)."""
    path = open_url(source)
    if zipfile.is_zipfile(path):  # torch.save archive: our own checkpoint format
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get('format') != 'gdd-min':
            raise ValueError(f'{path}: a torch archive, but not a gdd-min checkpoint')
        if key not in ckpt:
            raise ValueError(f'{path}: no {key!r} entry (has: {", ".join(map(str, ckpt))})')
        d = ckpt[key]
        net = build_network(d['class_name'], d['init_kwargs'], d['state_dict'], classes)
    else:
        data = read_pickle(path)
        obj = data.get(key) if isinstance(data, dict) else None
        if not isinstance(obj, Persistent):
            raise ValueError(f'{path}: no network under key {key!r}')
        net = build_network(obj.class_name, obj.init_kwargs, persistent_state_dict(obj), classes)
    return net.eval().to(device)

# ----------------------------------------------------------------------------------------------------------------
# EDM sampler (EDM paper, Algorithm 2): Heun's 2nd-order method with optional stochastic churn.

def sigma_steps(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, device='cpu'):
    """EDM Eq. 5: t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, float64."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, randn_like=torch.randn_like):
    """Sample x_0 from latents ~ N(0, I) with 2 * num_steps - 1 network evaluations; returns float64 images."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho, latents.device)
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])  # t_N = 0

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: raise the noise level to t_hat = t_cur (1 + gamma) by adding fresh noise (always drawn, as in EDM).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        # Euler step: dx/dt = (x - D(x; t)) / t.
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # 2nd-order correction (trapezoid), skipped on the last step where t_next = 0.
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

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
    args = parser.parse_args()
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
