"""EDM networks (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv 2206.00364), behaving as EDM's training/networks.py (github.com/NVlabs/edm) does.

- Layers, SongUNet (DDPM++ / NCSN++), DhariwalUNet (ADM) and the preconditioning wrappers EDMPrecond,
  VPPrecond, VEPrecond, iDDPMPrecond (EDM Table 1). Constructor keyword arguments and state_dict names/shapes
  are those of EDM's classes, so load_state_dict(strict=True) works for every official checkpoint; reading the
  checkpoint files is safe_files.py's job.
- edm_sampler: EDM's Heun sampler (EDM Algorithm 2), the multi-step teacher baseline.

Mixed precision (as the official GDD code runs it, train.py:104, :207; README quirk 11): with use_fp16 the
U-Net runs in bfloat16 on CUDA, not via autocast.
Convolutions and linear layers cast their fp32 master weights to the input dtype; the noise embedding, the
mapping MLP and the per-block affine layers see fp32 inputs (so they run in fp32), GroupNorm and the attention
softmax are computed in fp32, and the wrapper casts the U-Net output back to fp32.
"""

import functools
import math

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
    """GroupNorm with min(num_groups, C // min_channels_per_group) groups, normalised in fp32 and cast back, as
    the official code runs it in bf16 (README quirk 11; EDM normalises in the input dtype; identical in fp32)."""
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
    i = 0..C/2-1, e = 1 with endpoint (so the last frequency is 1/max_positions), computed in fp32 (EDM training/networks.py)."""
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
    """Multi-head dot-product attention over the H*W positions (EDM training/networks.py, UNetBlock).
    qkv: [N, 3C, H, W] with channels grouped per head and, within a head, as (q, k, v) triples -> [N, C, H, W].
    Weights softmax_keys(q^T k / sqrt(d)), d = C / heads, in fp32 (k is scaled before the product, as in EDM)."""
    n, _, height, width = qkv.shape
    q, k, v = qkv.reshape(n * num_heads, -1, 3, height * width).unbind(2)             # each [N*heads, d, HW]
    logits = torch.einsum('bdi,bdj->bij', q.float(), (k / math.sqrt(k.shape[1])).float())  # [N*heads, HW, HW]
    weights = logits.softmax(dim=2).to(v.dtype)
    return torch.einsum('bij,bdj->bdi', weights, v).reshape(n, -1, height, width)


class UNetBlock(torch.nn.Module):
    """Pre-activation residual block conditioned on the embedding, with optional self-attention after it
    (EDM training/networks.py, UNetBlock). Submodules are created in checkpoint (state_dict) order."""
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
        p = self.affine(emb)[:, :, None, None].to(h.dtype)  # affine runs in fp32 (emb is fp32)
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
    """Encoder entries of both U-Nets (as EDM builds them), highest resolution first: a 3x3 'conv' stem at level 0, a 'down'
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
    """Decoder entries of both U-Nets (as EDM builds them), lowest resolution first: 'in0' (with attention) and 'in1' at the
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
        """Training only: each row of the class labels is zeroed with probability label_dropout (as in EDM)."""
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
    """DDPM++ / NCSN++ U-Net (Song et al. 2021) as used by EDM (EDM training/networks.py, SongUNet)."""
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
        emb = torch.cat([sin, cos], dim=1)  # as in EDM: the two halves are swapped
        if self.map_label is not None:
            labels = self.drop_labels(class_labels, x.shape[0])
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        return self.encode_decode(x, emb)[1]


class DhariwalUNet(_UNet):
    """ADM U-Net (Dhariwal & Nichol 2021) as used by EDM (EDM training/networks.py, DhariwalUNet)."""
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

# Device types on which use_fp16 switches the U-Net to bfloat16. Tests add 'cpu' to exercise
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
        """F(c_in x; c_noise) as fp32, computed in bfloat16 when use_fp16 applies (module docstring)."""
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
        # Noise levels u_0 > ... > u_M = 0 (EDM App. C.3), one fp32 step at a time like EDM:
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
    import statistics
    import sys
    import time
    parser = argparse.ArgumentParser(description='Micro-benchmark: forward+backward of the CIFAR-10 NCSN++ network '
                                                 '(kwargs of edm-cifar10-32x32-uncond-ve.pkl) at sigma = 80.')
    parser.add_argument('--bench', action='store_true', help='run the benchmark')
    parser.add_argument('--batch', type=int, default=8, help='batch size (default: 8)')
    parser.add_argument('--iters', type=int, default=3, help='timed iterations after one warm-up (default: 3)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    parser.add_argument('--load', metavar='FILE', help='moved: python sample_min.py --net FILE --check')
    args = parser.parse_args()
    if args.load:
        raise SystemExit(f'error: this check moved; run: python sample_min.py --net {args.load} --check')
    if not args.bench:
        parser.print_help()
        raise SystemExit(0)
    if args.batch < 1 or args.iters < 1:
        parser.error('--batch and --iters must be positive')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit('error: CUDA is not available; use --device cpu')
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
          f'{", bf16" if net.use_fp16 else ""}: forward+backward median {statistics.median(times[1:]):.2f} s, min {min(times[1:]):.2f} s over {args.iters} iterations')
