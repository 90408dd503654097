"""Train a one-step generator with GDD / GDD-I (gdd.py). One preset per configuration of the paper.

    python train_min.py toy                          # offline demo on a CPU: toy data + the shipped toy teacher
    python train_min.py cifar10 --data cifar10-32x32.zip          # GDD-I; add --freeze 0 for GDD
    python train_min.py toy-teacher                  # re-make assets/toy-teacher.pt with EDM's training loss
    python train_min.py toy-classifier               # re-make assets/toy-classifier.pt, the toy FID's detector
    python train_min.py PRESET --help                # every value of the preset, each overridable
    torchrun --nproc_per_node=8 train_min.py cifar10 --data cifar10-32x32.zip --resume auto   # 8 GPUs, resumable
    python train_min.py cifar10 --bench 20 --batch-gpu 64                   # speed + memory, no data or download

Outputs go to --outdir/NNNNN-PRESET/: log.txt, network-snapshot-KKKKKK.pt (EMA generator, gdd-min checkpoint
format), samples-KKKKKK.png (fixed seeds), stats.jsonl (one line per tick), training-state-IIIIIIII.pt and its
.sha256 (for --resume; the last 3), and for --fd-images > 0 compare.png + metrics.json.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import re
import socket
import sys
import time
import zipfile

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F

import backbones
import edm_nets
import fid_min
import gdd
import sample_min
from dataset_min import ImageDataset, save_dataset
from sample_min import cli_errors, init_distributed

try:
    import fcntl                # the run-folder lock (POSIX)
except ImportError:
    fcntl = None

#----------------------------------------------------------------------------
# Toy data: 10 classes of anti-aliased shapes (class = shape) of random colour, size, position and rotation on
# a random vertical colour gradient. Drawn with pillow at 4x and downsampled, deterministic for a seed.

TOY_IMAGES, TOY_SEED = 20000, 0     # the toy training set; the second draw (seed 1) measures the floor

def draw_toy_images(n, seed, resolution=32, supersample=4):
    rng = np.random.RandomState(seed)
    S = resolution * supersample
    labels = rng.randint(0, 10, size=n)
    images = np.zeros([n, 3, resolution, resolution], dtype=np.uint8)
    for i, cls in enumerate(labels):
        t = np.linspace(0, 1, S)[:, None, None]
        top, bottom = rng.randint(0, 160, size=3), rng.randint(0, 160, size=3)
        img = PIL.Image.fromarray(np.broadcast_to((top * (1 - t) + bottom * t).astype(np.uint8), (S, S, 3)).copy())
        draw = PIL.ImageDraw.Draw(img)
        fg = tuple(int(v) for v in rng.randint(96, 256, size=3))
        r = rng.uniform(0.18, 0.32) * S
        cx, cy = rng.uniform(r, S - r, size=2)
        a = rng.uniform(0, 2 * np.pi)
        w = int(r * 0.35)
        at = lambda rr, phi: (cx + rr * np.cos(phi), cy + rr * np.sin(phi))
        polygon = lambda k: [at(r, a + 2 * np.pi * j / k) for j in range(k)]
        box = lambda x, y, rr: [x - rr, y - rr, x + rr, y + rr]
        if cls == 0:   draw.ellipse(box(cx, cy, r), fill=fg)                                  # disc
        elif cls == 1: draw.polygon(polygon(4), fill=fg)                                      # square
        elif cls == 2: draw.polygon(polygon(3), fill=fg)                                      # triangle
        elif cls == 3: draw.ellipse(box(cx, cy, r), outline=fg, width=w)                      # ring
        elif cls == 4:                                                                        # cross
            for phi in (a, a + np.pi / 2):
                draw.line([at(-r, phi), at(r, phi)], fill=fg, width=w)
        elif cls == 5: draw.polygon(polygon(6), fill=fg)                                      # hexagon
        elif cls == 6: draw.polygon([at(r if j % 2 == 0 else 0.45 * r, a + np.pi * j / 5) for j in range(10)], fill=fg)  # star
        elif cls == 7: draw.polygon(polygon(4), outline=fg, width=w)                          # square outline
        elif cls == 8:                                                                        # two discs
            for s in (-0.5, 0.5):
                draw.ellipse(box(*at(s * r, a), 0.5 * r), fill=fg)
        else:                                                                                 # three lines
            for s in (-0.6, 0, 0.6):
                ox, oy = -np.sin(a) * s * r, np.cos(a) * s * r
                draw.line([(x + ox, y + oy) for x, y in (at(-r, a), at(r, a))], fill=fg, width=max(w // 2, 1))
        images[i] = np.asarray(img.resize((resolution, resolution), PIL.Image.LANCZOS)).transpose(2, 0, 1)
    return images, labels


def toy_dataset(outdir):
    path = os.path.join(outdir, 'toy-32x32.zip')     # deterministic, so drawn once and shared by later runs
    if not os.path.isfile(path):
        print(f'Drawing the toy dataset ({TOY_IMAGES} images) into {path}')
        save_dataset(path, *draw_toy_images(TOY_IMAGES, TOY_SEED))
    return path

#----------------------------------------------------------------------------
# Architectures (recipe A.1; EDM train.py kwargs) and presets: one row of the paper's table each (recipe G,
# C.1-C.3). 'lr'/'dlr' are the Adam rates of G/D (D gets x16/17, C.1), 'ema' the EMA half-life in Mimg (its
# ramp dominates, quirk I.7), 'kimg' the duration, 'freeze' the GDD-I level (0 = GDD), 'loss_batch' the
# reduction batch of the losses (gdd.py section 4, recipe B.6: the per-GPU batch of the release script, which
# runs 4 GPUs), 'fp16' the generator's U-Net in bfloat16 on CUDA (recipe A.4; no effect on a CPU).

ARCHS = {
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128),
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192),
    'toy':    dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, num_blocks=1, attn_resolutions=[8],
                   dropout=0),   # a 0.3M-parameter DDPM++
}

EDM_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/'
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')   # the shipped toy files, from any cwd
CIFAR_D = 'vgg16_bn,tf_efficientnet_lite0'                          # recipe E.2, --backbone 1
IMAGENET_D = 'deit_base_distilled_patch16_224,tf_efficientnet_lite0' # recipe E.2, --backbone 0

PRESETS = {
    'cifar10':      dict(teacher=EDM_URL + 'edm-cifar10-32x32-uncond-ve.pkl', arch='ncsnpp', cres='2,2,2',
                         batch=256, lr=1e-4, dlr=1e-4, ema=0.5, kimg=5000, r1_gamma=1e-4, freeze=1, features=CIFAR_D,
                         loss_batch=64, fp16=True),
    'cifar10-cond': dict(teacher=EDM_URL + 'edm-cifar10-32x32-cond-ve.pkl', arch='ncsnpp', cres='2,2,2',
                         batch=256, lr=1e-4, dlr=1e-4, ema=0.5, kimg=5000, r1_gamma=1e-4, freeze=1, features=CIFAR_D,
                         loss_batch=64, fp16=True),
    'afhqv2':       dict(teacher=EDM_URL + 'edm-afhqv2-64x64-uncond-ve.pkl', arch='ncsnpp', cres='1,2,2,2',
                         batch=256, lr=2e-5, dlr=4e-5, ema=0.5, kimg=10000, r1_gamma=1e-4, freeze=1, features=IMAGENET_D,
                         loss_batch=64, fp16=True),
    'ffhq':         dict(teacher=EDM_URL + 'edm-ffhq-64x64-uncond-ve.pkl', arch='ncsnpp', cres='1,2,2,2',
                         batch=256, lr=2e-5, dlr=4e-5, ema=0.5, kimg=10000, r1_gamma=1e-4, freeze=1, features=IMAGENET_D,
                         loss_batch=64, fp16=True),
    'imagenet64':   dict(teacher=EDM_URL + 'edm-imagenet-64x64-cond-adm.pkl', arch='adm', cres='1,2,3,4',
                         batch=512, lr=8e-6, dlr=4e-5, ema=50, kimg=10000, r1_gamma=1e-4, freeze=1, features=IMAGENET_D,
                         loss_batch=128, fp16=True),
    # The offline demo: toy data, the shipped toy teacher, the teacher's own encoder as D's feature network.
    # lr, dlr, r1_gamma and kimg were tuned on the toy FID (issue 11; README has the sweep): lr = dlr = 2e-4 with
    # r1_gamma 1e-4 gave 11.4 at 16 kimg, 1e-3 / 1e-3 / 1e-2 gave 5.0 at 16 kimg and 4.3 at 24 (the 10-minute budget).
    'toy':          dict(teacher=os.path.join(ASSETS, 'toy-teacher.pt'), arch='toy', cres='1,2,2',
                         batch=32, lr=1e-3, dlr=1e-3, ema=0.5, kimg=24, r1_gamma=1e-2, freeze=1, features='teacher',
                         loss_batch=32, fp16=False, dwidth=0.25, tick=4, snap=0, state=0, workers=0, fd_images=1000,
                         classifier=os.path.join(ASSETS, 'toy-classifier.pt')),
    # Makes assets/toy-teacher.pt: EDM's training loss on the toy data.
    'toy-teacher':  dict(arch='toy', cres='1,2,2', batch=64, lr=1e-3, ema=0.02, kimg=150, tick=5, snap=0, workers=0,
                         export=os.path.join(ASSETS, 'toy-teacher.pt')),
    # Makes assets/toy-classifier.pt: the toy demo's detector (fid_min.ToyClassifier), cross-entropy, cosine lr.
    'toy-classifier': dict(batch=128, lr=2e-3, kimg=40, tick=8, export=os.path.join(ASSETS, 'toy-classifier.pt')),
}
OWN_OPTIONS = {     # the few COMMON options of the presets that are not GDD runs
    'toy-teacher': ('data', 'xflip', 'seed', 'tick', 'snap', 'workers', 'outdir', 'export', 'device'),
    'toy-classifier': ('seed', 'tick', 'outdir', 'export', 'device'),
}

COMMON = dict(
    data='',            # dataset zip/folder (EDM format); '' = draw the toy dataset
    xflip=False,        # add x-flipped copies of the data
    dwidth=1.0,         # discriminator width: CCM channels 64*dwidth, mini-D channel table (recipe E.7) * dwidth
    teacher_sigma=gdd.TEACHER_FEATURE_SIGMA,    # noise level of the 'teacher' feature network
    proj_seed=0,        # seed of D's frozen random projections (same on every rank)
    fd_images=0,        # > 0: at the end, toy FID / class accuracy / 8x8 distance of this many images + compare.png
    classifier='',      # detector of the toy FID and the class accuracy (fid_min.load_detector); '' = 8x8 only
    seed=42,            # recipe C.4; data order and latents derive from it (identical for any number of GPUs)
    batch_gpu=0,        # images per D call and rank = D's BatchNorm batch (quirk I.6); < batch / GPUs accumulates
                        # gradients. 0 = min(batch / GPUs, loss_batch): the official per-GPU batch on any GPU count
    state=10,           # ticks between training-state files for --resume (0: only at the end); the last 3 are kept
    resume='',          # training state to continue from: a file, a run folder, or 'auto' (newest in --outdir)
    resume_override='', # options (comma separated) that may differ from the resumed state's, e.g. r1_gamma,lr
    bench=0,            # > 0: time this many iterations on random data and a random-weight teacher, then exit
    tick=25,            # kimg between progress lines
    snap=10,            # ticks between snapshots (0: only at the end)
    workers=4,          # data-loading processes
    outdir='runs',      # one sub-folder per run
    export='',          # also copy the final network to this path
    device='auto',      # 'cuda' when available, else 'cpu'
)

HELP = dict(
    teacher='EDM teacher: pickle or gdd-min checkpoint, path or URL', arch='teacher architecture (checked on load)',
    cres='channel multipliers per resolution', batch='global batch size', lr='generator learning rate (Adam)',
    dlr='discriminator learning rate (x16/17)', ema='EMA half-life in Mimg (capped by the 5%% ramp)',
    kimg='training duration in thousands of images', r1_gamma='R1 weight gamma', freeze='GDD-I freezing level (0 = GDD)',
    features="D's feature networks: 'teacher' or ImageNet backbone names, comma separated",
    loss_batch='reduction batch: losses are sums over this many images (recipe B.6)',
    fp16="generator U-Net in bfloat16 on CUDA (recipe A.4)",
    data="dataset zip/folder (EDM format); '' = draw the toy dataset", xflip='add x-flipped copies of the data',
    dwidth='discriminator width multiplier (CCM channels 64*dwidth, mini-D channels)',
    teacher_sigma="noise level of the 'teacher' feature network", proj_seed="seed of D's frozen random projections",
    fd_images='> 0: toy FID, class accuracy and 8x8 Frechet distance of this many images + compare.png at the end',
    classifier="detector of the toy FID and class accuracy, e.g. assets/toy-classifier.pt ('' = 8x8 distance only)",
    seed='random seed',
    tick='kimg between progress lines', snap='ticks between snapshots (0 = at the end only)',
    workers='data-loading processes', outdir='parent folder of the run folders',
    export='also save the final network here', device="'auto', 'cpu', 'cuda', ...",
    batch_gpu="images per D call and process (D's BatchNorm batch); smaller than batch / processes accumulates "
              'gradients (0 = min(batch / processes, loss batch), the official per-GPU batch)',
    state='ticks between training-state files (0 = at the end only); the last 3 are kept',
    resume="continue from a training state: file, run folder, or 'auto' (newest in --outdir, else start fresh)",
    resume_override='comma-separated options that may differ from the resumed state (e.g. r1_gamma,lr); logged',
    bench='> 0: time this many iterations on random data with a random-weight teacher, print images/s and peak memory')

TEACHER_LR_RAMPUP_KIMG = 10     # toy teacher: linear lr warm-up (EDM uses 10 Mimg at batch 512)

#----------------------------------------------------------------------------
# Command line: `train_min.py PRESET [--option value ...]`; --help after the preset shows its values.

def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith('-'):
        print(__doc__.strip() + '\n\npresets: ' + ', '.join(PRESETS))
        raise SystemExit(0 if argv and argv[0] in ('-h', '--help') else 2)
    preset = argv[0]
    if preset not in PRESETS:
        raise SystemExit(f'error: unknown preset {preset!r}; choose from {", ".join(PRESETS)}')
    keys = [k for k in COMMON if preset not in OWN_OPTIONS or k in OWN_OPTIONS[preset]]
    values = {**{k: COMMON[k] for k in keys}, **PRESETS[preset]}
    parser = argparse.ArgumentParser(prog=f'train_min.py {preset}', description=f'Preset {preset!r}; every value can be overridden.',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for key, default in values.items():
        flag, kind = '--' + key.replace('_', '-'), _bool if isinstance(default, bool) else float if key in ('kimg', 'tick') else type(default)
        parser.add_argument(flag, type=kind, default=default, metavar=key.upper(), help=HELP[key])
    if 'features' in values:
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
    has = lambda k: hasattr(cfg, k)
    flag = lambda k: '--' + k.replace('_', '-')
    local = lambda p: p if re.match(r'^https?://', p) else os.path.abspath(os.path.expanduser(p))
    need(cfg.batch >= 1, f'--batch must be >= 1, got {cfg.batch}')
    need(math.isfinite(cfg.kimg) and cfg.kimg * 1000 >= 1, f'--kimg must be finite and >= 0.001 (one image), got {cfg.kimg}')
    need(math.isfinite(cfg.tick) and cfg.tick > 0, f'--tick must be finite and > 0, got {cfg.tick}')
    for k in ('lr', 'dlr', 'r1_gamma', 'ema'):
        need(not has(k) or math.isfinite(getattr(cfg, k)) and getattr(cfg, k) >= 0, f'{flag(k)} must be finite and >= 0, got {getattr(cfg, k, 0)}')
    for k in ('dwidth', 'teacher_sigma'):
        need(not has(k) or math.isfinite(getattr(cfg, k)) and getattr(cfg, k) > 0, f'{flag(k)} must be finite and > 0, got {getattr(cfg, k, 1)}')
    for k in ('batch_gpu', 'state', 'snap', 'workers', 'bench', 'fd_images'):
        need(not has(k) or getattr(cfg, k) >= 0, f'{flag(k)} must be >= 0, got {getattr(cfg, k, 0)}')
    need(not has('loss_batch') or cfg.loss_batch >= 1, f'--loss-batch must be >= 1, got {getattr(cfg, "loss_batch", 1)}')
    need(getattr(cfg, 'fd_images', 0) != 1, '--fd-images must be 0 or >= 2 (a covariance needs two images)')
    for k in ('seed', 'proj_seed'):
        need(not has(k) or 0 <= getattr(cfg, k) < 2**32, f'{flag(k)} must be in 0..2^32-1, got {getattr(cfg, k, 0)}')
    need(not has('freeze') or cfg.freeze in gdd.FREEZE_LEVELS, f'--freeze must be one of {sorted(gdd.FREEZE_LEVELS)}, got {getattr(cfg, "freeze", 0)}')
    need(not has('cres') or re.fullmatch(r'[1-9]\d*(,[1-9]\d*)*', cfg.cres), f'--cres must be comma-separated integers >= 1, got {getattr(cfg, "cres", "")!r}')
    if has('features'):
        names = cfg.features.split(',')
        known = ('teacher',) + backbones.BACKBONES
        need(all(n in known for n in names) and len(set(names)) == len(names),
             f'--features must be distinct names from {", ".join(known)}, got {cfg.features!r}')
        for item in cfg.backbone_weights:
            name, eq, source = item.partition('=')
            need(eq and source and name in names, f'--backbone-weights must be NAME=PATH_OR_URL with NAME in --features, got {item!r}')
        cfg.backbone_weights = [f'{name}={local(source)}' for name, _, source in (w.partition('=') for w in cfg.backbone_weights)]
    if has('resume'):
        need(not (cfg.resume and cfg.bench), '--resume and --bench exclude each other')
        wrong = [k for k in cfg.resume_override.replace('-', '_').split(',') if k.strip() and
                 (k.strip() not in RESUME_MUST_MATCH or k.strip() in RESUME_FIXED)]
        need(not wrong, f'--resume-override: {", ".join(wrong)} cannot be overridden; choose from '
                        f'{", ".join(k for k in RESUME_MUST_MATCH if k not in RESUME_FIXED)}')
    if cfg.device != 'auto':
        try:
            device = torch.device(cfg.device)
        except (RuntimeError, ValueError):
            device = None
        need(device is not None and device.type in ('cpu', 'cuda'), f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
        need(device.type != 'cuda' or torch.cuda.is_available(), 'CUDA is not available; use --device cpu')
        need(device.type != 'cuda' or device.index is None or device.index < torch.cuda.device_count(),
             f'--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    if has('data'):
        cfg.data = local(cfg.data) if cfg.data else ''
    if has('teacher'):
        cfg.teacher = local(cfg.teacher)


def _bool(s):
    if s.lower() in ('1', 'true', 'yes'):
        return True
    if s.lower() in ('0', 'false', 'no'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean, got {s!r}')


def arch_kwargs(cfg):
    return {**ARCHS[cfg.arch], 'channel_mult': [int(m) for m in cfg.cres.split(',')]}


def make_run_dir(cfg):
    os.makedirs(cfg.outdir, exist_ok=True)
    while True:
        ids = [int(m.group(1)) for m in (re.match(r'^(\d+)-', d) for d in os.listdir(cfg.outdir)) if m]
        run_dir = os.path.join(cfg.outdir, f'{max(ids, default=-1) + 1:05d}-{cfg.preset}')
        try:
            os.makedirs(run_dir)
            return run_dir
        except FileExistsError:     # another run started at the same moment and took this number
            pass


class Logger:
    """print() to the console and to run_dir/log.txt."""
    def __init__(self, path):
        self.file, self.stdout = open(path, 'a'), sys.stdout

    def write(self, text):
        self.stdout.write(text)
        self.file.write(text)
        self.file.flush()

    def flush(self):
        self.stdout.flush()

#----------------------------------------------------------------------------
# Data: the global stream of images is the concatenation of per-epoch random permutations (epoch e seeded with
# [seed, e]). Iteration s uses stream positions [s B, (s+1) B); rank r of W takes the r-th of W equal slices of
# that window and processes it as consecutive chunks of batch_gpu images. So which images an iteration sees
# depends only on --seed, --batch and the image counter, not on the number of processes or chunks, and
# resuming at image counter n restarts the stream exactly there.

class InfiniteSampler(torch.utils.data.Sampler):
    def __init__(self, size, batch, seed=0, rank=0, num_replicas=1, start=0):
        self.size, self.batch, self.seed, self.rank, self.num_replicas, self.start = size, batch, seed, rank, num_replicas, start

    def __iter__(self):
        per_rank, pos, epoch, order = self.batch // self.num_replicas, self.start, None, None
        while True:
            for i in range(pos + self.rank * per_rank, pos + (self.rank + 1) * per_rank):
                if i // self.size != epoch:
                    epoch = i // self.size
                    order = np.random.RandomState([self.seed, epoch]).permutation(self.size)
                yield int(order[i % self.size])
            pos += self.batch


def batches(dataset, batch, batch_gpu, seed, workers, device, rank=0, world=1, start=0):
    """Endless (images in [-1, 1], labels) chunks of batch_gpu for this rank, starting at global image `start`."""
    sampler = InfiniteSampler(len(dataset), batch, seed, rank, world, start)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_gpu, sampler=sampler, num_workers=workers,
                                         pin_memory=(device.type == 'cuda'))
    for images, labels in loader:   # non_blocking copies from pinned memory: no host synchronisation
        yield images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1, labels.to(device, non_blocking=True)


def open_dataset(cfg, use_labels=True, teacher=None):
    dataset = ImageDataset(cfg.data or toy_dataset(cfg.outdir), use_labels=use_labels, xflip=cfg.xflip)
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


def to_uint8(x):
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)     # export quantisation (recipe A.3)


def save_grid(images, path, cols=8):
    """uint8 [N, C, H, W] -> one PNG, written atomically."""
    n, c, h, w = images.shape
    rows = math.ceil(n / cols)
    grid = np.zeros([rows * h, cols * w, c], dtype=np.uint8)
    for i, x in enumerate(images.cpu().numpy()):
        grid[i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = x.transpose(1, 2, 0)
    image = PIL.Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    sample_min.atomic_write(path, lambda f: image.save(f, format='png'))

#----------------------------------------------------------------------------
# The toy teacher: EDM's training loss (EDM paper Eq. 2 and Table 1: ln sigma ~ N(P_mean, P_std^2),
# lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2), Adam, EMA with EDM's ramp (the same formula as gdd.ema_beta).

def stop_if_nonfinite(loss, seen, *modules):
    # The toy teacher and classifier loops check at each progress line; nothing is saved from a diverged run.
    if not torch.isfinite(loss) or nonfinite_parameters(*modules) > 0:
        raise SystemExit(f'error: training stopped at kimg {seen / 1000:.3f}: '
                         + ('the loss' if not torch.isfinite(loss) else 'the parameters') + ' became NaN/inf (lower --lr?)')


def train_teacher(cfg, run_dir, device):
    P_mean, P_std, sigma_data = -1.2, 1.2, 0.5
    torch.manual_seed(cfg.seed)
    dataset = open_dataset(cfg)
    net = edm_nets.EDMPrecond(img_resolution=dataset.resolution, img_channels=dataset.num_channels,
                              label_dim=dataset.label_dim, sigma_data=sigma_data, **arch_kwargs(cfg)).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    print(f'Teacher: EDMPrecond({cfg.arch}), {sum(p.numel() for p in net.parameters()):,} parameters')
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    data = batches(dataset, cfg.batch, cfg.batch, cfg.seed, cfg.workers, device)
    seen, tick_seen, tick_time, total, start = 0, 0, time.time(), cfg.kimg * 1000, time.time()
    while seen < total:
        y, c = next(data)
        sigma = (torch.randn([y.shape[0], 1, 1, 1], device=device) * P_std + P_mean).exp()
        weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        D_yn = net(y + torch.randn_like(y) * sigma, sigma, c)
        loss = (weight * (D_yn - y) ** 2).sum() / y.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g['lr'] = cfg.lr * min(seen / (TEACHER_LR_RAMPUP_KIMG * 1000), 1)
        gdd.sanitize_grads(net.parameters())
        opt.step()
        gdd.update_ema(ema, net, gdd.ema_beta(y.shape[0], seen, cfg.ema))
        seen += y.shape[0]
        if seen - tick_seen >= cfg.tick * 1000 or seen >= total:
            stop_if_nonfinite(loss, seen, net, ema)
            dt = time.time() - tick_time
            print(f'kimg {seen / 1000:8.1f}  sec/kimg {dt / (seen - tick_seen) * 1000:6.2f}  loss {loss.item():.4f}  '
                  f'time {time.time() - start:6.0f}s', flush=True)
            tick_seen, tick_time = seen, time.time()
    save_snapshot(ema, cfg, os.path.join(run_dir, f'network-snapshot-{seen // 1000:06d}.pt'))

#----------------------------------------------------------------------------
# The toy classifier (fid_min.ToyClassifier, the toy FID's detector): cross-entropy on the toy training set with
# light augmentation (random x/y flips and shifts of up to 2 pixels, all of which keep the class), Adam with a
# cosine learning-rate decay. Never shown noise or blur, so its features react to both.

def train_classifier(cfg, run_dir, device, shift=2):
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    print(f'Drawing the toy data ({TOY_IMAGES} training images, 1000 test images of the second draw)')
    images, labels = (torch.from_numpy(a) for a in draw_toy_images(TOY_IMAGES, TOY_SEED))
    test_images, test_labels = (torch.from_numpy(a) for a in draw_toy_images(1000, TOY_SEED + 1))
    net = fid_min.ToyClassifier(img_resolution=images.shape[2], img_channels=images.shape[1]).to(device).train()
    print(f'Classifier: ToyClassifier{tuple(net.init_kwargs.values())}, {sum(p.numel() for p in net.parameters()):,} parameters')
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    accuracy = lambda: (net.eval()(test_images.to(device)).argmax(1).cpu() == test_labels).float().mean().item()
    n, R = cfg.batch, images.shape[2]
    steps, start = math.ceil(cfg.kimg * 1000 / n), time.time()
    ar = torch.arange(R)
    for step in range(steps):
        idx = torch.randint(len(images), [n], generator=g)
        x = images[idx].to(torch.float32)
        flip = torch.rand([2, n, 1, 1, 1], generator=g) < 0.5
        x = torch.where(flip[0], x.flip(3), x)
        x = torch.where(flip[1], x.flip(2), x)
        dy, dx = torch.randint(2 * shift + 1, [2, n, 1, 1], generator=g)   # shift: crop of the edge-padded image
        x = F.pad(x, [shift] * 4, mode='replicate')[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[:, None, None],
                                                    (dy + ar[:, None])[:, None], (dx + ar[None, :])[:, None]]
        for group in opt.param_groups:
            group['lr'] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(net.train()(x.to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen = (step + 1) * n
        if seen // round(cfg.tick * 1000) != step * n // round(cfg.tick * 1000) or step == steps - 1:
            stop_if_nonfinite(loss, seen, net)
            with torch.no_grad():
                acc = accuracy()
            print(f'kimg {seen / 1000:8.1f}  loss {loss.item():.4f}  test accuracy {100 * acc:5.1f}%  '
                  f'time {time.time() - start:6.0f}s', flush=True)
    ckpt = {'format': fid_min.TOY_CLASSIFIER_FORMAT, 'init_kwargs': copy.deepcopy(net.init_kwargs),
            'state_dict': {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, 'config': vars(cfg)}
    for path in [os.path.join(run_dir, 'toy-classifier.pt')] + ([cfg.export] if cfg.export else []):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        edm_nets.atomic_save(ckpt, path)
        print(f'Saved {path}')

#----------------------------------------------------------------------------
# GDD training (gdd.py does the method; this is the loop around it).

def save_snapshot(net, cfg, path):
    edm_nets.atomic_save({'format': 'gdd-min', 'ema': edm_nets.net_to_dict(net), 'config': vars(cfg)}, path)
    if cfg.export:
        os.makedirs(os.path.dirname(cfg.export) or '.', exist_ok=True)
        edm_nets.atomic_save({'format': 'gdd-min', 'ema': edm_nets.net_to_dict(net), 'config': vars(cfg)}, cfg.export)
    print(f'Saved {path}' + (f' and {cfg.export}' if cfg.export else ''))


def load_teacher(cfg, device):
    teacher = edm_nets.load_network(cfg.teacher, device=device).requires_grad_(False)
    kwargs = teacher.init_kwargs
    wrong = [f'{k}={kwargs.get(k)!r} (preset: {v!r})' for k, v in arch_kwargs(cfg).items() if kwargs.get(k) != v]
    if type(teacher).__name__ != 'EDMPrecond' or wrong:
        raise SystemExit(f'error: {cfg.teacher} is not an EDMPrecond {cfg.arch} network: ' +
                         (', '.join(wrong) or type(teacher).__name__))
    return teacher


# Multi-process runs (torchrun, one process per GPU; gloo on CPU). There is no DistributedDataParallel wrapper:
# the G step backpropagates through D with D's parameters frozen (recipe E.9) and R1 needs double backward,
# neither of which DDP's reducer handles. Instead every optimizer step sums the gradients of exactly the
# parameters it updates over the ranks, in one flat all-reduce after all accumulation chunks (what DDP with
# no_sync would send, without the overlap with backward). Frozen parameters (GDD-I's 85%, the feature networks,
# the random projections) are never in it. Every rank builds identical networks from --seed and keeps them
# identical: same initial weights, same summed gradients, same optimizer arithmetic.

def sum_grads_over_ranks(params):
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def broadcast(obj, rank):
    """A picklable value from rank 0 to every rank (identity in a single process)."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def peak_memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource     # CPU: peak resident memory of the process (kB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

#----------------------------------------------------------------------------
# Training state for --resume: everything the next iteration depends on, as plain types and tensors
# (loadable with torch.load(weights_only=True)). Training draws randomness only from the data order (a function
# of --seed and the image counter) and the latent generator, whose state is saved. Written by rank 0 with
# edm_nets.atomic_save (temporary file, fsync, rename), named by iteration; the last 3 are kept. A file cut off
# by a kill is never a candidate (temporary files are hidden and unnamed like states), and a corrupt one is
# skipped in favour of the previous one. Multi-node runs need --outdir on a shared filesystem.
#
# Integrity: torch.load does not check the zip CRCs, so a flipped byte in tensor data would load silently. Each
# state gets a sidecar training-state-IIIIIIII.pt.sha256 (sha256sum's format, written atomically after the
# state) that is checked before torch.load. A state without one (written by an older version, or killed between
# the two renames) is accepted after the CRC-32 of every zip member checks out, with a note. A state that passes
# is then checked for structure (keys, types, the RNG state a uint8 tensor) and, once the networks exist, for
# names, shapes and dtypes of every tensor: a mismatch is a one-line error, never a silent cast.
# One process per run folder: rank 0 holds an exclusive flock on RUN_DIR/.lock (released by the kernel when the
# process ends, however it ends); with the lock held, temporary files a killed run left behind are removed.

STATE_FORMAT = 'gdd-min-training-state'
STATE_RE = re.compile(r'^training-state-(\d+)\.pt$')
STATE_KEEP = 3
STATE_KEYS = ('format', 'step', 'tick', 'seen', 'config', 'G', 'G_ema', 'D', 'opt_G', 'opt_D', 'latent_gen')
# Every option that changes what a run computes. Resume refuses a change unless --resume-override names it (then
# the log says so); those in RESUME_FIXED shape the networks and cannot be overridden. Not here: kimg (only the
# end point) and tick, snap, state, outdir, export, workers, device, fd_images, bench (when and where results are
# written, how the data is loaded). batch_gpu is compared as the effective value (0 = derived from the batch).
RESUME_MUST_MATCH = ('preset', 'arch', 'cres', 'freeze', 'features', 'dwidth', 'proj_seed', 'teacher_sigma', 'seed',
                     'batch', 'loss_batch', 'lr', 'dlr', 'r1_gamma', 'ema', 'batch_gpu', 'xflip', 'data', 'teacher',
                     'backbone_weights', 'fp16')
RESUME_FIXED = ('preset', 'arch', 'cres', 'freeze', 'features', 'dwidth')
# edm_nets.atomic_save's .NAME.tmpPID, sample_min.atomic_write's NAME.tmpPID (and NAME.tmpPID.png of older versions)
TEMP_RE = re.compile(r'\.tmp\d*(\.png)?$')
LOCK_NAME = '.lock'


def effective_batch_gpu(cfg, world):
    return cfg.batch_gpu or min(cfg.batch // world, cfg.loss_batch)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def save_training_state(run_dir, step, tick, seen, cfg, G, G_ema, D, opt_G, opt_D, latent_gen, batch_gpu):
    state = dict(format=STATE_FORMAT, step=step, tick=tick, seen=seen, config=vars(cfg), batch_gpu=batch_gpu,
                 G=G.state_dict(), G_ema=G_ema.state_dict(), D=D.heads.state_dict(),
                 opt_G=opt_G.state_dict(), opt_D=opt_D.state_dict(), latent_gen=latent_gen.get_state())
    path = os.path.join(run_dir, f'training-state-{step:08d}.pt')
    sidecar, tmp = path + '.sha256', os.path.join(run_dir, f'.{os.path.basename(path)}.sha256.tmp{os.getpid()}')
    try:
        edm_nets.atomic_save(state, path)
        with open(tmp, 'w') as f:
            f.write(f'{file_sha256(path)}  {os.path.basename(path)}\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, sidecar)
    except (OSError, RuntimeError) as e:    # disk full, folder gone: the earlier states stay as they were
        raise OSError(f'cannot write training state {path}: {getattr(e, "strerror", None) or e}') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for old in training_states(run_dir)[STATE_KEEP:]:
        os.remove(old)
        if os.path.exists(old + '.sha256'):
            os.remove(old + '.sha256')
    return path


def training_states(run_dir):
    """Paths of the training states in run_dir, newest first."""
    names = [n for n in os.listdir(run_dir) if STATE_RE.match(n)] if os.path.isdir(run_dir) else []
    return [os.path.join(run_dir, n) for n in sorted(names, reverse=True)]


def verify_training_state(path):
    """Check the bytes of a state before torch.load reads them: against its .sha256 file, else (no such file)
    the CRC-32 of every member of the zip archive torch.save wrote. Returns a note for the second case."""
    sidecar = path + '.sha256'
    if os.path.isfile(sidecar):
        with open(sidecar, 'rb') as f:
            words = f.read(1000).split()
        expected = words[0].decode('ascii', 'replace').lower() if words else ''
        if not re.fullmatch(r'[0-9a-f]{64}', expected):
            raise ValueError(f'{path}: {os.path.basename(sidecar)} holds no SHA-256')
        if file_sha256(path) != expected:
            raise ValueError(f'{path}: SHA-256 differs from {os.path.basename(sidecar)} (the file is corrupt)')
        return None
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            # torch.save stores members uncompressed; the size bound keeps overlapping members from multiplying the work
            if any(m.compress_type != zipfile.ZIP_STORED for m in members) or \
                    sum(m.file_size for m in members) > os.path.getsize(path):
                raise ValueError('not an archive written by torch.save')
            bad = z.testzip()
    except Exception as e:      # anything zipfile meets in a damaged archive
        raise ValueError(f'{path}: not a complete training state ({sample_min.error_line(e)})') from None
    if bad is not None:
        raise ValueError(f'{path}: CRC-32 mismatch in {bad} (the file is corrupt)')
    return f'note: {path} has no {os.path.basename(sidecar)} (older version?); its zip CRC-32s check out'


def read_training_state(path):
    """The state in `path` as plain data, or ValueError('<path>: <problem>'). Every state is read here."""
    try:
        note = verify_training_state(path)
    except OSError as e:        # unreadable (a folder of that name, no permission, ...)
        raise ValueError(f'{path}: {sample_min.error_line(e)}') from None
    state = edm_nets.load_torch_file(path)     # validated torch.load: bounded by what the file holds, one-line errors
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise ValueError(f'{path}: not a gdd-min training state')
    if note:
        print(note)
    return state


def check_training_state(state, path):
    """Structure of a state that read_training_state returned: keys and types (shapes: load_training_state)."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f'{path}: not a complete training state, missing {", ".join(missing)}')
    for k in ('step', 'tick', 'seen') + (('batch_gpu',) if 'batch_gpu' in state else ()):
        if type(state[k]) is not int or state[k] < 0:
            raise ValueError(f'{path}: {k} must be an integer >= 0, got {type(state[k]).__name__}')
    if not isinstance(state['config'], dict):
        raise ValueError(f'{path}: config must be a dict, got {type(state["config"]).__name__}')
    plain = lambda v: v is None or type(v) in (str, int, float, bool) or type(v) is list and all(type(x) is str for x in v)
    odd = [k for k in RESUME_MUST_MATCH if not plain(state['config'].get(k))]
    if odd:
        raise ValueError(f'{path}: config values of {", ".join(odd)} are not plain values')
    for k in ('G', 'G_ema', 'D'):
        if not isinstance(state[k], dict) or not all(isinstance(n, str) and isinstance(t, torch.Tensor) for n, t in state[k].items()):
            raise ValueError(f'{path}: {k} must be a state dict (names -> tensors)')
    for k in ('opt_G', 'opt_D'):
        sd = state[k]
        if not (isinstance(sd, dict) and isinstance(sd.get('state'), dict) and isinstance(sd.get('param_groups'), list)):
            raise ValueError(f'{path}: {k} must be an optimizer state dict (state, param_groups)')
    rng = state['latent_gen']
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.ndim != 1:
        got = f'{rng.dtype} tensor of shape {list(rng.shape)}' if isinstance(rng, torch.Tensor) else type(rng).__name__
        raise ValueError(f'{path}: latent_gen must be a torch.Generator state (1-D uint8 tensor), got {got}')


def _names(names, n=3):
    return ', '.join(names[:n]) + (f', ... ({len(names)} in all)' if len(names) > n else '')


def _check_tensors(sd, want, where):
    """sd holds exactly the names of `want`, each with its shape and dtype, and finite floating values."""
    missing, unexpected = [n for n in want if n not in sd], [n for n in sd if n not in want]
    if missing or unexpected:
        raise ValueError(f'{where}: ' + '; '.join([f'missing {_names(missing)}'] * bool(missing) +
                                                  [f'unexpected {_names(unexpected)}'] * bool(unexpected)))
    for n, t in sd.items():
        if not isinstance(t, torch.Tensor) or t.shape != want[n].shape or t.dtype != want[n].dtype:
            got = f'{t.dtype} {list(t.shape)}' if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f'{where}: {n} is {got}, this configuration has {want[n].dtype} {list(want[n].shape)}')
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f'{where}: {n} holds NaN or inf')


def _load_optimizer(opt, sd, where):
    """opt.load_state_dict after checking what torch does not: group options' types, every state tensor's shape."""
    groups, params = sd['param_groups'], [p for group in opt.param_groups for p in group['params']]
    if len(groups) != len(opt.param_groups) or not all(
            isinstance(g, dict) and isinstance(g.get('params'), list) and len(g['params']) == len(h['params'])
            for g, h in zip(groups, opt.param_groups)):
        raise ValueError(f'{where}: parameter groups differ from this configuration (other trained parameters?)')
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    for g, h in zip(groups, opt.param_groups):
        for k, v in h.items():
            if k == 'params' or k not in g:
                continue
            if number(v) and not number(g[k]) or isinstance(v, bool) and not isinstance(g[k], bool) or \
                    isinstance(v, tuple) and not (isinstance(g[k], tuple) and len(g[k]) == len(v) and all(map(number, g[k]))):
                raise ValueError(f'{where}: option {k} is {g[k]!r:.40}, expected a value like {v!r}')
    ids = [i for g in groups for i in g['params']]
    if not all(type(i) is int for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f'{where}: parameter ids must be distinct integers')
    by_id = dict(zip(ids, params))
    for i, entry in sd['state'].items():
        if i not in by_id or not isinstance(entry, dict):
            raise ValueError(f'{where}: state of unknown parameter {i!r:.40}')
        for name, t in entry.items():
            if not isinstance(t, torch.Tensor) or (t.ndim and t.shape != by_id[i].shape) or not t.is_floating_point():
                got = f'{t.dtype} {list(t.shape)}' if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f'{where}: {name} of parameter {i} is {got}, the parameter is {list(by_id[i].shape)}')
            if not torch.isfinite(t).all():
                raise ValueError(f'{where}: {name} of parameter {i} holds NaN or inf')
    lrs = [h['lr'] for h in opt.param_groups]
    opt.load_state_dict(sd)
    for h, lr in zip(opt.param_groups, lrs):    # this run's rates (equal unless --resume-override lr/dlr)
        h['lr'] = lr


def load_training_state(state, path, G, G_ema, D, opt_G, opt_D, latent_gen):
    """Copy a checked state into the freshly built networks, optimizers and latent generator; (step, tick, seen)."""
    for key, module in (('G', G), ('G_ema', G_ema), ('D', D.heads)):
        _check_tensors(state[key], module.state_dict(), f'{path}: {key}')
        module.load_state_dict(state[key])
    _load_optimizer(opt_G, state['opt_G'], f'{path}: opt_G')
    _load_optimizer(opt_D, state['opt_D'], f'{path}: opt_D')
    rng, want = state['latent_gen'], latent_gen.get_state()
    if rng.numel() != want.numel():
        raise ValueError(f'{path}: latent_gen holds {rng.numel()} bytes, a {latent_gen.device.type} generator '
                         f'{want.numel()} (a state saved on another device type cannot continue the same latents)')
    try:
        latent_gen.set_state(rng)
    except RuntimeError as e:
        raise ValueError(f'{path}: latent_gen is not a valid generator state ({sample_min.error_line(e)})') from None
    return state['step'], state['tick'], state['seen']


class RunLock:
    """Exclusive, non-blocking flock on RUN_DIR/.lock: one training process per run folder."""
    def __init__(self):
        self.file = self.folder = None

    def hold(self, folder):
        folder = os.path.abspath(folder)
        if folder == self.folder:
            return
        self.release()
        if fcntl is None:
            print(f'note: no file locking on this system; make sure no other process trains into {folder}')
            return
        f = open(os.path.join(folder, LOCK_NAME), 'a+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read(200).strip() or 'another process'
            f.close()
            raise SystemExit(f'error: run folder {folder} is in use by {owner}; wait for it to end or stop it') from None
        except OSError as e:        # a filesystem without flock (some network filesystems): go on, say so
            f.close()
            print(f'note: cannot lock {folder} ({e.strerror}); make sure no other process trains into it')
            return
        f.truncate(0)
        f.write(f'process {os.getpid()} on {socket.gethostname()}\n')
        f.flush()
        self.file, self.folder = f, folder

    def release(self):
        if self.file is not None:
            self.file.close()       # closing the file releases the lock
        self.file = self.folder = None


def remove_leftovers(run_dir):
    """Temporary files of a killed run, and checksums whose state is gone (called with the run's lock held)."""
    names = set(os.listdir(run_dir))
    junk = sorted(n for n in names if os.path.isfile(os.path.join(run_dir, n)) and
                  (TEMP_RE.search(n) or n.endswith('.pt.sha256') and n[:-len('.sha256')] not in names))
    for n in junk:
        os.remove(os.path.join(run_dir, n))
    if junk:
        print(f'note: removed {len(junk)} file(s) an interrupted run left in {run_dir}: {_names(junk)}')


def find_training_state(resume, outdir, preset, lock=None):
    """(path, state) of the newest intact training state of --resume, or (None, None) for 'auto' with none. A
    damaged state is skipped with a note (an explicit FILE is an error). With a RunLock, the folder of each
    candidate is locked before its states are listed and read."""
    if resume == 'auto':
        runs = sorted((d for d in (os.listdir(outdir) if os.path.isdir(outdir) else []) if re.match(rf'^\d+-{re.escape(preset)}$', d)), reverse=True)
        folders = [os.path.join(outdir, d) for d in runs]
    elif os.path.isdir(resume):
        folders = [resume]
    elif os.path.isfile(resume):
        if lock is not None:
            lock.hold(os.path.dirname(os.path.abspath(resume)))
        try:
            return resume, read_training_state(resume)
        except ValueError as e:
            raise SystemExit(f'error: --resume {resume}: no complete training state: {str(e).partition(": ")[2] or e}') from None
    else:
        raise SystemExit(f'error: --resume {resume}: no such file or folder')
    for folder in folders:
        if not training_states(folder):
            continue
        if lock is not None:
            lock.hold(folder)
        for path in training_states(folder):
            try:
                return path, read_training_state(path)
            except ValueError as e:     # cut off or corrupt: fall back to the previous state
                print(f'note: skipping {path}: {str(e).partition(": ")[2] or e}')
    if lock is not None:
        lock.release()
    if resume != 'auto':
        raise SystemExit(f'error: --resume {resume}: no complete training state found')
    return None, None


def resume_run_dir(path, state, cfg, world=1):
    """Check the state belongs to this configuration; drop stats.jsonl lines written after it."""
    saved = state['config']
    now = {k: getattr(cfg, k) for k in RESUME_MUST_MATCH if hasattr(cfg, k)}
    old = {k: saved.get(k) for k in now}
    if 'batch_gpu' in state:    # states of older versions hold only the option, 0 when derived
        now['batch_gpu'], old['batch_gpu'] = effective_batch_gpu(cfg, world), state['batch_gpu']
    changed = [k for k in now if old[k] != now[k]]
    override = [k.strip().replace('-', '_') for k in getattr(cfg, 'resume_override', '').split(',') if k.strip()]
    refused = [k for k in changed if k not in override]
    if refused:
        hint = '' if set(refused) & set(RESUME_FIXED) else f'; to continue anyway with the new values: --resume-override {",".join(refused)}'
        raise SystemExit(f'error: {path} was written with ' +
                         ', '.join(f'{k}={old[k]!r:.200} (now {now[k]!r:.200})' for k in refused) + hint)
    for k in changed:
        print(f'note: --resume-override {k}: {old[k]!r:.200} -> {now[k]!r:.200} from iteration {state["step"]} on')
    run_dir = os.path.dirname(os.path.abspath(path))
    stats_path = os.path.join(run_dir, 'stats.jsonl')
    if os.path.isfile(stats_path):
        keep = []
        for line in open(stats_path):
            try:
                if json.loads(line)['kimg'] <= state['seen'] / 1000:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass        # a line cut off by the kill
        sample_min.atomic_write(stats_path, lambda f: f.write(''.join(keep).encode()))
    return run_dir

#----------------------------------------------------------------------------
# GDD training (gdd.py does the method; this is the loop around it). --bench runs the same iterations on random
# data with a random-weight teacher of the preset's architecture and random-filled ImageNet backbones.

BENCH_GEOMETRY = {'cifar10': (32, 0), 'cifar10-cond': (32, 10), 'afhqv2': (64, 0), 'ffhq': (64, 0),
                  'imagenet64': (64, 1000), 'toy': (32, 10)}      # (resolution, label_dim) of each preset's data


def random_teacher(cfg):
    resolution, label_dim = BENCH_GEOMETRY[cfg.preset]
    return edm_nets.EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim, **arch_kwargs(cfg))


def build_training(cfg, device, rank, world):
    """Networks and optimizers, identical on every rank (construction draws from the torch RNG seeded with --seed)."""
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    teacher = random_teacher(cfg) if cfg.bench else load_teacher(cfg, 'cpu')
    if not cfg.bench and not cfg.data and world > 1:
        if rank == 0:
            toy_dataset(cfg.outdir)                 # drawn once, before the other ranks read it
        torch.distributed.barrier()
    dataset = None if cfg.bench else open_dataset(cfg, use_labels=teacher.label_dim > 0, teacher=teacher)
    G = gdd.generator_from_teacher(teacher, use_fp16=cfg.fp16).to(device).train()
    G_params, _, _ = gdd.freeze_generator(G, cfg.freeze, verbose=rank == 0)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    G_ema.use_fp16 = G_ema.init_kwargs['use_fp16'] = False     # recipe A.4: sampling and evaluation in fp32
    names = cfg.features.split(',')
    weights = {name: None for name in names} if cfg.bench else dict(item.split('=', 1) for item in cfg.backbone_weights)
    D = gdd.build_discriminator(names, teacher, label_dim=teacher.label_dim, width=cfg.dwidth,
                                cout=max(int(64 * cfg.dwidth), 8), proj_seed=cfg.proj_seed, backbone_weights=weights,
                                teacher_sigma=cfg.teacher_sigma).to(device).train()
    print(f'Discriminator: feature networks {cfg.features}, {sum(p.numel() for p in D.heads.parameters()):,} trainable parameters')
    opt_G, opt_D = gdd.make_optimizers(G_params, D, cfg.lr, cfg.dlr)
    return teacher if cfg.fd_images else None, dataset, G, G_ema, D, opt_G, opt_D


def train_gdd(cfg, run_dir, device, rank=0, world=1, state=None, state_path=None):
    batch_gpu = effective_batch_gpu(cfg, world)
    if batch_gpu < 1 or cfg.batch % (world * batch_gpu):
        raise SystemExit(f'error: --batch {cfg.batch} is not a multiple of {world} processes x --batch-gpu {batch_gpu}')
    if cfg.bench and cfg.preset not in BENCH_GEOMETRY:
        raise SystemExit(f'error: --bench needs one of the presets {", ".join(BENCH_GEOMETRY)}')
    torch.backends.cudnn.benchmark = True                      # recipe A.4: TF32 off, no reduced-precision fp16 sums
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    teacher, dataset, G, G_ema, D, opt_G, opt_D = build_training(cfg, device, rank, world)
    latent_gen = torch.Generator(device).manual_seed(cfg.seed)  # identical on every rank: each takes its rows
    step, tick, seen = 0, 0, 0
    if state is not None:
        if any('.parametrizations.' in k for k in state['D']):     # heads before gdd.SNConv2d (issue 12)
            raise SystemExit('error: this training state comes from an older gdd-min whose discriminator heads used '
                             'torch.nn.utils.parametrizations.spectral_norm; it cannot be resumed: start a new run')
        step, tick, seen = load_training_state(state, state_path, G, G_ema, D, opt_G, opt_D, latent_gen)
        print(f'Resumed at iteration {step}, {seen / 1000:.3f} kimg')
        del state

    # This rank's rows of the global batch, as num_chunks calls of batch_gpu images (gdd.py section 4).
    per_rank, num_chunks = cfg.batch // world, cfg.batch // (world * batch_gpu)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    shape = [cfg.batch, G.img_channels, G.img_resolution, G.img_resolution]
    reduce = sum_grads_over_ranks if world > 1 else None
    print(f'Batch {cfg.batch} = {world} processes x {num_chunks} chunks x {batch_gpu} images, losses reduced over '
          f'{cfg.loss_batch} images; device {device}' + (', generator U-Net in bfloat16' if cfg.fp16 and device.type == 'cuda' else ''))

    def iteration(chunks, step, seen):
        z_G = torch.randn(shape, generator=latent_gen, device=device)[rows].split(batch_gpu)
        z_D = torch.randn(shape, generator=latent_gen, device=device)[rows].split(batch_gpu)
        chunks = [(x, c, zg, zd) for (x, c), zg, zd in zip(chunks, z_G, z_D)]
        stats = gdd.train_step(G, D, opt_G, opt_D, chunks, step, cfg.r1_gamma, loss_scale=cfg.loss_batch / cfg.batch,
                               r1_scale=1 / cfg.batch, reduce_grads=reduce)
        gdd.update_ema(G_ema, G, gdd.ema_beta(cfg.batch, seen, cfg.ema))
        return stats

    if cfg.bench:
        return bench(cfg, iteration, G, device, world, num_chunks, batch_gpu)

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
            values = torch.cat([values, torch.stack([sums['nonfinite'] / counts['nonfinite'], nonfinite_parameters(G, G_ema, D.heads)])])
            mem = torch.tensor([peak_memory_gb(device)], device=device)
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
                print(f'kimg {line["kimg"]:8.1f}  sec/kimg {line["sec_per_kimg"]:6.2f}  img/s {line["images_per_s"]:7.1f}  '
                      f'loss G {line["loss_G"]:.3f} D {line["loss_D"]:.3f}  logits real {line["logits_real"]:+.3f} '
                      f'fake {line["logits_fake"]:+.3f}  R1 {"-" if line["r1"] != line["r1"] else format(line["r1"], ".4g")}  mem {line["peak_mem_gb"]:.2f}GB  '
                      f'time {line["time"]:6.0f}s', flush=True)
                with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as f:     # NaN (no R1 step in the tick) -> null
                    f.write(json.dumps({k: None if v != v else v for k, v in line.items()}) + '\n')
            bad_losses, bad_params = values[-2:].tolist()     # the same on every rank (all-reduced)
            if bad_params > 0 or bad_losses >= 1:         # nothing of this tick is written: the last state stays good
                raise SystemExit(f'error: training stopped at tick {tick} (kimg {seen / 1000:.3f}, iteration {step}): '
                                 + ('parameters became NaN/inf' if bad_params > 0 else 'the losses were NaN/inf in every iteration of the tick')
                                 + (f'; the last good training state is {last_state}' if last_state else '; no training state was written')
                                 + ' (lower --lr/--dlr?)')
            if bad_losses > 0:
                print(f'warning: non-finite losses in {bad_losses:.0%} of the iterations of tick {tick}')
            if rank == 0:
                if done or (cfg.snap and tick % cfg.snap == 0):
                    with torch.no_grad():
                        save_grid(to_uint8(gdd.generate(G_ema, z_grid, c_grid)), os.path.join(run_dir, f'samples-{seen // 1000:06d}.png'))
                    save_snapshot(G_ema, cfg, os.path.join(run_dir, f'network-snapshot-{seen // 1000:06d}.pt'))
                if done or (cfg.state and tick % cfg.state == 0):
                    last_state = save_training_state(run_dir, step, tick, seen, cfg, G, G_ema, D, opt_G, opt_D, latent_gen, batch_gpu)
    print(f'Training done: {step} iterations, {seen / 1000:.1f} kimg in {time.time() - start:.0f}s')
    if cfg.fd_images and rank == 0:
        evaluate_small(G_ema, teacher.to(device), dataset, cfg, run_dir, device)


def nonfinite_parameters(*modules):
    """1.0 when any parameter of the modules holds NaN or inf, else 0.0 (a tensor: no host synchronisation)."""
    return torch.stack([~torch.isfinite(p).all() for m in modules for p in m.parameters()]).any().float()


def bench(cfg, iteration, G, device, world, num_chunks, batch_gpu):
    """cfg.bench iterations on one fixed random batch; the first is a warm-up unless it is the only one."""
    g = torch.Generator(device).manual_seed(cfg.seed)
    R, L = G.img_resolution, G.label_dim
    chunks = [(torch.rand([batch_gpu, G.img_channels, R, R], generator=g, device=device) * 2 - 1,
               torch.eye(L, device=device)[torch.randint(L, [batch_gpu], generator=g, device=device)] if L else
               torch.zeros([batch_gpu, 0], device=device)) for _ in range(num_chunks)]
    sync = lambda: torch.cuda.synchronize(device) if device.type == 'cuda' else None
    for step in range(cfg.bench):
        if step == min(1, cfg.bench - 1):
            sync()
            t0, timed = time.time(), cfg.bench - step
        iteration(chunks, step + 1, step * cfg.batch)      # iteration indices 1.. (R1 at 16, 32, ...)
    sync()
    dt = time.time() - t0
    mem = torch.tensor([peak_memory_gb(device)], device=device)
    if world > 1:
        torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
    result = dict(preset=cfg.preset, freeze=cfg.freeze, features=cfg.features, batch=cfg.batch, batch_gpu=batch_gpu,
                  processes=world, device=str(device), iterations=timed, images_per_s=timed * cfg.batch / dt,
                  sec_per_iteration=dt / timed, peak_mem_gb=mem.item())
    print(f'bench {cfg.preset} freeze={cfg.freeze} features={cfg.features} batch {cfg.batch} ({world} x {num_chunks} x '
          f'{batch_gpu}) on {device}: {result["images_per_s"]:.2f} images/s, {result["sec_per_iteration"]:.3f} s/iteration, '
          f'peak memory {result["peak_mem_gb"]:.2f} GB ({timed} timed iterations)', flush=True)
    print('BENCH ' + json.dumps(result))
    return result

#----------------------------------------------------------------------------
# Small-scale evaluation (the toy demo), the same seeds and classes for every sampler: teacher 1 step =
# D(80 z; 80, c), teacher Heun 18 steps (35 evaluations, EDM sampler), GDD 1 step, and as the floor an
# independent second draw of the data. Three metrics, each against the training images:
#   toy_fid   Frechet distance of the toy classifier's penultimate features (fid_min.ToyClassifier, full 32x32:
#             FID with a toy detector in Inception's place; it sees texture, speckle and blur)
#   accuracy  the classifier's argmax vs the class the sample was asked for (the floor: vs the true class)
#   fd_8x8    Frechet distance of the images average-pooled to 8x8 (192 numbers: coarse layout, blind to texture)
# and, not a distance but what the eye sees in a zoomed crop, speckle: the pixel noise of each image,
#   speckle   mean over images of median_pixels |x - box3(x)| in uint8 levels (3x3 box blur, edges replicated).
#             The median skips the few pixels on a shape's edge, so it measures the noise on the smooth parts.

def pixels8(images_uint8):
    x = images_uint8.to(torch.float32) / 127.5 - 1
    return F.adaptive_avg_pool2d(x, 8).flatten(1).cpu().numpy().astype(np.float64)


def speckle(images_uint8):
    x = images_uint8.to(torch.float32)
    residual = x - F.avg_pool2d(F.pad(x, [1] * 4, mode='replicate'), 3, 1)
    return residual.abs().flatten(1).median(1).values.mean().item()


@torch.no_grad()
def _detect(classifier, images, device, batch=500, features=True):
    return torch.cat([classifier(images[i:i + batch].to(device), return_features=features).cpu()
                      for i in range(0, len(images), batch)]).to(torch.float64)


def small_reference(reals, classifier=None, device='cpu'):
    """Reference statistics of uint8 real images [N, C, H, W]: {'fd_8x8': (mu, sigma), 'toy_fid': (mu, sigma)}."""
    ref = {'fd_8x8': fid_min.feature_stats(pixels8(reals))}
    if classifier is not None:
        ref['toy_fid'] = fid_min.feature_stats(_detect(classifier, reals, device))
    return ref


def small_metrics(images, classes, ref, classifier=None, device='cpu'):
    """{'toy_fid', 'accuracy', 'fd_8x8', 'speckle'} of uint8 images [N, C, H, W] that were asked to show classes
    [N] (None: unconditional, accuracy None); without a classifier only fd_8x8 and speckle."""
    out = {'fd_8x8': fid_min.frechet_distance(*ref['fd_8x8'], *fid_min.feature_stats(pixels8(images))),
           'speckle': speckle(images)}
    if classifier is not None:
        out['toy_fid'] = fid_min.frechet_distance(*ref['toy_fid'], *fid_min.feature_stats(_detect(classifier, images, device)))
        predicted = _detect(classifier, images, device, features=False).argmax(1)
        out['accuracy'] = None if classes is None else (predicted == torch.as_tensor(classes)).double().mean().item()
    return out


# key -> (column header, cell format) of the printed table; the same keys, in this order, in metrics.json.
METRIC_COLUMNS = {'toy_fid': ('toy FID', '{:8.3f}'), 'accuracy': ('accuracy', '{:7.1%}'),
                  'fd_8x8': ('FD 8x8', '{:8.3f}'), 'speckle': ('speckle', '{:8.2f}')}

def _metric_line(name, m):
    cells = [('n/a' if m.get(k, 0) is None else fmt.format(m[k])).rjust(8) if k in m else '       -'
             for k, (_, fmt) in METRIC_COLUMNS.items()]
    return f'  {name:15s} ' + '  '.join(cells)


@torch.no_grad()
def evaluate_small(G, teacher, dataset, cfg, run_dir, device, batch=250):
    n, t0 = cfg.fd_images, time.time()
    classifier = fid_min.load_detector(cfg.classifier, device) if cfg.classifier else None
    count = len(dataset) if not dataset.xflip else len(dataset) // 2
    reals = torch.from_numpy(np.stack([dataset[i][0] for i in range(count)]))
    ref = small_reference(reals, classifier, device)
    if cfg.data:
        pick = np.random.RandomState(1).permutation(count)[:n]
        floor_images = reals[pick]
        floor_classes = np.stack([dataset[i][1] for i in pick]).argmax(1) if dataset.has_labels else None
    else:
        floor_images, floor_classes = (torch.from_numpy(a) for a in draw_toy_images(n, TOY_SEED + 1))
    g = torch.Generator().manual_seed(1000)
    z = torch.randn([n, G.img_channels, G.img_resolution, G.img_resolution], generator=g)
    c = torch.eye(G.label_dim)[torch.randint(G.label_dim, [n], generator=g)] if G.label_dim else None
    sigma = lambda m: torch.full([m], gdd.SIGMA_MAX, device=device)
    samplers = {
        'teacher_1step': lambda z, c: teacher(gdd.SIGMA_MAX * z, sigma(len(z)), c),
        'teacher_heun35': lambda z, c: edm_nets.edm_sampler(teacher, z, c, num_steps=18),
        'gdd_1step': lambda z, c: gdd.generate(G, z, c),
    }
    print(f'Evaluation, {n} images against {count} training images:')
    print(f'  {"":15s} ' + '  '.join(header.rjust(8) for header, _ in METRIC_COLUMNS.values()))
    images, metrics = {}, {}
    for name, sample in samplers.items():
        parts = []
        for i in range(0, n, batch):
            zi, ci = z[i:i + batch].to(device), (None if c is None else c[i:i + batch].to(device))
            parts.append(to_uint8(sample(zi, ci).to(torch.float32)).cpu())
        images[name] = torch.cat(parts)
        metrics[name] = small_metrics(images[name], None if c is None else c.argmax(1), ref, classifier, device)
        print(_metric_line(name, metrics[name]) + f'  ({time.time() - t0:.0f}s)', flush=True)
    images['data_floor'] = floor_images
    metrics['data_floor'] = small_metrics(floor_images, floor_classes, ref, classifier, device)
    print(_metric_line('data_floor', metrics['data_floor']))
    result = {k: {name: m[k] for name, m in metrics.items()} for k in METRIC_COLUMNS if k in metrics['data_floor']}
    result.update(num_images=n, reference=f'{dataset.name} ({count} images)', classifier=cfg.classifier or None)
    if classifier is not None:       # the toy demo's targets (issue 11)
        fid, acc = result['toy_fid'], result['accuracy']
        result['targets'] = dict(
            gdd_toy_fid_le_quarter_teacher_1step=fid['gdd_1step'] <= fid['teacher_1step'] / 4,
            gdd_toy_fid_le_teacher_heun35=fid['gdd_1step'] <= fid['teacher_heun35'],
            gdd_accuracy_ge_teacher_heun35_minus_5_points=None if acc['gdd_1step'] is None else acc['gdd_1step'] >= acc['teacher_heun35'] - 0.05,
            gdd_speckle_le_teacher_heun35=result['speckle']['gdd_1step'] <= result['speckle']['teacher_heun35'])
    sample_min.atomic_write(os.path.join(run_dir, 'metrics.json'), lambda f: f.write(json.dumps(result, indent=2).encode()))
    save_comparison({k: x[:20] for k, x in images.items()}, metrics, os.path.join(run_dir, 'compare.png'))


def save_comparison(images, metrics, path, cols=5, scale=2, num_zoom=2, gap=8):
    """One column per sampler (and the data), the same 20 seeds in each: a 5x4 grid at 2x and, below it, the first
    num_zoom seeds enlarged (nearest neighbour, 5x for the defaults) so that texture shows pixel by pixel; each
    captioned with its metrics."""
    titles = {'teacher_1step': 'teacher, 1 step', 'teacher_heun35': 'teacher, Heun 18 steps (35 evals)',
              'gdd_1step': 'GDD-I, 1 step', 'data_floor': 'data (second draw)'}
    enlarge = lambda a, k: np.asarray(PIL.Image.fromarray(a).resize((a.shape[1] * k, a.shape[0] * k), PIL.Image.NEAREST))
    columns = []
    for name, x in images.items():
        n, c, h, w = x.shape
        grid = enlarge(x.reshape(n // cols, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(n // cols * h, cols * w, c).numpy(), scale)
        zoom = enlarge(np.concatenate(list(x[:num_zoom].permute(0, 2, 3, 1).numpy()), axis=1), cols * scale // num_zoom)
        m = metrics[name]
        line = '  '.join(f'{label} {"n/a" if m[k] is None else fmt.format(m[k])}' for k, label, fmt in
                         (('toy_fid', 'toy FID', '{:.2f}'), ('accuracy', 'acc', '{:.0%}'), ('fd_8x8', 'FD8x8', '{:.2f}'), ('speckle', 'speckle', '{:.1f}')) if k in m)
        caption = PIL.Image.new('RGB', (grid.shape[1], 30), (255, 255, 255))
        PIL.ImageDraw.Draw(caption).text((2, 2), f'{titles[name]}\n{line}', fill=(0, 0, 0), spacing=2)
        white = np.full([gap // 2, grid.shape[1], 3], 255, np.uint8)
        columns += [np.concatenate([np.asarray(caption), grid, white, zoom], axis=0), np.full([zoom.shape[0] + grid.shape[0] + 30 + gap // 2, gap, 3], 255, np.uint8)]
    sample_min.atomic_write(path, lambda f: PIL.Image.fromarray(np.concatenate(columns[:-1], axis=1)).save(f, format='png'))

#----------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_args(argv)
    if cfg.preset in OWN_OPTIONS:
        cfg.bench, cfg.resume = 0, ''
    stdout, lock = sys.stdout, RunLock()
    try:
        with cli_errors():
            if not cfg.bench:           # unwritable outputs fail now, not after the training they would hold
                sample_min.check_output(cfg.outdir, '--outdir', folder=True)
                if cfg.export:
                    sample_min.check_output(cfg.export, '--export')
            rank, world, device = init_distributed(cfg.device)
            # Rank 0 picks the state and the run folder and holds the folder's lock for the whole run.
            path, state = find_training_state(cfg.resume, cfg.outdir, cfg.preset, lock) if cfg.resume and rank == 0 else (None, None)
            path = broadcast(path, rank)
            run_dir = None
            if rank == 0 and not cfg.bench:
                run_dir = os.path.dirname(os.path.abspath(path)) if path else make_run_dir(cfg)
                lock.hold(run_dir)
            run_dir = broadcast(run_dir, rank)
            if rank == 0 and run_dir:
                sys.stdout = Logger(os.path.join(run_dir, 'log.txt'))
                remove_leftovers(run_dir)
            elif rank > 0:
                sys.stdout = open(os.devnull, 'w')      # rank 0 reports for everyone; errors still go to stderr
            print(f'Preset {cfg.preset}, run directory {run_dir}, device {device}, {world} process(es)'
                  + (f', resuming from {path}' if path else ''))
            print('Options: ' + json.dumps(vars(cfg)))
            if path:
                state = state if rank == 0 else read_training_state(path)
                check_training_state(state, path)
                if rank == 0:
                    resume_run_dir(path, state, cfg, world)
            if cfg.preset == 'toy-teacher':
                train_teacher(cfg, run_dir, device)
            elif cfg.preset == 'toy-classifier':
                train_classifier(cfg, run_dir, device)
            else:
                result = train_gdd(cfg, run_dir, device, rank, world, state, path)
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()     # every rank done with its collectives before the group goes away
                return result
    except SystemExit as e:
        if isinstance(sys.stdout, Logger) and isinstance(e.code, str):
            sys.stdout.file.write(e.code + '\n')        # the reason a run stopped, in its log too
        raise
    finally:
        if sys.stdout is not stdout:
            sys.stdout.flush()
            if isinstance(sys.stdout, Logger):
                sys.stdout.file.close()
            sys.stdout = stdout
        lock.release()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

if __name__ == '__main__':
    main()
