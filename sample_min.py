"""Sample images from a one-step GDD generator (one network evaluation) or from an EDM teacher (EDM sampler).

    python sample_min.py                                       # toy generator of `python train_min.py toy` -> grid
    python sample_min.py --net ckpt.pt --seeds 0-49999 --outdir out     # PNGs in EDM's layout (folders of 1000)
    python sample_min.py --net edm-cifar10-32x32-cond-ve.pkl --steps 18 --grid teacher.png
    python sample_min.py --net cifar_uncond_d2o_f.pkl --check  # validate a file, report what it holds; no images
    torchrun --nproc_per_node=8 sample_min.py --net URL --seeds 0-49999 --npz samples.npz

--net takes a project checkpoint, an official GDD/D2O release pickle (class D2OPrecond) or an EDM teacher pickle,
by path or URL; safe_files.load_network reads all three without executing code from the file.
"""

import argparse
import math
import os
import time

import numpy as np
import torch

import cli
import edm_nets
import gdd
import safe_files
from cli import check_output, cli_errors, parse_seeds

# The toy generator that `python train_min.py toy --export assets/toy-gdd.pt` made, shipped with the repository
# (found next to this file, whatever the working directory).
DEFAULT_NET = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'toy-gdd.pt')
MAX_STEPS = 1000     # --steps bound: EDM's sampler allocates its noise levels up front

#----------------------------------------------------------------------------
# Per-image randomness exactly as EDM's generate.py: one torch.Generator per seed, seeded with seed % 2^32,
# created on the sampling device. Image i's latents are its generator's first randn([C, H, W]); for
# conditional nets its class is the next randint(label_dim) (official generate.py:223-229 likewise); the
# stochastic sampler's noise continues from the same generator. An image depends only on its seed, not the batch.

class SeededRandom:
    def __init__(self, seeds, device):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, shape, device):
        return torch.stack([torch.randn(shape, generator=g, device=device) for g in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape[1:], x.device).to(x.dtype)

    def randint(self, high, device):
        return torch.stack([torch.randint(high, [], generator=g, device=device) for g in self.generators])


class NFECounter:
    """Counts a teacher's forward calls: one per batch and sampler evaluation (EDM's NFE per image)."""
    def __init__(self, net):
        self.calls = 0
        net.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1


def generate_images(net, seeds, batch=64, class_idx=None, steps=18, device='cpu', with_classes=False):
    """Yield (seeds, uint8 images [B, C, H, W] on `device`) for `seeds` in order, `batch` at a time; with_classes:
    (seeds, images, class index [B] of each image, None for an unconditional network).
    A GDD generator (gdd.GDDPrecond) is run once, x = G(80 z; 80, c); any other network is a teacher sampled
    with EDM's Heun sampler in `steps` steps (2 steps - 1 evaluations, EDM Algorithm 1)."""
    one_step = isinstance(net, gdd.GDDPrecond)
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        raise ValueError(f'--class {class_idx} is out of range for a network with label_dim={net.label_dim}')
    for i in range(0, len(seeds), batch):
        batch_seeds = seeds[i:i + batch]
        rnd = SeededRandom(batch_seeds, device)
        latents = rnd.randn([net.img_channels, net.img_resolution, net.img_resolution], device)
        class_labels = None
        if net.label_dim:
            # The class is drawn even when --class overrides it, so the generator state matches EDM's.
            class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, device)]
            if class_idx is not None:
                class_labels = torch.eye(net.label_dim, device=device)[[class_idx] * len(batch_seeds)]
        with torch.no_grad():
            if one_step:
                images = gdd.generate(net, latents, class_labels)
            else:
                images = edm_nets.edm_sampler(net, latents, class_labels, num_steps=steps, randn_like=rnd.randn_like)
        if with_classes:
            yield batch_seeds, cli.quantize(images), None if class_labels is None else class_labels.argmax(1)
        else:
            yield batch_seeds, cli.quantize(images)

#----------------------------------------------------------------------------
# Command line.

def load_generator(source, device='cpu'):
    """A network to sample from, in fp32 and eval mode: a gdd-min checkpoint, an official GDD / D2O release pickle
    (rebuilt as gdd.GDDPrecond) or an EDM teacher pickle (its EDM wrapper; tell them apart with isinstance(net,
    gdd.GDDPrecond)), read and validated by safe_files.load_network (nothing in the file is executed)."""
    return gdd.fp32(safe_files.load_network(source, classes={'GDDPrecond': gdd.GDDPrecond}, device=device)).requires_grad_(False)


def load_net(source, device):
    """load_generator for the command lines: a missing or refused file is a one-line error."""
    if source == DEFAULT_NET and not os.path.exists(source):
        raise SystemExit(f'error: {source} not found; create the toy generator first with `python train_min.py toy --export assets/toy-gdd.pt`')
    try:
        return load_generator(source, device)
    except FileNotFoundError as e:
        raise SystemExit(f'error: {e.args[-1] if e.args else e}') from None
    except cli.EXPECTED_ERRORS as e:
        raise SystemExit(f'error: cannot load --net {source}: {cli.error_line(e)}') from None


def check_net(source):
    """--check: load and validate the file, report what it holds, its load time and the peak memory."""
    t0 = time.perf_counter()
    net = load_net(source, 'cpu')
    kind = 'one-step generator (GDDPrecond)' if isinstance(net, gdd.GDDPrecond) else f'teacher ({type(net).__name__})'
    print(f'{source}: {kind}, {net.img_resolution}x{net.img_resolution}x{net.img_channels}, label_dim {net.label_dim}, '
          f'{sum(p.numel() for p in net.parameters()):,} parameters; read, checked and built in '
          f'{time.perf_counter() - t0:.2f} s, peak memory {cli.peak_memory_gb(torch.device("cpu")):.2f} GiB')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--net', default=DEFAULT_NET, help='checkpoint / GDD or D2O pickle / EDM teacher pickle, path or URL (default: %(default)s)')
    p.add_argument('--seeds', type=parse_seeds, default='0-63', help='seeds, e.g. 0-49999 or 0,5,10-12 (default: %(default)s)')
    p.add_argument('--class', dest='class_idx', type=int, default=None, help='class for every image (default: random per seed)')
    p.add_argument('--batch', type=int, default=64, help='images per batch and rank (default: %(default)s)')
    p.add_argument('--steps', type=int, default=18, help=f'EDM sampler steps for a teacher, 2..{MAX_STEPS} (NFE = 2 steps - 1; default: %(default)s)')
    p.add_argument('--outdir', help='write {seed:06d}.png per image in folders of 1000, as EDM')
    p.add_argument('--grid', help='write one PNG grid of all images (default when no output is given: runs/samples.png)')
    p.add_argument('--npz', help='write a compressed npz: images uint8 [N, H, W, C], seeds [N] and, for a conditional '
                                 'network, labels [N] (class indices)')
    p.add_argument('--check', action='store_true', help='only load and validate --net, report what it holds; write nothing')
    args = p.parse_args(argv)
    with cli_errors():
        if args.check:
            return check_net(args.net)
        check_sampling_options(args.batch, args.steps)
        if not (args.outdir or args.grid or args.npz):
            args.grid = os.path.join('runs', 'samples.png')
        for flag, path, folder in (('--outdir', args.outdir, True), ('--grid', args.grid, False), ('--npz', args.npz, False)):
            if path:
                check_output(path, flag, folder)     # before loading anything: a bad path fails in a second
        with cli.distributed() as (rank, world, device):
            return _sample(args, rank, world, device)


def check_sampling_options(batch, steps):
    if batch < 1:
        raise ValueError(f'--batch must be >= 1, got {batch}')
    if not 2 <= steps <= MAX_STEPS:     # the Heun sampler needs 2 noise levels; the bound keeps its arrays small
        raise ValueError(f'--steps must be in 2..{MAX_STEPS}, got {steps}')


def _sample(args, rank, world, device):
    net = load_net(args.net, device)
    one_step = isinstance(net, gdd.GDDPrecond)
    counter = None if one_step else NFECounter(net)
    seeds = args.seeds[rank::world]
    if rank == 0:
        kind = 'one-step generator' if one_step else f'EDM teacher, {args.steps}-step sampler'
        print(f'{args.net}: {kind}, {len(args.seeds)} images, {world} process(es) on {device}')

    kept = []                                       # (seed, uint8 CHW, class or -1) for the grid / npz
    elapsed, done = 0.0, 0
    t0 = time.perf_counter()
    try:
        for batch_seeds, images, classes in generate_images(net, seeds, args.batch, args.class_idx, args.steps, device, with_classes=True):
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - t0
            images = images.cpu().numpy()
            done += len(batch_seeds)
            if args.outdir:
                for seed, image in zip(batch_seeds, images):
                    path = os.path.join(args.outdir, f'{seed - seed % 1000:06d}', f'{seed:06d}.png')
                    cli.save_png(image, path, fsync=False)   # many small files a rerun redoes
            if args.grid or args.npz:
                kept.extend(zip(batch_seeds, images, [-1] * len(images) if classes is None else classes.tolist()))
            if rank == 0:
                print(f'\r{done}/{len(seeds)} images' + (f' of rank 0 ({len(args.seeds)} on {world} processes)' if world > 1 else ''),
                      end='', flush=True)
            t0 = time.perf_counter()
    finally:                    # end the progress line, also before the line of a Ctrl-C
        if rank == 0 and done:
            print()

    kept = cli.gather_to_rank0(kept)
    if rank == 0:
        kept.sort(key=lambda item: item[0])
        if args.grid:
            cli.save_grid(np.stack([x for _, x, _ in kept]), args.grid)
            print(f'grid of {len(kept)} images: {args.grid}')
        if args.npz:
            arrays = dict(images=np.stack([x.transpose(1, 2, 0) for _, x, _ in kept]), seeds=np.array([s for s, _, _ in kept]))
            if net.label_dim:
                arrays['labels'] = np.array([c for _, _, c in kept], dtype=np.int64)
            cli.atomic_write(args.npz, lambda f: np.savez_compressed(f, **arrays))
            print(f'{len(kept)} images{" and their classes" if net.label_dim else ""}: {args.npz}')
        if args.outdir:
            print(f'PNGs: {args.outdir}')
        # Throughput of this process (rank 0); with N processes the total is about N times this.
        line = f'{done} images in {elapsed:.2f} s: {done / max(elapsed, 1e-9):.2f} images/s'
        if counter is not None and done:
            line += f', {counter.calls / math.ceil(done / args.batch):.0f} network evaluations per image'
        print(line + ('' if world == 1 else f' (rank 0 of {world})'))

if __name__ == '__main__':
    main()
