"""One training iteration (gdd.train_step with its R1 step, then the EMA update) at a preset's geometry, on any
device, for comparisons: CUDA against the CPU (test_cuda.py) and each speed option against the default
(test_bench.py). The generator has the preset's architecture with small widths; the discriminator has the
preset's real ImageNet feature networks with their deterministic random fill (no download) and narrow heads."""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_min
import edm_nets
import gdd
import train_min

# Generator widths: NCSN++ with 16 channels; ADM with 64, the least that keeps its attention (64 per head).
WIDTH = {'ncsnpp': 16, 'ddpmpp': 16, 'adm': 64, 'toy': 16}


def build(preset, options=(), device='cpu', batch=2, seed=0):
    """(cfg, nets, batch) where nets = (G, G_ema, D, opt_G, opt_D) on `device`: built on the CPU from `seed` and
    then moved, so every device starts from the same weights; options: train_min flags, e.g. ['--tf32', '1']."""
    cfg = train_min.parse_args([preset, '--bench', '1', '--batch', str(batch), *options])
    R, L = train_min.PRESET_GEOMETRY[preset]
    torch.manual_seed(seed)
    teacher = edm_nets.EDMPrecond(img_resolution=R, img_channels=3, label_dim=L,
                                  **{**train_min.arch_kwargs(cfg), 'model_channels': WIDTH[cfg.arch]})
    with torch.no_grad():       # EDM zero-initialises its output layers: make every weight matter
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    G = gdd.generator_from_teacher(teacher, use_fp16=cfg.fp16).train()
    params, _, _ = gdd.freeze_generator(G, cfg.freeze, verbose=False)
    names = cfg.features.split(',')
    D = gdd.build_discriminator(names, teacher, label_dim=L, width=1 / 16, cout=16, backbone_weights=dict.fromkeys(names),
                                teacher_sigma=cfg.teacher_sigma).train()
    g = torch.Generator().manual_seed(seed + 1)
    x, z_G, z_D = (torch.randn([batch, 3, R, R], generator=g) for _ in range(3))
    c = torch.eye(L)[torch.randint(L, [batch], generator=g)] if L else torch.zeros([batch, 0])
    chunk = tuple(t.to(device) for t in ((x / 2).clamp(-1, 1), c, z_G, z_D))
    G, D = G.to(device), D.to(device)
    G_ema = gdd.fp32(copy.deepcopy(G).eval().requires_grad_(False))
    bench_min.apply_speed_options(cfg, G, D)
    opt_G, opt_D = gdd.make_optimizers(params, D, cfg.lr, cfg.dlr)
    return cfg, (G, G_ema, D, opt_G, opt_D), [chunk]


def run(cfg, nets, chunks, step=gdd.R1_INTERVAL, r1_gamma=1.0):
    """One iteration (R1 included at step 16; r1_gamma 1 so the R1 gradients are not negligible). Returns the
    gradients of the G, D and R1 steps as the optimizers received them (flat, fp32, CPU), the losses and
    logits, and the change of the EMA generator's trained parameters."""
    G, G_ema, D, opt_G, opt_D = nets
    trained = lambda: torch.cat([e.detach().flatten().cpu() for e, p in zip(G_ema.parameters(), G.parameters()) if p.requires_grad])
    ema0, grads = trained(), []
    capture = lambda params: grads.append(torch.cat([p.grad.detach().flatten().float().cpu() for p in params]))
    stats = gdd.train_step(G, D, opt_G, opt_D, chunks, step, r1_gamma, loss_scale=cfg.loss_batch / cfg.batch,
                           r1_scale=1 / cfg.batch, reduce_grads=capture)
    gdd.update_ema(G_ema, G, gdd.ema_beta(cfg.batch, 10_000, cfg.ema))
    return dict(zip(('G step', 'D step', 'R1 step'), grads), stats={k: v.item() for k, v in stats.items()}, ema=trained() - ema0)


def differences(a, b):
    """Relative L2 distance of a's gradients and EMA change from b's, and the largest relative loss/logit difference."""
    rel = lambda x, y: ((x - y).norm() / y.norm()).item()
    out = {k: rel(a[k], b[k]) for k in ('G step', 'D step', 'R1 step', 'ema')}
    out['stats'] = max(abs(a['stats'][k] - b['stats'][k]) / max(abs(b['stats'][k]), 1e-3) for k in b['stats'])
    return out
