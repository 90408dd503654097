"""The toy world of the offline demo (`python train_min.py toy`): a 10-class dataset of shapes drawn with pillow,
the toy teacher (EDM's training loss) and the toy classifier (the toy FID's detector), the small-scale metrics
and the comparison picture. Infrastructure of the demo, not the method: a reader of the paper may skip it.

    python toy.py teacher        # re-make assets/toy-teacher.pt with EDM's training loss (about 20 minutes)
    python toy.py classifier     # re-make assets/toy-classifier.pt, the toy FID's detector (about 75 s)
    python toy.py teacher --help # every option and its default
"""

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F

import cli
import dataset_min
import edm_nets
import fid_min
import gdd
import safe_files

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')   # the shipped toy files, from any cwd
# The toy teacher's architecture: a 0.3M-parameter class-conditional DDPM++ (EDM's SongUNet), 32x32.
ARCH = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
            channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, num_blocks=1, attn_resolutions=[8], dropout=0)
CHANNEL_MULT = [1, 2, 2]

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
    """The toy training set as an EDM-format zip in outdir (deterministic, so drawn once and shared by later runs)."""
    path = os.path.join(outdir, 'toy-32x32.zip')
    if not os.path.isfile(path):
        print(f'Drawing the toy dataset ({TOY_IMAGES} images) into {path}')
        dataset_min.save_dataset(path, *draw_toy_images(TOY_IMAGES, TOY_SEED))
    return path

#----------------------------------------------------------------------------
# The toy teacher: EDM's training loss (EDM Eq. 2 weighted by lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, and
# ln sigma ~ N(P_mean, P_std^2), EDM Table 1), Adam, EMA with EDM's ramp (the same formula as gdd.ema_beta).

TEACHER_LR_RAMPUP_KIMG = 10     # linear lr warm-up (EDM uses 10 Mimg at batch 512)

def stop_if_nonfinite(loss, seen, *modules):
    # The toy teacher and classifier loops check at each progress line; nothing is saved from a diverged run.
    if not torch.isfinite(loss) or cli.nonfinite_parameters(*modules) > 0:
        raise SystemExit(f'error: training stopped at kimg {seen / 1000:.3f}: '
                         + ('the loss' if not torch.isfinite(loss) else 'the parameters') + ' became NaN/inf (lower --lr?)')


def train_teacher(cfg, run_dir, device):
    P_mean, P_std, sigma_data = -1.2, 1.2, 0.5
    torch.manual_seed(cfg.seed)
    dataset = dataset_min.ImageDataset(cfg.data or toy_dataset(cfg.outdir))
    print(f'Dataset {dataset.name}: {len(dataset)} images, {dataset.resolution}x{dataset.resolution}, label_dim {dataset.label_dim}')
    net = edm_nets.EDMPrecond(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim,
                              sigma_data=sigma_data, **ARCH, channel_mult=CHANNEL_MULT).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    print(f'Teacher: EDMPrecond (toy DDPM++), {sum(p.numel() for p in net.parameters()):,} parameters')
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    data = iter(torch.utils.data.DataLoader(dataset, batch_size=cfg.batch,
                                            sampler=dataset_min.InfiniteSampler(len(dataset), cfg.batch, cfg.seed)))
    seen, tick_seen, tick_time, total, start = 0, 0, time.time(), cfg.kimg * 1000, time.time()
    while seen < total:
        y, c = next(data)
        y, c = y.to(device).to(torch.float32) / 127.5 - 1, c.to(device)
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
    safe_files.save_checkpoint(ema, cfg, os.path.join(run_dir, f'network-snapshot-{seen // 1000:06d}.pt'))

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
    d = safe_files.net_to_dict(net)
    ckpt = {'format': fid_min.TOY_CLASSIFIER_FORMAT, 'init_kwargs': d['init_kwargs'], 'state_dict': d['state_dict'], 'config': vars(cfg)}
    path = os.path.join(run_dir, 'toy-classifier.pt')
    safe_files.save_torch(ckpt, path, cfg.export)
    print('\n'.join(f'Saved {p}' for p in [path] + ([cfg.export] if cfg.export else [])))


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
def evaluate_small(G, teacher, dataset, run_dir, device, n, classifier_path='', toy_floor=True, batch=250):
    """The demo's table and picture: n images of each sampler against the training images of `dataset` (the
    floor: a second draw of the toy data when toy_floor, else n other training images)."""
    t0 = time.time()
    classifier = fid_min.load_detector(classifier_path, device) if classifier_path else None
    count = len(dataset) if not dataset.xflip else len(dataset) // 2
    reals = torch.from_numpy(np.stack([dataset[i][0] for i in range(count)]))
    ref = small_reference(reals, classifier, device)
    if not toy_floor:
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
            parts.append(cli.quantize(sample(zi, ci).to(torch.float32)).cpu())
        images[name] = torch.cat(parts)
        metrics[name] = small_metrics(images[name], None if c is None else c.argmax(1), ref, classifier, device)
        print(_metric_line(name, metrics[name]) + f'  ({time.time() - t0:.0f}s)', flush=True)
    images['data_floor'] = floor_images
    metrics['data_floor'] = small_metrics(floor_images, floor_classes, ref, classifier, device)
    print(_metric_line('data_floor', metrics['data_floor']))
    result = {k: {name: m[k] for name, m in metrics.items()} for k in METRIC_COLUMNS if k in metrics['data_floor']}
    result.update(num_images=n, reference=f'{dataset.name} ({count} images)', classifier=classifier_path or None)
    if classifier is not None:       # the toy demo's targets (README)
        fid, acc = result['toy_fid'], result['accuracy']
        result['targets'] = dict(
            gdd_toy_fid_le_quarter_teacher_1step=fid['gdd_1step'] <= fid['teacher_1step'] / 4,
            gdd_toy_fid_le_teacher_heun35=fid['gdd_1step'] <= fid['teacher_heun35'],
            gdd_accuracy_ge_teacher_heun35_minus_5_points=None if acc['gdd_1step'] is None else acc['gdd_1step'] >= acc['teacher_heun35'] - 0.05,
            gdd_speckle_le_teacher_heun35=result['speckle']['gdd_1step'] <= result['speckle']['teacher_heun35'])
    cli.atomic_write(os.path.join(run_dir, 'metrics.json'), lambda f: f.write(json.dumps(result, indent=2).encode()))
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
    cli.save_png(np.concatenate(columns[:-1], axis=1).transpose(2, 0, 1), path)


#----------------------------------------------------------------------------
# Command line: `python toy.py teacher|classifier [--option value ...]`.

COMMANDS = {    # defaults of each command; every one is an option
    'teacher': dict(batch=64, lr=1e-3, ema=0.02, kimg=150.0, tick=5.0, export=os.path.join(ASSETS, 'toy-teacher.pt'), data=''),
    'classifier': dict(batch=128, lr=2e-3, kimg=40.0, tick=8.0, export=os.path.join(ASSETS, 'toy-classifier.pt')),
}
HELP = dict(batch='batch size', lr='learning rate (Adam)', ema='EMA half-life in Mimg (capped by the 5%% ramp)',
            kimg='training duration in thousands of images', tick='kimg between progress lines',
            export='also save the result here', data="dataset zip/folder (EDM format); '' = draw the toy dataset")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    for name, values in COMMANDS.items():
        q = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           help='train the toy teacher' if name == 'teacher' else "train the toy FID's classifier")
        for key, default in values.items():
            q.add_argument('--' + key, type=type(default), default=default, metavar=key.upper(), help=HELP[key])
        q.add_argument('--seed', type=int, default=42, help='random seed')
        q.add_argument('--outdir', default='runs', help='parent folder of the run folders')
        q.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', ...")
    cfg = p.parse_args(argv)
    bad = [f'--{k} must be {what}, got {getattr(cfg, k)}' for k, ok, what in (
        ('batch', cfg.batch >= 1, '>= 1'), ('kimg', math.isfinite(cfg.kimg) and cfg.kimg > 0, 'finite and > 0'),
        ('tick', math.isfinite(cfg.tick) and cfg.tick > 0, 'finite and > 0'), ('lr', math.isfinite(cfg.lr) and cfg.lr >= 0, 'finite and >= 0'),
        ('ema', math.isfinite(getattr(cfg, 'ema', 0)) and getattr(cfg, 'ema', 0) >= 0, 'finite and >= 0'),
        ('seed', 0 <= cfg.seed < 2**32, 'in 0..2^32-1')) if not ok]
    if bad or cli.device_problem(cfg.device):
        raise SystemExit(f'error: {bad[0] if bad else cli.device_problem(cfg.device)}')
    with cli.RunLog() as log, cli.cli_errors():     # Ctrl-C / SIGTERM: one line, exit status 130 / 143
        cli.check_output(cfg.outdir, '--outdir', folder=True)
        if cfg.export:
            cli.check_output(cfg.export, '--export')
        _, _, device = cli.init_distributed(cfg.device)
        run_dir = cli.make_run_dir(cfg.outdir, f'toy-{cfg.cmd}')
        log.start(run_dir, made=True)
        print(f'toy.py {cfg.cmd}, run directory {run_dir}, device {device}\nOptions: {json.dumps(vars(cfg))}')
        (train_teacher if cfg.cmd == 'teacher' else train_classifier)(cfg, run_dir, device)


if __name__ == '__main__':
    main()
