"""GDD / GDD-I: a pretrained EDM diffusion model is, unchanged, a one-step generator x = D(80 z; 80), fine-tuned
with a GAN loss only ("Diffusion Models Are Innate One-Step Generators", Zheng & Yang, arXiv 2405.20750; also
D2O / D2O-F, arXiv 2506.09376). Read top to bottom beside the paper; "recipe X.n" points to the sections of
the method reference (formulas, hyperparameters, quirks of the official code).

  1. the generator: the teacher's network with a slightly shifted preconditioning, evaluated at sigma = 80
  2. layer freezing (GDD-I): ~85% of the U-Net stays at its pretrained values
  3. the projected discriminator: frozen features -> frozen random projections -> trainable mini-discriminators
  4. losses, optimizers and one training iteration (G step, D step, lazy R1 step)
  5. the EMA of the generator
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones
import edm_nets

#----------------------------------------------------------------------------
# 1. The one-step generator (recipe A).

SIGMA_MAX = 80.0        # the fixed noise level of the generator, in training and sampling (recipe A.3)

class GDDPrecond(edm_nets._Precond):
    """EDM preconditioning with the minimum noise level eps as a boundary (recipe A.2):
        D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c)
        c_skip = sd^2 / ((sigma - eps)^2 + sd^2),  c_out = (sigma - eps) sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2),            c_noise = ln(sigma) / 4.
    With eps = 0 this is EDMPrecond exactly; at sigma = eps it returns x (c_skip = 1, c_out = 0).
    Only the one-step use sigma = 80 is implemented: the official multi-step path is broken (quirk I.9)."""
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_data=0.5,        # expected standard deviation of the data
                 eps=0.002,             # minimum noise level, the boundary of the preconditioning
                 model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_data = sigma_data
        self.eps = eps
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, sigma_data=sigma_data, eps=eps, model_type=model_type, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        sd, eps = self.sigma_data, self.eps
        c_skip = sd ** 2 / ((sigma - eps) ** 2 + sd ** 2)
        c_out = (sigma - eps) * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * self.unet(x, sigma, class_labels, force_fp32, c_in, c_noise, **model_kwargs)


def generator_from_teacher(teacher, use_fp16=False):
    """The student: the teacher's architecture (augment_dim = 0, dropout = 0, label_dropout = 0; use_fp16 = run
    the U-Net in bfloat16 on CUDA, recipe A.4, all paper presets) with every
    parameter and buffer copied by name from the teacher's 'ema' network (recipe A.1, quirk I.13). Names the
    teacher lacks keep their init; shape mismatches are skipped with a note; teacher entries the student
    lacks (the augmentation embedding map_augment) are dropped with a note."""
    if type(teacher).__name__ != 'EDMPrecond':
        raise ValueError(f'GDD starts from an EDMPrecond teacher, got {type(teacher).__name__}')
    kwargs = {k: v for k, v in teacher.init_kwargs.items() if k not in ('sigma_min', 'sigma_max')}
    kwargs.update(augment_dim=0, dropout=0, label_dropout=0, use_fp16=use_fp16)
    G = GDDPrecond(**kwargs)
    src = teacher.state_dict()
    with torch.no_grad():
        for name, t in G.state_dict().items():       # parameters and buffers (e.g. map_noise.freqs)
            if name in src and src[name].shape == t.shape:
                t.copy_(src[name])
            elif name in src:
                print(f'note: not copying {name}: teacher {list(src[name].shape)} vs student {list(t.shape)}')
    for name in sorted(set(src) - set(G.state_dict())):
        print(f'note: teacher entry {name} is not used by the generator')
    return G


def generate(G, z, class_labels=None):
    """One-step generation (recipe A.3): x = D(80 z; 80, c), z ~ N(0, I). Float32, not clipped."""
    sigma = torch.full([z.shape[0]], SIGMA_MAX, device=z.device)
    return G(SIGMA_MAX * z, sigma, class_labels)


def load_generator(source, device='cpu'):
    """A generator for sampling, in eval mode: a gdd-min checkpoint ('ema'), an official GDD/D2O release pickle
    (class D2OPrecond, rebuilt as GDDPrecond), or an EDM teacher pickle (returned as its EDM wrapper; tell them
    apart with isinstance(net, GDDPrecond)). Nothing in the file is executed, and everything is validated by
    edm_nets (file structure, init_kwargs, state_dict names / shapes / dtypes, finite values)."""
    path = edm_nets.open_url(source)
    if edm_nets.is_zip(path):
        return _fp32(edm_nets.load_network(path, classes={'GDDPrecond': GDDPrecond}, device=device))
    data = edm_nets.read_pickle(path)
    ema = data.get('ema') if isinstance(data, dict) else None
    if not isinstance(ema, edm_nets.Persistent):
        raise ValueError(f'{path}: no network under key "ema"')
    if ema.init_args:
        raise ValueError(f'{path}: positional init_args (EDM passes every constructor argument by name)')
    try:
        state_dict = edm_nets.persistent_state_dict(ema)     # also checks the module tree's structure
        if ema.class_name != 'D2OPrecond':
            return _fp32(edm_nets.build_network(ema.class_name, ema.init_kwargs, state_dict).eval().to(device))
        # The release's wrapper = EDM-style preconditioning with eps = 0.002 around the U-Net child 'model'.
        model = ema.state.get('_modules', {}).get('model')
        if not isinstance(model, edm_nets.Persistent):
            raise ValueError('D2OPrecond without a U-Net child "model"')
        attr = lambda k, default=None: ema.state.get(k, ema.init_kwargs.get(k, default))
        model_kwargs = {k: v for k, v in model.init_kwargs.items()
                        if k not in ('img_resolution', 'in_channels', 'out_channels', 'label_dim')}
        kwargs = dict(img_resolution=attr('img_resolution'), img_channels=attr('img_channels'), label_dim=attr('label_dim', 0),
                      use_fp16=bool(attr('use_fp16', False)), sigma_data=attr('sigma_data', 0.5),
                      model_type=model.class_name, **model_kwargs)
        net = edm_nets.build_network('GDDPrecond', kwargs, state_dict, classes={'GDDPrecond': GDDPrecond})
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    return _fp32(net.eval().to(device))


def _fp32(net):
    # Recipe A.4 / F.2: sampling and evaluation run in fp32, even for networks trained with use_fp16 (the
    # official release files and the ImageNet ADM teacher say use_fp16=True; on CUDA that would mean bf16 here).
    net.use_fp16 = False
    return net

#----------------------------------------------------------------------------
# 2. Layer freezing, GDD-I (recipe D.1). A parameter is frozen iff its name contains one of block/up/down/in
# AND one of the level's substrings. The tests are literal substring tests ('in' matches the bottleneck
# blocks ..._in0/_in1, 'conv' matches conv0/conv1). This is the official optimizer's rule; the narrower copy
# of the rule in the official loss only wastes gradients (quirk I.1), so there is one rule here.

FREEZE_LEVELS = {
    0: (),                                  # GDD: nothing frozen
    1: ('conv', 'proj'),                    # GDD-I (all presets): 3x3 block convs + attention output projections
    2: ('conv', 'proj', 'qkv'),             # + attention qkv
    3: ('conv', 'proj', 'qkv', 'skip'),     # + 1x1 residual skips
}

def is_frozen(name, freeze):
    return (any(s in name for s in ('block', 'up', 'down', 'in'))
            and any(s in name for s in FREEZE_LEVELS[freeze]))


def freeze_generator(G, freeze, verbose=True):
    """Apply the rule: frozen parameters get requires_grad = False (so no gradient and, since only the returned
    list goes to the optimizer, no Adam state). Returns (trainable parameters, num trainable, num frozen)."""
    if freeze not in FREEZE_LEVELS:
        raise ValueError(f'freeze must be one of {sorted(FREEZE_LEVELS)}, got {freeze}')
    trainable, n_train, n_frozen = [], 0, 0
    for name, p in G.named_parameters():
        frozen = is_frozen(name, freeze)
        p.requires_grad_(not frozen)
        if frozen:
            n_frozen += p.numel()
        else:
            trainable.append(p)
            n_train += p.numel()
    if verbose:
        total = n_train + n_frozen
        print(f'Generator parameters: {total:,} total, {n_train:,} trainable, {n_frozen:,} frozen '
              f'({100 * n_frozen / max(total, 1):.1f}%, freeze={freeze})')
    return trainable, n_train, n_frozen

#----------------------------------------------------------------------------
# 3. The projected discriminator (recipe E, Projected GAN / StyleGAN-XL design):
#    x -> frozen feature network (4 maps) -> frozen random CCM + CSM -> trainable mini-discriminators -> logits.
# A feature network is any module with forward(x in [-1, 1]) -> list of maps and attribute .channels; the
# ImageNet backbones of backbones.py (which do their own normalisation and 224-pixel resize, E.3) and the
# teacher's own encoder below both plug in.

TEACHER_FEATURE_SIGMA = 0.5     # noise level at which the teacher encoder looks at images (see TeacherFeatures)

class _StopForward(Exception):
    pass


class TeacherFeatures(nn.Module):
    """The frozen teacher's U-Net encoder as a feature network (no download needed). The clean image is given
    to the denoiser labelled with a fixed small noise level sigma (no noise is added, so the features are
    deterministic and R1 sees a fixed function); the maps are the encoder outputs at the end of each
    resolution level (R, R/2, ...). The decoder is never run: a hook stops the forward after the last tap.
    Why sigma = 0.5 (= sigma_data): at large sigma a denoiser only sees the coarse layout; below that the choice
    matters little. Measured on the toy demo: 8x8 Frechet distance after 250 steps 0.85 at sigma 0.1 and 0.5,
    1.49 at sigma 2; toy FID / accuracy of the toy preset at 16 kimg 5.00 / 41.7% at sigma 0.5, 4.64 / 39.6% at
    0.05. At every sigma from 0.02 to 0.5 the encoder is nearly blind to pixel noise (its taps move by 0.5% of
    their variance across images for noise of 3 uint8 levels), which is why the toy student keeps some speckle.
    Class labels are not passed (a conditional teacher sees its all-zero label row); the discriminator's
    conditional head handles the classes."""
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


@torch.no_grad()
def _default_init_(conv, generator):
    # PyTorch's default Conv2d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, from a local generator.
    bound = 1 / math.sqrt(conv.weight[0].numel())
    for p in (conv.weight, conv.bias):
        p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)


class RandomProjection(nn.Module):
    """Frozen random cross-channel (CCM) and cross-scale (CSM) mixing (recipe E.5), never trained.
    CCM: 1x1 conv per tap to cout * [1, 2, 4, 8] channels. CSM, top down: s_i = conv(up2(m_i + s_{i+1})),
    bilinear x2 with align_corners=True, 1x1 convs halving the channels (the last keeps them); no activations.
    So map i has twice tap i's resolution, with cout * [1, 1, 2, 4] channels.
    The weights come from an explicit seed, so every rank of a multi-GPU run builds the same projections.
    (Quirk I.5: the official code seeds them differently per rank; we deliberately do not.)"""
    def __init__(self, channels, cout=64, seed=0):
        super().__init__()
        widths = [cout * 2 ** i for i in range(len(channels))]
        self.ccm = nn.ModuleList([nn.Conv2d(c, w, 1) for c, w in zip(channels, widths)])
        self.csm = nn.ModuleList([nn.Conv2d(w, widths[max(i - 1, 0)], 1) for i, w in enumerate(widths)])
        self.channels = [widths[max(i - 1, 0)] for i in range(len(widths))]
        g = torch.Generator().manual_seed(seed)
        for conv in [*self.ccm, *self.csm]:
            _default_init_(conv, g)
        self.requires_grad_(False)

    def forward(self, taps):
        maps, s = [None] * len(taps), None
        for i in reversed(range(len(taps))):
            m = self.ccm[i](taps[i])
            h = m if s is None else m + s
            s = maps[i] = self.csm[i](F.interpolate(h, scale_factor=2, mode='bilinear', align_corners=True))
        return maps


# Mini-discriminator widths by resolution (recipe E.7); the start resolution takes the input's channels.
D_CHANNELS = {1: 2048, 2: 1024, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}

class SNConv2d(nn.Conv2d):
    """Conv2d with spectral normalisation, W_SN = W / sigma(W) (Miyato et al. 2018), sigma estimated by power
    iteration on W as a [c_out, c_in k k] matrix, in the semantics of the legacy torch.nn.utils.spectral_norm
    that the official heads use (recipe E.7; the newer torch.nn.utils.parametrizations version differs in both
    points below, which moves G and D gradients by up to 1e-2 relative in the first iterations):
    - construction: u ~ N(0, I_{c_out}) then v ~ N(0, I_{c_in k k}) from the global RNG, each normalised; no
      warm-up iteration;
    - every training-mode call first runs ONE power iteration, v first: v <- W^T u / |W^T u|, u <- W v / |W v|
      (in place on the buffers, without gradient); eval-mode calls leave u, v as they are;
    - sigma = u^T W v, with u, v constants for autograd (the gradient flows through W only).
    State names weight_orig, weight_u, weight_v are those of the legacy function."""
    def __init__(self, *args, eps=1e-12, **kwargs):
        super().__init__(*args, **kwargs)
        weight = self.weight
        del self.weight
        self.weight_orig = nn.Parameter(weight.detach())
        self.eps = eps
        h, w = weight.shape[0], weight[0].numel()
        with torch.no_grad():
            self.register_buffer('weight_u', F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=eps))
            self.register_buffer('weight_v', F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=eps))

    def sigma(self):
        W = self.weight_orig.flatten(1)
        if self.training:
            with torch.no_grad():
                self.weight_v.copy_(F.normalize(torch.mv(W.t(), self.weight_u), dim=0, eps=self.eps))
                self.weight_u.copy_(F.normalize(torch.mv(W, self.weight_v), dim=0, eps=self.eps))
        # Clones: autograd keeps these u, v while the next call updates the buffers in place.
        u, v = self.weight_u.clone(), self.weight_v.clone()
        return torch.dot(u, torch.mv(W, v))

    def forward(self, x):
        return self._conv_forward(x, self.weight_orig / self.sigma(), self.bias)


class MiniDiscriminator(nn.Module):
    """Recipe E.7: from a nominal start resolution down to 8 with DownBlocks (spectral-normalised 4x4 conv,
    stride 2, with bias -> BatchNorm -> LeakyReLU 0.2), then a spectral-normalised 4x4 conv (stride 1, no
    padding, no bias) to one logit per patch, or to cmap_dim channels for the conditional projection (E.8):
    logit = <h, proj(embed(c))> / sqrt(cmap_dim) at every patch.
    Checked against the official code: one full iteration (G step, D step, R1 step, EMA) on the CIFAR-10 presets
    (freeze 1 and 0, NCSN++ generator, VGG16-BN + EfficientNet-lite0 discriminator), from the same weights and
    inputs, equals it stage by stage to float32 rounding (generator outputs, 224-px inputs, backbone taps,
    projections, logits, gradients, Adam steps, BatchNorm statistics, u and v, EMA) once the heads use the
    legacy power-iteration order of SNConv2d. What differs is documented where it happens: the official loss's
    narrower freezing rule only wastes gradients on 16 tensors (quirk I.1, section 2), the official random
    projections are seeded per rank (quirk I.5, RandomProjection), the data order (train_min.py), and the official
    loop's module-summary forward, which advances u and v once before the first iteration (we do not run it)."""
    def __init__(self, in_channels, start_res,
                 label_dim=0,       # 0 = unconditional
                 width=1.0,         # multiplier on D_CHANNELS (1 = recipe; the toy uses less)
                 cmap_dim=64,       # conditional projection width (E.8)
                 embed_dim=320):    # class-embedding width (E.8: EfficientNet-lite0's last width)
        super().__init__()
        layers, c, res = [], in_channels, start_res
        while res > 8:
            c_out = max(int(D_CHANNELS[res // 2] * width), 8)
            layers += [SNConv2d(c, c_out, 4, 2, 1, bias=True), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c, res = c_out, res // 2
        self.main = nn.Sequential(*layers)
        self.final = SNConv2d(c, cmap_dim if label_dim else 1, 4, 1, 0, bias=False)
        if label_dim:
            # Quirk I.10: upstream starts from StyleGAN-XL's pretrained 1000 x 320 ImageNet class table (rows
            # 0-9 for CIFAR-10); that asset is not available offline, so the table starts N(0, 1) (the official
            # rand_embedding fallback). Trainable either way.
            self.embed = nn.Parameter(torch.randn(label_dim, embed_dim))
            # StyleGAN2 fully connected layer with equalised lr: weight N(0, 1) scaled by 1/sqrt(fan_in) at
            # run time, bias 0, then lrelu(0.2) * sqrt(2).
            self.proj_weight = nn.Parameter(torch.randn(cmap_dim, embed_dim))
            self.proj_bias = nn.Parameter(torch.zeros(cmap_dim))
        self.cmap_dim = cmap_dim

    def forward(self, x, c):
        h = self.final(self.main(x))                                            # [b, 1 or cmap_dim, P, P]
        if hasattr(self, 'embed'):
            e = F.linear(c @ self.embed, self.proj_weight / math.sqrt(self.proj_weight.shape[1]), self.proj_bias)
            e = F.leaky_relu(e, 0.2) * math.sqrt(2)                             # [b, cmap_dim]
            h = (h * e[:, :, None, None]).sum(1, keepdim=True) / math.sqrt(self.cmap_dim)
        return h.flatten(1)                                                     # [b, P*P]


class ProjectedDiscriminator(nn.Module):
    """forward(x, c) -> one [b, P_k] logit tensor per feature network k (recipe B.1). Feature networks and
    projections are frozen and always in eval mode; the mini-discriminators are trained and always in train
    mode (BatchNorm normalises each call with its own batch statistics, quirk I.6), so the training loop never
    switches D to eval. Only `heads` holds trainable parameters."""
    def __init__(self, features,        # dict name -> feature network (forward(x) -> maps, .channels)
                 start_res,             # dict name -> nominal start resolution of each map's mini-discriminator
                 label_dim=0,
                 cout=64,               # CCM width (E.5)
                 width=1.0,             # mini-discriminator width multiplier
                 proj_seed=0):          # seed of the frozen random projections (identical on every rank)
        super().__init__()
        self.features = nn.ModuleDict(features).requires_grad_(False)
        self.projections = nn.ModuleDict({k: RandomProjection(f.channels, cout, seed=proj_seed + i)
                                          for i, (k, f) in enumerate(features.items())})
        self.heads = nn.ModuleDict({k: nn.ModuleList([MiniDiscriminator(c, r, label_dim, width)
                                                      for c, r in zip(self.projections[k].channels, start_res[k])])
                                    for k in features})

    def train(self, mode=True):
        super().train(mode)
        self.features.eval()
        self.projections.eval()
        return self

    def forward(self, x, c=None):
        logits = []
        for k, feature_net in self.features.items():
            maps = self.projections[k](feature_net(x))
            logits.append(torch.cat([head(m, c) for head, m in zip(self.heads[k], maps)], dim=1))
        return logits


def build_discriminator(feature_names, teacher, label_dim=0, width=1.0, cout=64, proj_seed=0,
                        backbone_weights=None, teacher_sigma=TEACHER_FEATURE_SIGMA):
    """The discriminator of the presets. 'teacher' = TeacherFeatures; its mini-discriminators start at the true
    size of each map (2R, R, R/2, ... -> down to 8 -> 5x5 patch logits). The ImageNet backbones (backbones.py,
    weights from backbone_weights[name] or backbones.WEIGHT_URLS) use the nominal 256-pixel geometry of the
    official code, starts [128, 64, 32, 16] although the real maps are 112/56/28/14 (224/.../28 for VGG): so
    4x4 (11x11) logit maps and 4/3/2/1 down-blocks (recipe E.7, quirk I.4)."""
    features, start_res = {}, {}
    for name in feature_names:
        if name == 'teacher':
            features[name] = TeacherFeatures(teacher, teacher_sigma)
            R = teacher.img_resolution
            start_res[name] = [2 * R >> i for i in range(len(features[name].channels))]
        else:
            weights = (backbone_weights or {}).get(name, backbones.WEIGHT_URLS.get(name))
            features[name] = backbones.build_backbone(name, weights=weights, seed=proj_seed + 1000)  # own stream, not a projection's
            start_res[name] = [128, 64, 32, 16]
    return ProjectedDiscriminator(features, start_res, label_dim, cout, width, proj_seed)

#----------------------------------------------------------------------------
# 4. Losses, optimizers, one training iteration (recipe B, C.1).
#
# Reductions (recipe B.1/B.2/B.6, quirk I.2). Per image i, feature network k: mean over P_k patch logits;
# then SUMS over images and feature networks; R1 is a MEAN over images. Upstream takes these sums over the
# per-GPU batch b and DDP averages over GPUs, so its objective is (b / B) sum over the global batch of B images,
# and the R1/main balance depends on b. We make that number explicit, the reduction batch `loss_batch`:
#     L_G, L_D = (loss_batch / B) * sum_{i in global batch} l_i,     L_R1 = 16 gamma/2 * (1/B) * sum_i ||grad_i||^2
# Each D call (one chunk of one rank) adds its share with the constant factors loss_scale = loss_batch / B and
# r1_scale = 1 / B, and ranks SUM their gradients: the result does not depend on how the global batch is split
# into ranks and accumulation chunks. loss_batch = b of the release script reproduces upstream exactly.
#
# Per-call state (quirk I.6): BatchNorm in D normalises with each call's batch, and every training-mode call
# advances the spectral-norm power iteration (SNConv2d: one v-then-u step per call, G steps included). So that a rank processing n chunks behaves like n ranks holding
# one chunk each, every chunk of a phase starts from the power-iteration vectors the phase started with (they
# depend only on the weights, which do not change within a phase). BatchNorm running statistics also advance
# per call; D never uses them (always in train mode), so they are not part of this equivalence.

R1_INTERVAL = 16        # lazy regularisation: R1 every 16th iteration, gain 16 (recipe B.4)

def softplus_mean_sum(logits, sign):
    """sum_k sum_i mean_j softplus(sign * l_kij) over the per-feature-network [b, P_k] logit tensors."""
    return sum(F.softplus(sign * l).mean(dim=1).sum() for l in logits)


def generator_loss(logits_fake):
    # Non-saturating G loss (recipe B.2): sum_i sum_k mean_j softplus(-l(G(z_i), c_i)).
    return softplus_mean_sum(logits_fake, -1)


def discriminator_loss(logits_fake, logits_real):
    # Recipe B.2: sum_i sum_k mean_j [softplus(l(fake)) + softplus(-l(real))].
    return softplus_mean_sum(logits_fake, 1) + softplus_mean_sum(logits_real, -1)


def r1_penalty(D, x_real, c):
    """Per-image squared gradient norm ||d/dx sum_k sum_j l_kj(x, c)||^2 on real images (recipe B.4), taken
    through the frozen features and projections (double backprop). Returns [b]."""
    x = x_real.detach().requires_grad_(True)
    logit_sum = sum(l.sum() for l in D(x, c))
    grad, = torch.autograd.grad(logit_sum, x, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3])


def sanitize_grads(params):
    # Recipe B.5: NaN -> 0, +inf -> 1e5, -inf -> -1e5, in place. No clipping, no weight decay.
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


def make_optimizers(G_params, D, lr, dlr):
    """Recipe C.1: Adam, no schedule. G: betas (0, 0.99). D: StyleGAN2's lazy-regularisation correction for an R1
    interval of 16, lr * 16/17 and beta2 = 0.99^(16/17), applied to every D step (main and R1)."""
    ratio = R1_INTERVAL / (R1_INTERVAL + 1)
    opt_G = torch.optim.Adam(G_params, lr=lr, betas=(0.0, 0.99), eps=1e-8)
    opt_D = torch.optim.Adam(D.heads.parameters(), lr=dlr * ratio, betas=(0.0, 0.99 ** ratio), eps=1e-8)
    return opt_G, opt_D


def _labels(c):
    return None if c is None or c.shape[1] == 0 else c


def _per_call(D, chunks):
    """Iterate over chunks; each chunk's D calls start from the same power-iteration vectors (see above)."""
    vectors = [b for m in D.heads.modules() if isinstance(m, SNConv2d) for b in (m.weight_u, m.weight_v)]
    start = [b.clone() for b in vectors] if len(chunks) > 1 else None
    for k, chunk in enumerate(chunks):
        if k > 0:
            with torch.no_grad():
                torch._foreach_copy_(vectors, start)
        yield chunk


def train_step(G, D, opt_G, opt_D, chunks, step, r1_gamma, loss_scale=1.0, r1_scale=None, reduce_grads=None):
    """One iteration in the order of recipe B.5: G step, D step, R1 step (step > 0 and step % 16 == 0).
    chunks: this rank's part of the global batch, a list of (x_real in [-1, 1], one-hot labels [b, label_dim],
        z for the G step, z for the D step); each chunk is one call of D per forward pass.
    loss_scale, r1_scale: factors on each chunk's summed losses and summed R1 penalties (loss_batch / B and
        1 / B, see the reductions above); r1_scale None = 1 / (images in chunks), a mean over this batch.
    reduce_grads(params): sums the gradients over ranks (multi-process runs), before they are sanitised.
    The EMA update (section 5) follows in the caller. Returns a dict of scalar tensors (no host sync here)."""
    G_params = [p for group in opt_G.param_groups for p in group['params']]
    D_params = list(D.heads.parameters())
    num_images = sum(x.shape[0] for x, *_ in chunks)
    r1_scale = 1 / num_images if r1_scale is None else r1_scale
    stats = {}
    add = lambda key, value: stats.__setitem__(key, stats.get(key, 0) + value.detach())
    mean_logit = lambda logits: torch.cat([l.flatten() for l in logits]).mean()

    # G step: fakes with the real batch's labels (recipe A.3); gradients flow through D into the image only.
    opt_G.zero_grad(set_to_none=True)
    D.heads.requires_grad_(False)
    for x, c, z, _ in _per_call(D, chunks):
        loss = generator_loss(D(generate(G, z, _labels(c)), _labels(c)))
        (loss * loss_scale).backward()
        add('loss_G', loss / num_images)
    D.heads.requires_grad_(True)
    if reduce_grads is not None:
        reduce_grads(G_params)
    sanitize_grads(G_params)
    opt_G.step()

    # D step: fresh z, fakes without gradient from the just-updated G; fakes and reals are separate D calls.
    opt_D.zero_grad(set_to_none=True)
    for x, c, _, z in _per_call(D, chunks):
        with torch.no_grad():
            fake = generate(G, z, _labels(c))
        logits_fake = D(fake, _labels(c))
        logits_real = D(x, _labels(c))
        loss = discriminator_loss(logits_fake, logits_real)
        (loss * loss_scale).backward()
        add('loss_D', loss / num_images)
        add('logits_fake', mean_logit(logits_fake) * x.shape[0] / num_images)
        add('logits_real', mean_logit(logits_real) * x.shape[0] / num_images)
    if reduce_grads is not None:
        reduce_grads(D_params)
    sanitize_grads(D_params)
    opt_D.step()

    # R1 step, its own optimizer step on the same real batch (lazy: every 16th iteration, gain 16):
    # L_R1 = 16 * gamma/2 * mean_i ||grad_i||^2 (the mean taken as r1_scale * sum).
    if step > 0 and step % R1_INTERVAL == 0 and r1_gamma > 0:
        opt_D.zero_grad(set_to_none=True)
        for x, c, _, _ in _per_call(D, chunks):
            penalty = r1_penalty(D, x, _labels(c))
            (R1_INTERVAL * r1_gamma / 2 * r1_scale * penalty.sum()).backward()
            add('r1', penalty.sum() / num_images)
        if reduce_grads is not None:
            reduce_grads(D_params)
        sanitize_grads(D_params)
        opt_D.step()
    return stats

#----------------------------------------------------------------------------
# 5. EMA of the generator (recipe C.3): theta_ema <- beta theta_ema + (1 - beta) theta after every iteration,
# parameters only, beta = 0.5^(B / h) with half-life h = max(min(H, 0.05 n), 1e-8) images, H = ema_mimg * 1e6
# and n = images seen before this iteration. The 5% ramp always wins at the paper's durations, so the
# preset's ema value never matters there (quirk I.7); we implement the formula and keep the value.

EMA_RAMPUP = 0.05

def ema_beta(batch, images_seen, ema_mimg):
    half_life = max(min(ema_mimg * 1e6, EMA_RAMPUP * images_seen), 1e-8)
    return 0.5 ** (batch / half_life)


@torch.no_grad()
def update_ema(G_ema, G, beta):
    # Frozen parameters are identical in both and stay so: only the trainable ones are averaged, in one
    # multi-tensor operation.
    pairs = [(p_ema, p) for p_ema, p in zip(G_ema.parameters(), G.parameters()) if p.requires_grad]
    if pairs:
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - beta)
