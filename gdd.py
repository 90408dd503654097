"""GDD / GDD-I: a pretrained EDM diffusion model is, unchanged, a one-step generator x = D(80 z; 80), fine-tuned
with a GAN loss only ("Diffusion Models Are Innate One-Step Generators", Zheng & Yang, arXiv 2405.20750; also
D2O / D2O-F, arXiv 2506.09376). Read top to bottom beside the paper:

  1. the generator: the teacher's network with a slightly shifted preconditioning, evaluated at sigma = 80
  2. layer freezing (GDD-I): ~85% of the U-Net stays at its pretrained values
  3. the projected discriminator: frozen features -> frozen random projections -> trainable mini-discriminators
  4. losses, optimizers and one training iteration (G step, D step, lazy R1 step)
  5. the EMA of the generator

"Official" cites the authors' code (github.com/Zyriix/D2O, file:line); README lists where we differ from it
("Official-code quirks", numbered) and why.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones
import edm_nets

#----------------------------------------------------------------------------
# 1. The one-step generator x = D(80 z; 80, c) (D2O Fig. 1B; official training/loss.py:216-219, generate.py:71-79).

SIGMA_MAX = 80.0        # the fixed noise level of the generator, in training and sampling

class GDDPrecond(edm_nets._Precond):
    """EDM's preconditioning (EDM Eq. 7, Table 1) with the minimum noise level eps as a boundary, the official
    D2OPrecond (training/networks.py:533-582, eps at :554, coefficients at :570-573):
        D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c)
        c_skip = sd^2 / ((sigma - eps)^2 + sd^2),  c_out = (sigma - eps) sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2),            c_noise = ln(sigma) / 4.
    With eps = 0 this is EDMPrecond exactly; at sigma = eps it returns x (c_skip = 1, c_out = 0).
    Only the one-step use sigma = 80 is implemented: the official multi-step path is broken (quirk 9)."""
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
    """The student: the teacher's architecture with augment_dim = 0, dropout = 0 and label_dropout = 0, and every
    parameter and buffer (NCSN++'s Fourier frequencies included) copied by name from the teacher's 'ema' network
    (official training/training_loop.py:210-211). Names the teacher lacks keep their init; shape mismatches are
    skipped with a note; teacher entries the student lacks (the augmentation embedding map_augment) are dropped
    with a note. use_fp16: run the U-Net in bfloat16 on CUDA (all paper presets, official train.py:104, :207)."""
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
    """One-step generation x = D(80 z; 80, c), z ~ N(0, I). Float32, not clipped: D sees the raw output."""
    sigma = torch.full([z.shape[0]], SIGMA_MAX, device=z.device)
    return G(SIGMA_MAX * z, sigma, class_labels)


def fp32(net):
    """Sampling and evaluation run in fp32 (official generate.py and fid.py), also for networks trained with
    use_fp16 (the release files and the ImageNet ADM teacher say use_fp16=True). Returns net."""
    net.use_fp16 = net.init_kwargs['use_fp16'] = False
    return net

#----------------------------------------------------------------------------
# 2. Layer freezing, GDD-I (GDD Abstract; D2O Fig. 1C: the convolutions and the attention projection frozen;
# official train.py:244-253, training/training_loop.py:162-170). A parameter is frozen iff its name contains one
# of block/up/down/in AND one of the level's substrings. The tests are literal substring tests ('in' matches the
# bottleneck blocks ..._in0/_in1, 'conv' matches conv0/conv1). This is the official optimizer's rule; the
# narrower copy of it in the official loss only wastes gradients (quirk 1), so there is one rule here.

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
    trainable, frozen = [], []
    for name, p in G.named_parameters():
        p.requires_grad_(not is_frozen(name, freeze))
        (trainable if p.requires_grad else frozen).append(p)
    n_train, n_frozen = (sum(p.numel() for p in params) for params in (trainable, frozen))
    if verbose:
        total = n_train + n_frozen
        print(f'Generator parameters: {total:,} total, {n_train:,} trainable, {n_frozen:,} frozen '
              f'({100 * n_frozen / max(total, 1):.1f}%, freeze={freeze})')
    return trainable, n_train, n_frozen

#----------------------------------------------------------------------------
# 3. The projected discriminator (Projected GAN, arXiv 2111.01007, as in StyleGAN-XL; official
# pg_modules/discriminator.py:256, pg_modules/projector.py):
#    x -> frozen feature network (4 maps) -> frozen random CCM + CSM -> trainable mini-discriminators -> logits.
# A feature network is any module with forward(x in [-1, 1]) -> list of maps and attribute .channels; the
# ImageNet backbones of backbones.py (which do their own normalisation and 224-pixel resize) and the toy demo's
# backbones.TeacherFeatures both plug in.

class RandomProjection(nn.Module):
    """Frozen random cross-channel (CCM) and cross-scale (CSM) mixing (Projected GAN Sec. 3), never trained.
    CCM: 1x1 conv per tap to cout * [1, 2, 4, 8] channels. CSM, top down: s_i = conv(up2(m_i + s_{i+1})),
    bilinear x2 with align_corners=True, 1x1 convs halving the channels (the last keeps them); no activations.
    So map i has twice tap i's resolution, with cout * [1, 1, 2, 4] channels.
    PyTorch's default conv init from an explicit seed, so every rank of a multi-GPU run builds the same
    projections (the official code seeds them differently per rank, quirk 5)."""
    def __init__(self, channels, cout=64, seed=0):
        super().__init__()
        widths = [cout * 2 ** i for i in range(len(channels))]
        self.ccm = nn.ModuleList([nn.Conv2d(c, w, 1) for c, w in zip(channels, widths)])
        self.csm = nn.ModuleList([nn.Conv2d(w, widths[max(i - 1, 0)], 1) for i, w in enumerate(widths)])
        self.channels = [widths[max(i - 1, 0)] for i in range(len(widths))]
        g = torch.Generator().manual_seed(seed)
        for conv in [*self.ccm, *self.csm]:
            backbones.default_init_(conv, g)
        self.requires_grad_(False)

    def forward(self, taps):
        maps, s = [None] * len(taps), None
        for i in reversed(range(len(taps))):
            m = self.ccm[i](taps[i])
            h = m if s is None else m + s
            s = maps[i] = self.csm[i](F.interpolate(h, scale_factor=2, mode='bilinear', align_corners=True))
        return maps


# Mini-discriminator widths by resolution (official pg_modules/discriminator.py, as in Projected GAN); the start
# resolution takes the input's channels.
D_CHANNELS = {1: 2048, 2: 1024, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}

class SNConv2d(nn.Conv2d):
    """Conv2d with spectral normalisation, W_SN = W / sigma(W) (Miyato et al. 2018), sigma estimated by power
    iteration on W as a [c_out, c_in k k] matrix, in the semantics of the legacy torch.nn.utils.spectral_norm
    that the official heads use (pg_modules/blocks.py:6-21; the newer torch.nn.utils.parametrizations version
    differs in both points below, and so moves G and D gradients in the first iterations, README):
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
    """One mini-discriminator (official pg_modules/discriminator.py, Projected GAN): from a nominal start
    resolution down to 8 with DownBlocks (spectral-normalised 4x4 conv, stride 2, with bias -> BatchNorm ->
    LeakyReLU 0.2, pg_modules/blocks.py), then a spectral-normalised 4x4 conv (stride 1, no padding, no bias) to
    one logit per patch, or to cmap_dim channels for the conditional projection (Miyato & Koyama 2018, official
    pg_modules/discriminator.py:58-118): logit = <h, proj(embed(c))> / sqrt(cmap_dim) at every patch."""
    def __init__(self, in_channels, start_res,
                 label_dim=0,       # 0 = unconditional
                 width=1.0,         # multiplier on D_CHANNELS (1 = official; the toy uses less)
                 cmap_dim=64,       # conditional projection width
                 embed_dim=320):    # class-embedding width (EfficientNet-lite0's last width)
        super().__init__()
        layers, c, res = [], in_channels, start_res
        while res > 8:
            c_out = max(int(D_CHANNELS[res // 2] * width), 8)
            layers += [SNConv2d(c, c_out, 4, 2, 1, bias=True), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c, res = c_out, res // 2
        self.main = nn.Sequential(*layers)
        self.final = SNConv2d(c, cmap_dim if label_dim else 1, 4, 1, 0, bias=False)
        if label_dim:
            # Upstream starts from StyleGAN-XL's pretrained 1000 x 320 ImageNet class table (rows 0-9 for
            # CIFAR-10), an asset that is not a released file; the table starts N(0, 1), the official
            # rand_embedding fallback (quirk 10). Trainable either way.
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
    """forward(x, c) -> one [b, P_k] logit tensor per feature network k. Feature networks and projections are
    frozen and always in eval mode; the mini-discriminators are trained and always in train mode (BatchNorm
    normalises each call with its own batch statistics, quirk 6), so the training loop never
    switches D to eval. Only `heads` holds trainable parameters."""
    def __init__(self, features,        # dict name -> feature network (forward(x) -> maps, .channels)
                 start_res,             # dict name -> nominal start resolution of each map's mini-discriminator
                 label_dim=0,
                 cout=64,               # CCM width
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
                        backbone_weights=None, teacher_sigma=backbones.TEACHER_FEATURE_SIGMA):
    """The discriminator of the presets. 'teacher' = backbones.TeacherFeatures; its mini-discriminators start at
    the true size of each map (2R, R, R/2, ... -> down to 8 -> 5x5 patch logits). The ImageNet backbones (backbones.py,
    weights from backbone_weights[name] or backbones.WEIGHT_URLS) use the nominal 256-pixel geometry of the
    official code, starts [128, 64, 32, 16] although the real maps are 112/56/28/14 (224/.../28 for VGG): so
    4x4 (11x11) logit maps and 4/3/2/1 down-blocks (official pg_modules/discriminator.py:311-312, quirk 4)."""
    features, start_res = {}, {}
    for name in feature_names:
        if name == 'teacher':
            features[name] = backbones.TeacherFeatures(teacher, teacher_sigma)
            R = teacher.img_resolution
            start_res[name] = [2 * R >> i for i in range(len(features[name].channels))]
        else:
            weights = (backbone_weights or {}).get(name, backbones.WEIGHT_URLS.get(name))
            # The random layers of a backbone (DeiT's) draw from their own seed, not from a projection's.
            features[name] = backbones.build_backbone(name, weights=weights, seed=proj_seed + 1000)
            start_res[name] = [128, 64, 32, 16]
    return ProjectedDiscriminator(features, start_res, label_dim, cout, width, proj_seed)

#----------------------------------------------------------------------------
# 4. Losses, optimizers, one training iteration: a GAN loss alone, no distillation loss (D2O Abstract; official
# training/loss.py:221-260).
#
# Reductions (official training/loss.py:239-313, quirk 2). Per image i, feature network k: mean over P_k logits;
# then SUMS over images and feature networks; R1 is a MEAN over images. Upstream takes these sums over the
# per-GPU batch b and DDP averages over GPUs, so its objective is (b / B) sum over the global batch of B images,
# and the R1/main balance depends on b. We make that number explicit, the reduction batch `loss_batch`:
#     L_G, L_D = (loss_batch / B) * sum_{i in global batch} l_i,     L_R1 = 16 gamma/2 * (1/B) * sum_i ||grad_i||^2
# Each D call (one chunk of one rank) adds its share with the constant factors loss_scale = loss_batch / B and
# r1_scale = 1 / B, and ranks SUM their gradients: the result does not depend on how the global batch is split
# into ranks and accumulation chunks. loss_batch = b of the release script reproduces upstream exactly.
#
# Per-call state (quirk 6): BatchNorm in D normalises with each call's batch, and every training-mode call
# advances the spectral-norm power iteration (SNConv2d: one v-then-u step per call, G steps included). So that a
# rank processing n chunks behaves like n ranks holding one chunk each, every chunk of a phase starts from the
# power-iteration vectors the phase started with (they
# depend only on the weights, which do not change within a phase). BatchNorm running statistics also advance
# per call; D never uses them (always in train mode), so they are not part of this equivalence.

R1_INTERVAL = 16        # StyleGAN2 Sec. 3.1, lazy regularisation: R1 every 16th iteration, gain 16

def generator_loss(logits_fake):
    # Non-saturating G loss (official training/loss.py:239): sum_i sum_k mean_j softplus(-l_kij(G(z_i), c_i)),
    # over the per-feature-network [b, P_k] logit tensors.
    return sum(F.softplus(-l).mean(dim=1).sum() for l in logits_fake)


def discriminator_loss(logits_fake, logits_real):
    # Official training/loss.py:273, :282: sum_i sum_k mean_j [softplus(l(fake)) + softplus(-l(real))].
    return sum(F.softplus(l).mean(dim=1).sum() for l in logits_fake) + sum(F.softplus(-l).mean(dim=1).sum() for l in logits_real)


def r1_penalty(D, x_real, c):
    """R1 (Mescheder et al. 2018) as the official training/loss.py:296-313 computes it: the per-image squared
    gradient norm ||d/dx sum_k sum_j l_kj(x, c)||^2 on real images, of the SUM of all logits (quirk 3), taken
    through the frozen features and projections (double backprop). Returns [b]."""
    x = x_real.detach().requires_grad_(True)
    logit_sum = sum(l.sum() for l in D(x, c))
    grad, = torch.autograd.grad(logit_sum, x, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3])


def sanitize_grads(params):
    # As the official loop after every backward: NaN -> 0, +inf -> 1e5, -inf -> -1e5, in place. No clipping,
    # no weight decay.
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


def make_optimizers(G_params, D, lr, dlr):
    """Adam, no schedule (official training/training_loop.py:176, :184). G: betas (0, 0.99). D: StyleGAN2's
    lazy-regularisation correction for an R1 interval of 16 (StyleGAN2 Sec. 3.1), lr * 16/17 and beta2 =
    0.99^(16/17), applied to every D step (main and R1)."""
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
            torch._foreach_copy_(vectors, start)     # buffers: no autograd involved
        yield chunk


def train_step(G, D, opt_G, opt_D, chunks, step, r1_gamma, loss_scale=1.0, r1_scale=None, reduce_grads=None):
    """One iteration in the official order (training/training_loop.py:263-271): G step, D step, R1 step
    (step > 0 and step % 16 == 0).
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

    def finish(opt, params):    # sum the gradients over ranks, sanitise them, take the Adam step
        if reduce_grads is not None:
            reduce_grads(params)
        sanitize_grads(params)
        opt.step()

    # G step: fakes with the real batch's labels (official training/loss.py); gradients flow through D into the
    # image only (D's parameters are frozen for this step).
    opt_G.zero_grad(set_to_none=True)
    D.heads.requires_grad_(False)
    for x, c, z, _ in _per_call(D, chunks):
        loss = generator_loss(D(generate(G, z, _labels(c)), _labels(c)))
        (loss * loss_scale).backward()
        add('loss_G', loss / num_images)
    D.heads.requires_grad_(True)
    finish(opt_G, G_params)

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
    finish(opt_D, D_params)

    # R1 step, its own optimizer step on the same real batch (lazy: every 16th iteration, gain 16):
    # L_R1 = 16 * gamma/2 * mean_i ||grad_i||^2 (the mean taken as r1_scale * sum).
    if step > 0 and step % R1_INTERVAL == 0 and r1_gamma > 0:
        opt_D.zero_grad(set_to_none=True)
        for x, c, _, _ in _per_call(D, chunks):
            penalty = r1_penalty(D, x, _labels(c))
            (R1_INTERVAL * r1_gamma / 2 * r1_scale * penalty.sum()).backward()
            add('r1', penalty.sum() / num_images)
        finish(opt_D, D_params)
    return stats

#----------------------------------------------------------------------------
# 5. EMA of the generator (official training/training_loop.py:296-306): theta_ema <- beta theta_ema + (1 - beta)
# theta after every iteration, parameters only, beta = 0.5^(B / h) with half-life h = max(min(H, 0.05 n), 1e-8)
# images, H = ema_mimg * 1e6 and n = images seen before this iteration. The 5% ramp always wins at the paper's
# durations, so the preset's ema value never matters there (quirk 7); we implement the formula and keep the value.

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
