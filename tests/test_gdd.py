"""Tests for gdd.py: the generator and its initialisation, freezing counts of the paper, the discriminator,
loss signs and reductions, R1, EMA arithmetic and loading of official-format pickles."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import edm_nets
import gdd
from edm_pickle import dump_edm_pickle
import safe_files
import sample_min

# EDM train.py kwargs of the official teachers (the edm fixtures' param_shapes.json).
NCSNPP = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, augment_dim=9, dropout=0.13)
ADM = dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1, use_fp16=True)

def tiny_teacher(label_dim=10, seed=0, **kw):
    torch.manual_seed(seed)
    kwargs = dict(img_resolution=16, img_channels=3, label_dim=label_dim, model_type='SongUNet', model_channels=8,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], embedding_type='fourier',
                  encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], augment_dim=9, dropout=0.1)
    net = edm_nets.EDMPrecond(**{**kwargs, **kw})
    with torch.no_grad():   # EDM zero-initialises output layers; make every weight non-trivial
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------
# 1. Generator.

def test_preconditioning_numbers_at_sigma_max():
    # GDDPrecond at the one-step noise level: c_skip = 3.90629e-5, c_out = 0.4999777 at sigma = 80 (EDM: 3.90610e-5, 0.4999902).
    sd, eps, s = 0.5, 0.002, 80.0
    assert math.isclose(sd ** 2 / ((s - eps) ** 2 + sd ** 2), 3.90629e-5, rel_tol=1e-5)
    assert math.isclose((s - eps) * sd / math.sqrt(s ** 2 + sd ** 2), 0.4999777, rel_tol=1e-6)


def test_generator_init_equals_teacher_up_to_eps(capsys):
    teacher = tiny_teacher()
    G = gdd.generator_from_teacher(teacher)
    assert 'model.map_augment.weight' in capsys.readouterr().out        # dropped with a note
    assert G.init_kwargs['augment_dim'] == 0 and G.init_kwargs['dropout'] == 0 and G.init_kwargs['label_dropout'] == 0
    assert torch.equal(G.model.map_noise.freqs, teacher.model.map_noise.freqs)   # buffers are copied too
    z, c = torch.randn(3, 3, 16, 16), torch.eye(10)[[0, 4, 9]]
    sigma = torch.full([3], 80.0)
    G.train()   # training mode is harmless: dropout is 0
    with torch.no_grad():
        x = gdd.generate(G, z, c)
        d_teacher = teacher(80 * z, sigma, c)
        # Recover the U-Net output F from the teacher (EDM coefficients), re-assemble with the eps coefficients.
        s, sd, eps = 80.0, 0.5, 0.002
        F_x = (d_teacher - sd ** 2 / (s ** 2 + sd ** 2) * 80 * z) / (s * sd / math.sqrt(s ** 2 + sd ** 2))
        expected = sd ** 2 / ((s - eps) ** 2 + sd ** 2) * 80 * z + (s - eps) * sd / math.sqrt(s ** 2 + sd ** 2) * F_x
    torch.testing.assert_close(x, expected, atol=2e-5, rtol=1e-5)
    assert (x - d_teacher).abs().max() > 1e-6                          # the eps offset is really there
    G0 = gdd.GDDPrecond(**{**G.init_kwargs, 'eps': 0.0})
    G0.load_state_dict(G.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gdd.generate(G0.eval(), z, c), d_teacher, atol=1e-5, rtol=1e-5)  # eps = 0: EDM


def test_generator_refuses_non_edm_teacher():
    vp = edm_nets.VPPrecond(img_resolution=16, img_channels=3, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with pytest.raises(ValueError, match='EDMPrecond'):
        gdd.generator_from_teacher(vp)

#----------------------------------------------------------------------------
# 2. Freezing (counts measured on the official networks).

@pytest.mark.parametrize('name, kwargs, total, frozen', [
    ('cifar10 uncond NCSN++', dict(NCSNPP, img_resolution=32, channel_mult=[2, 2, 2], label_dim=0), 56_395_523, {1: 47_597_568, 2: 48_781_824, 3: 51_015_168}),
    ('cifar10 cond NCSN++', dict(NCSNPP, img_resolution=32, channel_mult=[2, 2, 2], label_dim=10), 56_398_339, {1: 47_597_568}),
    ('64x64 NCSN++', dict(NCSNPP, img_resolution=64, channel_mult=[1, 2, 2, 2], label_dim=0), 62_758_787, {1: 52_614_144}),
    ('ImageNet ADM', dict(ADM, img_resolution=64, label_dim=1000), 295_899_267, {1: 233_065_920, 2: 257_324_160, 3: 266_807_616}),
])
def test_freezing_counts_of_the_paper(name, kwargs, total, frozen, capsys):
    with torch.device('meta'):
        teacher = edm_nets.EDMPrecond(img_channels=3, **kwargs)
        G = gdd.generator_from_teacher(teacher)
    for level, n_frozen in frozen.items():
        params, n_train, n_fr = gdd.freeze_generator(G, level)
        assert (n_train + n_fr, n_fr) == (total, n_frozen)
        assert sum(p.numel() for p in params) == n_train
        assert f'{n_train:,} trainable, {n_fr:,} frozen' in capsys.readouterr().out
    if name == 'cifar10 uncond NCSN++':
        assert f'{47_597_568 / 56_395_523:.1%}' == '84.4%'
        names = {n for n, p in G.named_parameters() if not p.requires_grad}   # level 3 applied last
        gdd.freeze_generator(G, 1, verbose=False)
        trainable = {n for n, p in G.named_parameters() if p.requires_grad}
        for n in ['model.map_layer0.weight', 'model.enc.32x32_conv.weight', 'model.enc.16x16_aux_residual.weight',
                  'model.dec.32x32_aux_conv.weight', 'model.enc.16x16_block0.affine.weight', 'model.enc.16x16_block0.qkv.weight']:
            assert n in trainable                                       # the optimizer's rule (README quirk 1)
        for n in ['model.enc.16x16_down.conv0.weight', 'model.dec.8x8_in0.proj.weight', 'model.enc.32x32_block1.conv1.bias']:
            assert n not in trainable and n in names
    else:
        assert f'{frozen[1] / total:.1%}' == ('78.8%' if name == 'ImageNet ADM' else f'{frozen[1] / total:.1%}')

#----------------------------------------------------------------------------
# 3-4. Discriminator, losses, one training step.

def tiny_setup(label_dim=10, freeze=1):
    teacher = tiny_teacher(label_dim)
    G = gdd.generator_from_teacher(teacher).train()
    params, _, _ = gdd.freeze_generator(G, freeze, verbose=False)
    D = gdd.build_discriminator(['teacher'], teacher, label_dim=label_dim, width=0.125, cout=8).train()
    opt_G, opt_D = gdd.make_optimizers(params, D, 1e-3, 1e-3)
    return teacher, G, D, opt_G, opt_D


def test_discriminator_shapes_and_frozen_parts():
    teacher, G, D, opt_G, opt_D = tiny_setup()
    feats = D.features['teacher']
    assert feats.tap_names == ['16x16_block0', '8x8_block0'] and feats.channels == [8, 16]
    assert D.projections['teacher'].channels == [8, 8]
    logits = D(torch.randn(4, 3, 16, 16), torch.eye(10)[[0, 1, 2, 3]])
    # Maps of 32x32 and 16x16 (2x the taps) -> down to 8 -> 5x5 patch logits each.
    assert [l.shape for l in logits] == [torch.Size([4, 50])]
    assert all(not p.requires_grad for p in [*D.features.parameters(), *D.projections.parameters()])
    assert not D.features.training and not D.projections.training and D.heads.training
    assert {id(p) for g in opt_D.param_groups for p in g['params']} == {id(p) for p in D.heads.parameters()}
    # Adam settings of the official code; D's lr and beta2 corrected for R1 every 16 steps (StyleGAN2's lazy R1).
    assert opt_G.param_groups[0]['betas'] == (0.0, 0.99)
    assert math.isclose(opt_D.param_groups[0]['lr'], 1e-3 * 16 / 17)
    assert math.isclose(opt_D.param_groups[0]['betas'][1], 0.9905855, rel_tol=1e-6)


def test_random_projections_depend_only_on_the_seed():
    a, b, c = (gdd.RandomProjection([8, 16, 32], cout=8, seed=s) for s in (3, 3, 4))
    for (ka, va), (kb, vb), (kc, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vb) and not torch.equal(va, vc)
    m = a([torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)])
    assert [t.shape[1:] for t in m] == [(8, 32, 32), (8, 16, 16), (16, 8, 8)]


def test_imagenet_geometry_parameter_counts():
    # Unconditional mini-discriminators of 2,829,120 / 2,763,392 / 2,631,936 / 2,106,880 parameters.
    for (c, r), n in zip([(64, 128), (64, 64), (128, 32), (256, 16)], [2_829_120, 2_763_392, 2_631_936, 2_106_880]):
        md = gdd.MiniDiscriminator(c, r)
        assert sum(p.numel() for p in md.parameters()) == n
    x = torch.randn(2, 64, 112, 112)
    assert gdd.MiniDiscriminator(64, 128)(x, None).shape == (2, 16)              # 4x4 logits (README quirk 4)


def test_loss_signs_reductions_and_gradient_directions():
    l1 = torch.randn(3, 7, requires_grad=True)      # two feature networks with different patch counts
    l2 = torch.randn(3, 2, requires_grad=True)
    sp = torch.nn.functional.softplus
    loss_G = gdd.generator_loss([l1, l2])
    torch.testing.assert_close(loss_G, sp(-l1).mean(1).sum() + sp(-l2).mean(1).sum())  # mean per (image, net), sum
    g1, = torch.autograd.grad(loss_G, l1)
    assert (g1 < 0).all()                           # G wants higher fake logits
    f, r = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    loss_D = gdd.discriminator_loss([f], [r])
    torch.testing.assert_close(loss_D, (sp(f).mean(1) + sp(-r).mean(1)).sum())
    gf, gr = torch.autograd.grad(loss_D, [f, r])
    assert (gf > 0).all() and (gr < 0).all()        # D pushes fake logits down, real logits up


def test_training_step_moves_logits_the_right_way():
    teacher, G, D, opt_G, opt_D = tiny_setup()
    x, c = torch.rand(8, 3, 16, 16) * 2 - 1, torch.eye(10)[torch.arange(8)]
    torch.manual_seed(1)
    for step in range(6):
        stats = gdd.train_step(G, D, opt_G, opt_D, [(x, c, torch.randn_like(x), torch.randn_like(x))], step + 1, 1e-4)
    assert stats['logits_real'] > stats['logits_fake']   # D learns to separate
    # One G step on the same z raises D's logits on the fake (non-saturating loss descends).
    z = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        before = torch.cat(D(gdd.generate(G, z, c), c), 1).mean()
    D_state = {k: v.clone() for k, v in D.state_dict().items()}
    opt_G.zero_grad()
    gdd.generator_loss(D(gdd.generate(G, z, c), c)).backward()
    opt_G.step()
    D.load_state_dict(D_state)      # undo the BN / spectral-norm updates of that call
    with torch.no_grad():
        after = torch.cat(D(gdd.generate(G, z, c), c), 1).mean()
    assert after > before


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state():
    teacher, G, D, opt_G, opt_D = tiny_setup()
    frozen = {n: p.detach().clone() for n, p in G.named_parameters() if gdd.is_frozen(n, 1)}
    trainable = {n: p.detach().clone() for n, p in G.named_parameters() if not gdd.is_frozen(n, 1)}
    assert frozen and trainable
    x, c = torch.rand(4, 3, 16, 16) * 2 - 1, torch.eye(10)[[1, 2, 3, 4]]
    for step in range(2):
        gdd.train_step(G, D, opt_G, opt_D, [(x, c, torch.randn_like(x), torch.randn_like(x))], step, 1e-4)
    params = dict(G.named_parameters())
    for n, before in frozen.items():
        assert params[n].grad is None and params[n] not in opt_G.state and torch.equal(params[n], before)
    assert all(params[n] in opt_G.state for n in trainable)
    assert sum(not torch.equal(params[n], v) for n, v in trainable.items()) > len(trainable) // 2
    assert all(p.grad is None for p in [*D.features.parameters(), *D.projections.parameters()])


def test_r1_equals_a_direct_computation():
    teacher, G, D, opt_G, opt_D = tiny_setup()
    D = D.eval()        # eval: fixed BN statistics and spectral-norm vectors, so finite differences apply
    x, c = torch.rand(3, 3, 16, 16) * 2 - 1, torch.eye(10)[[1, 5, 7]]
    penalty = gdd.r1_penalty(D, x, c)
    # Direct: autograd of the summed logits, and that gradient checked by central finite differences.
    logit_sum = lambda x: sum(l.double().sum() for l in D(x, c))
    x_req = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(logit_sum(x_req), x_req)
    torch.testing.assert_close(penalty, grad.float().square().sum([1, 2, 3]))
    v, h = torch.randn_like(x), 1e-2
    with torch.no_grad():
        fd = (logit_sum(x + h * v) - logit_sum(x - h * v)) / (2 * h)
    torch.testing.assert_close(fd, (grad * v).sum().double(), rtol=2e-2, atol=1e-3)
    # The R1 step: loss = 16 * gamma / 2 * mean_i ||grad_i||^2, on iterations 16, 32, ... only.
    D.train()
    assert 'r1' not in gdd.train_step(G, D, opt_G, opt_D, [(x.float(), c.float(), x.float(), -x.float())], 0, 1e-4)
    assert 'r1' not in gdd.train_step(G, D, opt_G, opt_D, [(x.float(), c.float(), x.float(), -x.float())], 15, 1e-4)
    assert 'r1' in gdd.train_step(G, D, opt_G, opt_D, [(x.float(), c.float(), x.float(), -x.float())], 16, 1e-4)


def test_sanitize_grads():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([float('nan'), float('inf'), -float('inf'), 2.0])
    gdd.sanitize_grads([p])
    assert p.grad.tolist() == [0.0, 1e5, -1e5, 2.0]

#----------------------------------------------------------------------------
# 5. EMA.

def test_ema_beta_follows_the_ramp():
    # EMA at batch 256: beta_k = 0.5^(20/k) while the 5% ramp is below the half-life.
    for k, expected in [(0, 0.0), (20, 0.5), (100, 0.871), (1000, 0.9862), (19531, 0.99929)]:
        assert math.isclose(gdd.ema_beta(256, 256 * k, 0.5), expected, abs_tol=5e-4)
    assert gdd.ema_beta(256, 256 * 19531, 0.5) == gdd.ema_beta(256, 256 * 19531, 50)   # README quirk 7
    assert math.isclose(gdd.ema_beta(100, 10**7, 0.001), 0.5 ** (100 / 1000))         # capped by H = ema * 1e6


def test_ema_update_arithmetic():
    teacher, G, D, opt_G, opt_D = tiny_setup()
    G_ema = gdd.GDDPrecond(**G.init_kwargs)
    G_ema.load_state_dict(G.state_dict())
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in G_ema.named_parameters()}
    gdd.update_ema(G_ema, G, 0.75)
    for n, p in G_ema.named_parameters():
        expected = before[n] if gdd.is_frozen(n, 1) else 0.75 * before[n] + 0.25 * dict(G.named_parameters())[n]
        torch.testing.assert_close(p, expected)

#----------------------------------------------------------------------------
# Loading: our snapshots, official D2O pickles, EDM teacher pickles.

def test_load_generator_all_formats(tmp_path):
    teacher = tiny_teacher()
    G = gdd.generator_from_teacher(teacher)
    z, c = torch.randn(2, 3, 16, 16), torch.eye(10)[[3, 8]]
    with torch.no_grad():
        expected = gdd.generate(G.eval(), z, c)
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(G), 'config': {}}, tmp_path / 'snap.pt')
    loaded = sample_min.load_generator(str(tmp_path / 'snap.pt'))
    assert isinstance(loaded, gdd.GDDPrecond) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(gdd.generate(loaded, z, c), expected)

    # Official release: class D2OPrecond with EDMPrecond-like kwargs around a SongUNet 'model'.
    release = gdd.GDDPrecond(**G.init_kwargs)
    release.load_state_dict(G.state_dict())
    release.init_kwargs = {k: v for k, v in G.init_kwargs.items() if k != 'eps'}
    release.init_kwargs['use_fp16'] = release.use_fp16 = True    # as the release files are (trained with --fp16)
    model_kwargs = {k: v for k, v in G.init_kwargs.items() if k not in ('img_resolution', 'img_channels', 'label_dim',
                                                                       'use_fp16', 'sigma_data', 'eps', 'model_type')}
    release.model.init_kwargs = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, **model_kwargs)
    dump_edm_pickle({'ema': release, 'loss_fn': None, 'augment_pipe': None, 'dataset_kwargs': {}},
                    tmp_path / 'd2o.pkl', class_name='D2OPrecond')
    loaded = sample_min.load_generator(str(tmp_path / 'd2o.pkl'))
    assert isinstance(loaded, gdd.GDDPrecond) and loaded.eps == 0.002
    assert not loaded.use_fp16                                       # sampled in fp32 (as the official code samples: force_fp32)
    with torch.no_grad():
        torch.testing.assert_close(gdd.generate(loaded, z, c), expected)

    dump_edm_pickle({'ema': teacher, 'loss_fn': None, 'augment_pipe': None, 'dataset_kwargs': {}}, tmp_path / 'edm.pkl')
    loaded = sample_min.load_generator(str(tmp_path / 'edm.pkl'))
    assert type(loaded).__name__ == 'EDMPrecond' and not isinstance(loaded, gdd.GDDPrecond)
    with torch.no_grad():
        torch.testing.assert_close(loaded(80 * z, torch.full([2], 80.0), c), teacher(80 * z, torch.full([2], 80.0), c))

#----------------------------------------------------------------------------
# Spectral norm of the mini-discriminators: the legacy torch.nn.utils.spectral_norm semantics.

def _legacy_pair(seed, c_in=6, c_out=5, stride=2, padding=1, bias=True):
    torch.manual_seed(seed)
    ours = gdd.SNConv2d(c_in, c_out, 4, stride, padding, bias=bias)
    torch.manual_seed(seed)
    ref = torch.nn.utils.spectral_norm(torch.nn.Conv2d(c_in, c_out, 4, stride, padding, bias=bias))
    return ours, ref


def _sigma(W, u, v):
    return torch.dot(u, torch.mv(W.flatten(1), v))


@pytest.mark.parametrize('bias, stride, padding', [(True, 2, 1), (False, 1, 0)])
def test_spectral_norm_construction_has_no_warm_up(bias, stride, padding):
    ours, ref = _legacy_pair(0, bias=bias, stride=stride, padding=padding)
    assert list(ours.state_dict()) == list(ref.state_dict())        # bias?, weight_orig, weight_u, weight_v
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    # Random unit vectors straight from the RNG, no power iteration: u ~ N(0, I) normalised, then v.
    torch.manual_seed(0)
    torch.nn.Conv2d(6, 5, 4, stride, padding, bias=bias)                # the conv's own init draws first
    u, v = torch.randn(5), torch.randn(6 * 16)
    torch.testing.assert_close(ours.weight_u, u / u.norm(), rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.weight_v, v / v.norm(), rtol=0, atol=1e-7)


def test_spectral_norm_equals_torch_legacy_over_training_calls():
    ours, ref = _legacy_pair(1)
    diffs = {'sigma': 0.0, 'u': 0.0, 'v': 0.0, 'output': 0.0, 'grad_W': 0.0, 'grad_x': 0.0}
    for call in range(5):
        x = torch.randn(3, 6, 16, 16, generator=torch.Generator().manual_seed(call))
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [ours(xs[0]), ref(xs[1])]
        for y, xx, m in zip(ys, xs, (ours, ref)):
            (y.square().sum() + y.sum()).backward()
        pairs = {'sigma': (_sigma(ours.weight_orig, ours.weight_u, ours.weight_v),
                           _sigma(ref.weight_orig, ref.weight_u, ref.weight_v)),
                 'u': (ours.weight_u, ref.weight_u), 'v': (ours.weight_v, ref.weight_v), 'output': tuple(ys),
                 'grad_W': (ours.weight_orig.grad, ref.weight_orig.grad), 'grad_x': (xs[0].grad, xs[1].grad)}
        for k, (a, b) in pairs.items():
            diffs[k] = max(diffs[k], (a - b).abs().max().item())
        ours.weight_orig.grad = ref.weight_orig.grad = None
        with torch.no_grad():           # move W as training would, identically in both
            step = torch.randn(ours.weight_orig.shape, generator=torch.Generator().manual_seed(100 + call)) * 1e-2
            ours.weight_orig += step
            ref.weight_orig += step
    print('max |ours - torch legacy| over 5 training calls:', diffs)
    assert all(d == 0 for d in diffs.values()), diffs
    # Eval-mode calls use u and v without advancing them (as the legacy hook does).
    ours.eval(), ref.eval()
    u = ours.weight_u.clone()
    x = torch.randn(2, 6, 16, 16)
    assert torch.equal(ours(x), ref(x)) and torch.equal(ours.weight_u, u)


def test_spectral_norm_power_iteration_order_is_v_then_u():
    conv = gdd.SNConv2d(4, 3, 4, 2, 1)
    W, u0, v0 = conv.weight_orig.detach().flatten(1), conv.weight_u.clone(), conv.weight_v.clone()
    conv(torch.randn(1, 4, 8, 8))
    v1 = W.t() @ u0
    v1 = v1 / v1.norm()
    u1 = W @ v1
    u1 = u1 / u1.norm()
    torch.testing.assert_close(conv.weight_v, v1)
    torch.testing.assert_close(conv.weight_u, u1)
    assert not torch.allclose(conv.weight_v, v0)


def test_per_chunk_replay_restarts_the_spectral_norm_vectors():
    # Two chunks of one rank start the phase's D calls from the same u, v (gdd.py section 4).
    teacher, G, D, opt_G, opt_D = tiny_setup()
    vectors = [b for m in D.heads.modules() if isinstance(m, gdd.SNConv2d) for b in (m.weight_u, m.weight_v)]
    assert vectors and len(vectors) == 2 * sum(isinstance(m, gdd.SNConv2d) for m in D.heads.modules())
    start = [b.clone() for b in vectors]
    seen = []
    for _ in gdd._per_call(D, [0, 1, 2]):
        seen.append([b.clone() for b in vectors])
        D(torch.rand(2, 3, 16, 16) * 2 - 1, torch.eye(10)[[0, 1]])     # advances u, v
    for snapshot in seen:
        assert all(torch.equal(a, b) for a, b in zip(snapshot, start))
