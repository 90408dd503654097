"""Train a one-step generator with GDD / GDD-I (gdd.py). One preset per configuration of the paper.

    python train_min.py toy                          # offline demo on a CPU: toy data + the shipped toy teacher
    python train_min.py cifar10 --data cifar10-32x32.zip          # GDD-I; add --freeze 0 for GDD
    python train_min.py PRESET --help                # every value of the preset, each overridable
    torchrun --nproc_per_node=8 train_min.py cifar10 --data cifar10-32x32.zip --resume auto   # 8 GPUs, resumable
    python train_min.py cifar10 --bench 20 --batch-gpu 64     # speed, memory, where the time goes (bench_min.py)

Outputs go to --outdir/NNNNN-PRESET/: log.txt, network-snapshot-KKKKKK.pt (EMA generator, gdd-min checkpoint
format), samples-KKKKKK.png (fixed seeds), stats.jsonl (one line per tick), training-state-IIIIIIII.pt and its
.sha256 (for --resume; the last 3), and for --fd-images > 0 compare.png + metrics.json. The toy teacher and the
toy FID's classifier are made by toy.py.
"""

import argparse
import copy
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch

import backbones
import bench_min
import cli
import dataset_min
import edm_nets
import fid_min
import gdd
import safe_files
import toy
import training_state as ts

#----------------------------------------------------------------------------
# Presets: one row of the paper's table each (official train.sh). lr / dlr: the Adam rates of G / D (D gets x16/17);
# ema: the EMA half-life in Mimg (its ramp dominates, quirk 7); kimg: the duration; loss_batch: the reduction batch
# of the losses (gdd.py section 4: the per-GPU batch of the release script, which runs 4 GPUs, quirk 2). Every
# paper preset: R1 gamma 1e-4, GDD-I freezing (--freeze 0 gives GDD), the U-Net in bfloat16 on CUDA (fp16).

ARCHS = {       # EDM's train.py architectures: NCSN++ and DDPM++ (SongUNet), ADM (DhariwalUNet)
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128),
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192),
    'toy':    toy.ARCH,
}

EDM_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/'
CIFAR_D = 'vgg16_bn,tf_efficientnet_lite0'                          # official --backbone 1
IMAGENET_D = 'deit_base_distilled_patch16_224,tf_efficientnet_lite0' # official --backbone 0

COLUMNS = ('teacher', 'arch', 'cres', 'batch', 'lr', 'dlr', 'ema', 'kimg', 'features', 'loss_batch')
PRESETS = {name: dict(zip(COLUMNS, (EDM_URL + row[0],) + row[1:]), r1_gamma=1e-4, freeze=1, fp16=True) for name, row in {
    #                teacher (EDM_URL + ...)            arch      cres       batch  lr    dlr   ema  kimg   features    loss_batch
    'cifar10':      ('edm-cifar10-32x32-uncond-ve.pkl', 'ncsnpp', '2,2,2',   256,  1e-4, 1e-4, 0.5, 5000,  CIFAR_D,    64),
    'cifar10-cond': ('edm-cifar10-32x32-cond-ve.pkl',   'ncsnpp', '2,2,2',   256,  1e-4, 1e-4, 0.5, 5000,  CIFAR_D,    64),
    'afhqv2':       ('edm-afhqv2-64x64-uncond-ve.pkl',  'ncsnpp', '1,2,2,2', 256,  2e-5, 4e-5, 0.5, 10000, IMAGENET_D, 64),
    'ffhq':         ('edm-ffhq-64x64-uncond-ve.pkl',    'ncsnpp', '1,2,2,2', 256,  2e-5, 4e-5, 0.5, 10000, IMAGENET_D, 64),
    'imagenet64':   ('edm-imagenet-64x64-cond-adm.pkl', 'adm',    '1,2,3,4', 512,  8e-6, 4e-5, 50,  10000, IMAGENET_D, 128),
}.items()}
# The offline demo: toy data, the shipped toy teacher, the teacher's own encoder as D's feature network; lr, dlr,
# r1_gamma and kimg from the toy FID sweep (README).
PRESETS['toy'] = dict(teacher=os.path.join(toy.ASSETS, 'toy-teacher.pt'), arch='toy', cres=','.join(map(str, toy.CHANNEL_MULT)),
                      batch=32, lr=1e-3, dlr=1e-3, ema=0.5, kimg=24, features='teacher', loss_batch=32, r1_gamma=1e-2, freeze=1, fp16=False, dwidth=0.25,
                      tick=4, snap=0, state=0, workers=0, fd_images=1000, classifier=os.path.join(toy.ASSETS, 'toy-classifier.pt'))
TOY_ONLY = ('fd_images', 'classifier')     # the toy demo's small evaluation: no option of the paper presets
MOVED = {'toy-teacher': 'python toy.py teacher', 'toy-classifier': 'python toy.py classifier'}

# Every option, name -> (default, help); a preset's row replaces the defaults of its keys.
OPTIONS = dict(
    teacher=('', 'EDM teacher: pickle or gdd-min checkpoint, path or URL'),
    arch=('ncsnpp', f'the paper\'s architecture ({", ".join(ARCHS)}): --bench builds it; a teacher that differs is noted'),
    cres=('2,2,2', 'channel multipliers per resolution of that architecture'),
    batch=(256, 'global batch size'),
    lr=(1e-4, 'generator learning rate (Adam)'),
    dlr=(1e-4, 'discriminator learning rate (x16/17)'),
    ema=(0.5, 'EMA half-life in Mimg (capped by the 5%% ramp)'),
    kimg=(5000, 'training duration in thousands of images'),
    r1_gamma=(1e-4, 'R1 weight gamma'),
    freeze=(1, 'GDD-I freezing level (0 = GDD)'),
    features=(CIFAR_D, "D's feature networks: 'teacher' or ImageNet backbone names, comma separated"),
    loss_batch=(64, 'reduction batch: losses are sums over this many images (gdd.py section 4)'),
    fp16=(True, 'generator U-Net in bfloat16 on CUDA'),
    tf32=(False, 'speed, not the official numerics: TF32 for fp32 convolutions and matmuls on CUDA (bench_min.py)'),
    channels_last=(False, 'speed, not the official numerics: G and D weights in channels_last memory format'),
    bf16_features=(False, "speed, not the official numerics: D's frozen feature networks under bf16 autocast"),
    data=('', "dataset zip/folder in EDM's format (dataset_min.py makes it); required, but the toy preset draws its own"),
    xflip=(False, 'add x-flipped copies of the data'),
    dwidth=(1.0, 'discriminator width multiplier (CCM channels 64*dwidth, mini-D channels)'),
    teacher_sigma=(backbones.TEACHER_FEATURE_SIGMA, "noise level of the 'teacher' feature network"),
    proj_seed=(0, "seed of D's frozen random projections (the same on every rank)"),
    fd_images=(0, '> 0: toy FID, class accuracy and 8x8 Frechet distance of this many images + compare.png at the end'),
    classifier=('', "detector of the toy FID and class accuracy, e.g. assets/toy-classifier.pt ('' = 8x8 distance only)"),
    metrics=('', "at every snapshot, metrics of the EMA generator: 'fid' plus optionally 'is', 'pr' (fid_min.py), "
                 "recorded in metrics.jsonl; best-snapshot.json names the lowest FID ('' = off)"),
    ref=('', 'reference npz of --metrics (fid_min.py ref, or EDM\'s FID statistics), path or URL'),
    metric_images=(50000, 'images of --metrics, the same seeds 0..N-1 at every snapshot'),
    detector=(fid_min.DETECTOR_URL, 'Inception detector of --metrics, path or URL'),
    seed=(42, 'random seed (official train.sh); data order and latents derive from it, for any number of GPUs'),
    batch_gpu=(0, "images per D call and process (D's BatchNorm batch, quirk 6); smaller than batch / processes "
                  'accumulates gradients (0 = min(batch / processes, loss batch), the official per-GPU batch)'),
    state=(10, 'ticks between training-state files (0 = at the end only); the last 3 are kept'),
    resume=('', "continue from a training state: file, run folder, or 'auto' (the newest run in --outdir with these options, else a new run)"),
    resume_override=('', 'comma-separated options that may differ from the resumed state (e.g. r1_gamma,lr); logged'),
    bench=(0, '> 0: time this many iterations on random data with a random-weight teacher; images/s, memory, phases (bench_min.py)'),
    tick=(25, 'kimg between progress lines'),
    snap=(10, 'ticks between snapshots (0 = at the end only)'),
    workers=(4, 'data-loading processes (at most the CPU cores)'),
    outdir=('runs', 'parent folder of the run folders'),
    export=('', 'also save the final network here'),
    device=('auto', "'auto', 'cpu', 'cuda', ..."),
)

#----------------------------------------------------------------------------
# Command line: `train_min.py PRESET [--option value ...]`; --help after the preset shows its values.

def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith('-'):
        print(__doc__.strip() + '\n\npresets: ' + ', '.join(PRESETS))
        raise SystemExit(0 if argv and argv[0] in ('-h', '--help') else 2)
    preset = argv[0]
    if preset in MOVED:
        raise SystemExit(f'error: `train_min.py {preset}` moved; run: {MOVED[preset]} {" ".join(argv[1:])}'.rstrip())
    if preset not in PRESETS:
        raise SystemExit(f'error: unknown preset {preset!r}; choose from {", ".join(PRESETS)}')
    parser = argparse.ArgumentParser(prog=f'train_min.py {preset}', description=f'Preset {preset!r}; every value can be overridden.',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for key, (default, text) in OPTIONS.items():
        default = PRESETS[preset].get(key, default)
        if key in TOY_ONLY and preset != 'toy':
            parser.set_defaults(**{key: default})
            continue
        kind = _bool if isinstance(default, bool) else float if key in ('kimg', 'tick') else type(default)
        parser.add_argument('--' + key.replace('_', '-'), type=kind, default=default, metavar=key.upper(), help=text)
    parser.add_argument('--backbone-weights', action='append', default=[], metavar='NAME=PATH_OR_URL',
                        help='weights of an ImageNet feature network (default: backbones.WEIGHT_URLS)')
    cfg = parser.parse_args(argv[1:])
    cfg.preset = preset
    check_options(cfg)
    return cfg


def check_options(cfg):
    """Every value that cannot work fails here, in one line, before anything is loaded or written. Local paths
    of --data, --teacher and --backbone-weights become absolute (what resume compares)."""
    def need(ok, text):
        if not ok:
            raise SystemExit(f'error: {text}')
    flag = lambda k: '--' + k.replace('_', '-')
    local = lambda p: p if safe_files.is_url(p) else os.path.abspath(os.path.expanduser(p))
    need(cfg.batch >= 1, f'--batch must be >= 1, got {cfg.batch}')
    need(math.isfinite(cfg.kimg) and cfg.kimg * 1000 >= 1, f'--kimg must be finite and >= 0.001 (one image), got {cfg.kimg}')
    need(math.isfinite(cfg.tick) and cfg.tick > 0, f'--tick must be finite and > 0, got {cfg.tick}')
    for k in ('lr', 'dlr', 'r1_gamma', 'ema'):
        need(math.isfinite(getattr(cfg, k)) and getattr(cfg, k) >= 0, f'{flag(k)} must be finite and >= 0, got {getattr(cfg, k)}')
    for k in ('dwidth', 'teacher_sigma'):
        need(math.isfinite(getattr(cfg, k)) and getattr(cfg, k) > 0, f'{flag(k)} must be finite and > 0, got {getattr(cfg, k)}')
    for k in ('batch_gpu', 'state', 'snap', 'workers', 'bench', 'fd_images'):
        need(getattr(cfg, k) >= 0, f'{flag(k)} must be >= 0, got {getattr(cfg, k)}')
    need(cfg.loss_batch >= 1, f'--loss-batch must be >= 1, got {cfg.loss_batch}')
    need(cfg.fd_images != 1, '--fd-images must be 0 or >= 2 (a covariance needs two images)')
    for k in ('seed', 'proj_seed'):
        need(0 <= getattr(cfg, k) < 2**32, f'{flag(k)} must be in 0..2^32-1, got {getattr(cfg, k)}')
    need(cfg.freeze in gdd.FREEZE_LEVELS, f'--freeze must be one of {sorted(gdd.FREEZE_LEVELS)}, got {cfg.freeze}')
    need(cfg.arch in ARCHS, f'--arch must be one of {", ".join(ARCHS)}, got {cfg.arch!r}')
    need(re.fullmatch(r'[1-9]\d*(,[1-9]\d*)*', cfg.cres), f'--cres must be comma-separated integers >= 1, got {cfg.cres!r}')
    names, known = cfg.features.split(','), ('teacher',) + backbones.BACKBONES
    need(all(n in known for n in names) and len(set(names)) == len(names),
         f'--features must be distinct names from {", ".join(known)}, got {cfg.features!r}')
    for item in cfg.backbone_weights:
        name, eq, source = item.partition('=')
        need(eq and source and name in names and name in backbones.BACKBONES,
             f'--backbone-weights must be NAME=PATH_OR_URL with NAME a pretrained network of --features, got {item!r}')
    cfg.backbone_weights = [f'{name}={local(source)}' for name, _, source in (w.partition('=') for w in cfg.backbone_weights)]
    need(not (cfg.resume and cfg.bench), '--resume and --bench exclude each other')
    wrong = [k for k in cfg.resume_override.replace('-', '_').split(',') if k.strip() and
             (k.strip() not in ts.RESUME_MUST_MATCH or k.strip() in ts.RESUME_FIXED)]
    need(not wrong, f'--resume-override: {", ".join(wrong)} cannot be overridden; choose from '
                    f'{", ".join(k for k in ts.RESUME_MUST_MATCH if k not in ts.RESUME_FIXED)}')
    problem = cli.device_problem(cfg.device)
    need(problem is None, problem)
    cfg.data = local(cfg.data) if cfg.data else ''
    cfg.ref = local(cfg.ref) if cfg.ref else ''
    problem = fid_min.check_training_metrics(cfg.metrics, cfg.ref, cfg.metric_images)   # the ref must exist now
    need(not problem, problem)
    cfg.teacher = local(cfg.teacher)
    cfg.workers = min(cfg.workers, cli.cpu_count())     # more workers than cores only slow down (DataLoader warns)


def _bool(s):
    if s.lower() in ('1', 'true', 'yes'):
        return True
    if s.lower() in ('0', 'false', 'no'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean, got {s!r}')


def arch_kwargs(cfg):
    return {**ARCHS[cfg.arch], 'channel_mult': [int(m) for m in cfg.cres.split(',')]}


def effective_batch_gpu(cfg, world):
    return cfg.batch_gpu or min(cfg.batch // world, cfg.loss_batch)

#----------------------------------------------------------------------------
# Data, in the order of dataset_min.InfiniteSampler: rank r of W takes the r-th slice of each iteration's window
# of --batch images and processes it as consecutive chunks of batch_gpu images. Which images an iteration sees
# depends only on --seed, --batch and the image counter, not on the number of processes or chunks.

def batches(dataset, batch, batch_gpu, seed, workers, device, rank=0, world=1, start=0):
    """Endless (images in [-1, 1], labels) chunks of batch_gpu for this rank, starting at global image `start`."""
    sampler = dataset_min.InfiniteSampler(len(dataset), batch, seed, rank, world, start)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_gpu, sampler=sampler, num_workers=workers,
                                         pin_memory=(device.type == 'cuda'))
    for images, labels in loader:   # non_blocking copies from pinned memory: no host synchronisation
        yield images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1, labels.to(device, non_blocking=True)


def open_dataset(cfg, use_labels=True, teacher=None):
    dataset = dataset_min.ImageDataset(cfg.data or toy.toy_dataset(cfg.outdir), use_labels=use_labels, xflip=cfg.xflip)
    if teacher is not None:     # the student inherits the teacher's geometry and conditioning
        have = (dataset.resolution, dataset.num_channels, dataset.label_dim)
        want = (teacher.img_resolution, teacher.img_channels, teacher.label_dim)
        if have != want:
            raise SystemExit(f'error: dataset {dataset.name} has (resolution, channels, label_dim) = {have}, '
                             f'the teacher needs {want}')
    print(f'Dataset {dataset.name}: {len(dataset)} images, {dataset.resolution}x{dataset.resolution}x'
          f'{dataset.num_channels}, label_dim {dataset.label_dim}')
    return dataset


def fixed_latents(net, n=64, seed=0, device='cpu'):
    """Latents and labels (class i % label_dim) of the snapshot grids: the same images at every snapshot."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn([n, net.img_channels, net.img_resolution, net.img_resolution], generator=g)
    c = torch.eye(net.label_dim)[torch.arange(n) % net.label_dim] if net.label_dim else None
    return z.to(device), (None if c is None else c.to(device))

#----------------------------------------------------------------------------
# Building the run: the teacher, the generator initialised from it (gdd.py section 1), its EMA copy and the
# discriminator, identical on every rank (construction draws from the torch RNG seeded with --seed).

PRESET_GEOMETRY = {'cifar10': (32, 0), 'cifar10-cond': (32, 10), 'afhqv2': (64, 0), 'ffhq': (64, 0),
                   'imagenet64': (64, 1000), 'toy': (32, 10)}      # (resolution, label_dim) of each preset's data


def load_teacher(cfg, device):
    """The EDM teacher; the generator takes its architecture (its constructor arguments), noted where it differs
    from the preset's paper configuration. Conditional presets need a conditional teacher, the others not."""
    teacher = safe_files.load_network(cfg.teacher, device=device).requires_grad_(False)
    if type(teacher).__name__ != 'EDMPrecond':
        raise SystemExit(f'error: {cfg.teacher} is a {type(teacher).__name__}, not an EDM teacher (EDMPrecond)')
    kind = lambda n: f'class-conditional ({n} classes)' if n else 'unconditional'
    if (teacher.label_dim > 0) != (PRESET_GEOMETRY[cfg.preset][1] > 0):
        raise SystemExit(f'error: preset {cfg.preset} is {kind(PRESET_GEOMETRY[cfg.preset][1])}, the teacher {cfg.teacher} '
                         f'is {kind(teacher.label_dim)}: use a teacher and a preset of the same kind')
    kwargs = teacher.init_kwargs
    differ = [f'{k}={kwargs.get(k)!r} (paper: {v!r})' for k, v in arch_kwargs(cfg).items() if kwargs.get(k) != v]
    if differ:
        print(f'note: the teacher differs from the paper\'s {cfg.preset} network: {", ".join(differ)}; the generator takes the teacher\'s')
    return teacher


def build_training(cfg, device, rank, world):
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.bench:       # a random-weight teacher of the preset's architecture
        resolution, label_dim = PRESET_GEOMETRY[cfg.preset]
        teacher = edm_nets.EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim, **arch_kwargs(cfg))
    else:
        teacher = load_teacher(cfg, 'cpu')
    if not cfg.bench and not cfg.data and world > 1:
        if rank == 0:
            toy.toy_dataset(cfg.outdir)             # drawn once, before the other ranks read it
        torch.distributed.barrier()
    dataset = None if cfg.bench else open_dataset(cfg, use_labels=teacher.label_dim > 0, teacher=teacher)
    G = gdd.generator_from_teacher(teacher, use_fp16=cfg.fp16).to(device).train()
    G_params, _, _ = gdd.freeze_generator(G, cfg.freeze, verbose=rank == 0)
    G_ema = gdd.fp32(copy.deepcopy(G).eval().requires_grad_(False))
    names = cfg.features.split(',')
    weights = {name: None for name in names} if cfg.bench else dict(item.split('=', 1) for item in cfg.backbone_weights)
    D = gdd.build_discriminator(names, teacher, label_dim=teacher.label_dim, width=cfg.dwidth,
                                cout=max(int(64 * cfg.dwidth), 8), proj_seed=cfg.proj_seed, backbone_weights=weights,
                                teacher_sigma=cfg.teacher_sigma).to(device).train()
    print(f'Discriminator: feature networks {cfg.features}, {sum(p.numel() for p in D.heads.parameters()):,} trainable parameters')
    bench_min.apply_speed_options(cfg, G, D)
    opt_G, opt_D = gdd.make_optimizers(G_params, D, cfg.lr, cfg.dlr)
    return teacher if cfg.fd_images else None, dataset, G, G_ema, D, opt_G, opt_D

# Multi-process runs (torchrun, one process per GPU; gloo on CPU). There is no DistributedDataParallel wrapper:
# the G step backpropagates through D with D's parameters frozen and R1 needs double backward, neither of which
# DDP's reducer handles. Instead every optimizer step sums the gradients of exactly the parameters it updates
# over the ranks, in one flat all-reduce after all accumulation chunks (what DDP with no_sync would send,
# without the overlap with backward). Frozen parameters (GDD-I's 85%, the feature networks, the random
# projections) are never in it. Every rank keeps identical networks: same initial weights, same summed
# gradients, same optimizer arithmetic.

def sum_grads_over_ranks(params):
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)

#----------------------------------------------------------------------------
# The training loop (gdd.py does the method; this is the loop around it).

def train_gdd(cfg, run_dir, device, rank=0, world=1, state=None, state_path=None):
    batch_gpu = effective_batch_gpu(cfg, world)
    if batch_gpu < 1 or cfg.batch % (world * batch_gpu):
        raise SystemExit(f'error: --batch {cfg.batch} is not a multiple of {world} processes x --batch-gpu {batch_gpu}')
    torch.backends.cudnn.benchmark = True       # the official numerics (quirk 11): TF32 off, no fp16 reductions
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    teacher, dataset, G, G_ema, D, opt_G, opt_D = build_training(cfg, device, rank, world)
    latent_gen = torch.Generator(device).manual_seed(cfg.seed)  # identical on every rank: each takes its rows
    step, tick, seen = 0, 0, 0
    if state is not None:
        if any('.parametrizations.' in k for k in state['D']):     # heads before gdd.SNConv2d
            raise SystemExit('error: this training state comes from an older gdd-min whose discriminator heads used '
                             'torch.nn.utils.parametrizations.spectral_norm; it cannot be resumed: start a new run')
        step, tick, seen = ts.load_training_state(state, state_path, G, G_ema, D, opt_G, opt_D, latent_gen)
        print(f'Resumed at iteration {step}, {seen / 1000:.3f} kimg')
        del state

    # This rank's rows of the global batch, as num_chunks calls of batch_gpu images (gdd.py section 4).
    per_rank, num_chunks = cfg.batch // world, cfg.batch // (world * batch_gpu)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    shape = [cfg.batch, G.img_channels, G.img_resolution, G.img_resolution]
    reduce = sum_grads_over_ranks if torch.distributed.is_initialized() else None    # any process group, even of one
    print(f'Batch {cfg.batch} = {world} processes x {num_chunks} chunks x {batch_gpu} images, losses reduced over '
          f'{cfg.loss_batch} images; device {device}' + (', generator U-Net in bfloat16' if cfg.fp16 and device.type == 'cuda' else
                                                          f', {torch.get_num_threads()} threads per process' if device.type == 'cpu' else ''))

    def iteration(chunks, step, seen, reduce_grads=reduce):
        z_G = torch.randn(shape, generator=latent_gen, device=device)[rows].split(batch_gpu)
        z_D = torch.randn(shape, generator=latent_gen, device=device)[rows].split(batch_gpu)
        chunks = [(x, c, zg, zd) for (x, c), zg, zd in zip(chunks, z_G, z_D)]
        stats = gdd.train_step(G, D, opt_G, opt_D, chunks, step, cfg.r1_gamma, loss_scale=cfg.loss_batch / cfg.batch,
                               r1_scale=1 / cfg.batch, reduce_grads=reduce_grads)
        gdd.update_ema(G_ema, G, gdd.ema_beta(cfg.batch, seen, cfg.ema))
        return stats

    if cfg.bench:
        return bench_min.bench(cfg, iteration, reduce, G, D, opt_G, opt_D, device, world, num_chunks, batch_gpu)
    evaluate = fid_min.SnapshotMetrics(cfg, run_dir, device, rank, world) if cfg.metrics else None

    data = batches(dataset, cfg.batch, batch_gpu, cfg.seed, cfg.workers, device, rank, world, start=seen)
    z_grid, c_grid = fixed_latents(G, device=device)
    total, tick_images, start = round(cfg.kimg * 1000), round(cfg.tick * 1000), time.time()
    tick_seen, tick_time, sums, counts = seen, time.time(), {}, {}
    last_state = state_path
    while seen < total:
        stats = iteration([next(data) for _ in range(num_chunks)], step, seen)
        stats['nonfinite'] = (~torch.isfinite(stats['loss_G'] + stats['loss_D'])).float()    # NaN/inf iterations
        for k, v in stats.items():      # tensors: no host synchronisation until the tick
            sums[k], counts[k] = sums.get(k, 0) + v, counts.get(k, 0) + 1
        step, seen = step + 1, seen + cfg.batch

        done = seen >= total
        if seen - tick_seen >= tick_images or done:
            tick += 1
            keys = ['loss_G', 'loss_D', 'logits_real', 'logits_fake', 'r1']
            values = torch.stack([sums[k] / counts[k] if k in sums else torch.tensor(float('nan'), device=device) for k in keys])
            # Fraction of this tick's iterations with non-finite losses; 1 if any parameter is NaN/inf.
            values = torch.cat([values, torch.stack([sums['nonfinite'] / counts['nonfinite'], cli.nonfinite_parameters(G, G_ema, D.heads)])])
            mem = torch.tensor([cli.peak_memory_gb(device)], device=device)
            if world > 1:
                torch.distributed.all_reduce(values)
                torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
                values /= world
            dt = time.time() - tick_time
            line = dict(tick=tick, kimg=seen / 1000, step=step, sec_per_kimg=dt / (seen - tick_seen) * 1000,
                        images_per_s=(seen - tick_seen) / dt, **dict(zip(keys, values.tolist())),
                        peak_mem_gb=mem.item(), time=time.time() - start)
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            tick_seen, tick_time, sums, counts = seen, time.time(), {}, {}
            if rank == 0:
                print(f'kimg {line["kimg"]:8.{1 if cfg.tick >= 1 else 3}f}  sec/kimg {line["sec_per_kimg"]:6.2f}  img/s {line["images_per_s"]:7.1f}  '
                      f'loss G {line["loss_G"]:.3f} D {line["loss_D"]:.3f}  logits real {line["logits_real"]:+.3f} '
                      f'fake {line["logits_fake"]:+.3f}  R1 {"-" if line["r1"] != line["r1"] else format(line["r1"], ".4g")}  mem {line["peak_mem_gb"]:.2f}GB  '
                      f'time {line["time"]:6.0f}s', flush=True)
                with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as f:     # NaN (no R1 step in the tick) -> null
                    f.write(json.dumps({k: None if v != v else v for k, v in line.items()}) + '\n')
            bad_losses, bad_params = values[-2:].tolist()     # the same on every rank (all-reduced)
            if bad_params > 0 or bad_losses >= 1:         # no snapshot or state of this tick: the last state stays good
                raise SystemExit(f'error: training stopped at tick {tick} (kimg {seen / 1000:.3f}, iteration {step}): '
                                 + ('parameters became NaN/inf' if bad_params > 0 else 'the losses were NaN/inf in every iteration of the tick')
                                 + (f'; the last good training state is {last_state}' if last_state else '; no training state was written')
                                 + ' (lower --lr/--dlr?)')
            if bad_losses > 0:
                print(f'warning: non-finite losses in {bad_losses:.0%} of the iterations of tick {tick}')
            snapshot = done or (cfg.snap and tick % cfg.snap == 0)
            if rank == 0:
                if snapshot:
                    with torch.no_grad():
                        images = cli.quantize(gdd.generate(G_ema, z_grid, c_grid))
                    name = ts.kimg_name(seen, cfg.tick)
                    cli.save_grid(images, os.path.join(run_dir, f'samples-{name}.png'))
                    safe_files.save_checkpoint(G_ema, cfg, os.path.join(run_dir, f'network-snapshot-{name}.pt'))
            if evaluate and snapshot:       # every rank: each measures a share of the images
                evaluate(G_ema, seen / 1000, f'network-snapshot-{ts.kimg_name(seen, cfg.tick)}.pt')
            if rank == 0:
                if done or (cfg.state and tick % cfg.state == 0):
                    last_state = ts.save_training_state(run_dir, step, tick, seen, cfg, G, G_ema, D, opt_G, opt_D, latent_gen, batch_gpu)
    print(f'Training done: {step} iterations, {seen / 1000:.{1 if cfg.tick >= 1 else 3}f} kimg in {time.time() - start:.0f}s')
    if cfg.fd_images and rank == 0:
        toy.evaluate_small(G_ema, teacher.to(device), dataset, run_dir, device, cfg.fd_images, cfg.classifier, toy_floor=not cfg.data)


#----------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_args(argv)
    run = ts.RunFolder()    # the run folder's lock, log and last good state, released however the run ends
    with run, cli.torch_flags(), cli.cli_errors(note=run.stop_note):     # torch's switches restored after the run
        if not cfg.bench:           # missing data, unwritable outputs, a bad classifier: fail now, not after the training
            if not (cfg.data or cfg.preset == 'toy'):
                raise ValueError(f'preset {cfg.preset} needs --data, a dataset zip made by dataset_min.py (README: Datasets); '
                                 'only the toy preset draws its own')
            cli.check_output(cfg.outdir, '--outdir', folder=True)
            if cfg.export:
                cli.check_output(cfg.export, '--export')
            if cfg.fd_images and cfg.classifier:
                fid_min.load_detector(cfg.classifier)
        with cli.distributed(cfg.device) as (rank, world, device):
            path, state = run.open(cfg, rank, effective_batch_gpu(cfg, world))   # rank 0 picks the state and the run folder
            print(f'Preset {cfg.preset}, ' + (f'run directory {run.dir}' if run.dir else 'benchmark (writes nothing)')
                  + f', device {device}, {world} process(es)' + (f', resuming from {path}' if path else ''))
            print('Options: ' + json.dumps(vars(cfg)))
            result = train_gdd(cfg, run.dir, device, rank, world, state, path)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()     # every rank done with its collectives before the group goes away
            return result

if __name__ == '__main__':
    main()
