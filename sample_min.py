"""Sample images from a one-step GDD generator (one network evaluation) or from an EDM teacher (EDM sampler).

    python sample_min.py                                       # toy generator of `python train_min.py toy` -> grid
    python sample_min.py --net ckpt.pt --seeds 0-49999 --outdir out     # PNGs in EDM's layout (folders of 1000)
    python sample_min.py --net edm-cifar10-32x32-cond-ve.pkl --steps 18 --grid teacher.png
    torchrun --nproc_per_node=8 sample_min.py --net URL --seeds 0-49999 --npz samples.npz

--net takes a project checkpoint, an official GDD/D2O release pickle (class D2OPrecond) or an EDM teacher pickle,
by path or URL; gdd.load_generator reads all three without executing code from the file.
"""

import argparse
import contextlib
import math
import os
import pickle
import re
import time
import zipfile

import numpy as np
import PIL.Image
import torch

import edm_nets
import gdd

# The toy generator that `python train_min.py toy --export assets/toy-gdd.pt` made, shipped with the repository
# (found next to this file, whatever the working directory).
DEFAULT_NET = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'toy-gdd.pt')

#----------------------------------------------------------------------------
# Command line helpers, shared with fid_min.py and train_min.py.

MAX_SEEDS = 10_000_000     # one list of seeds (EDM's evaluations use 50,000; 10M ints are ~0.4 GB)

def parse_seeds(text):
    """'0-49999' / '0,5,10-12' -> list of ints (ranges inclusive), at most MAX_SEEDS of them."""
    seeds = []
    for part in str(text).split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise argparse.ArgumentTypeError(f'bad seed list {text!r}: use e.g. 0-49999 or 0,5,10-12')
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if len(seeds) + hi - lo + 1 > MAX_SEEDS:
            raise argparse.ArgumentTypeError(f'seed list {text!r} has more than {MAX_SEEDS:,} seeds')
        seeds.extend(range(lo, hi + 1))
    return seeds


def init_distributed(device='auto'):
    """(rank, world_size, device), shared by fid_min, sample_min and train_min. Under torchrun (WORLD_SIZE > 1)
    joins the process group: NCCL on CUDA, gloo on CPU. device: 'auto' (this rank's GPU if any, else the CPU),
    'cpu', 'cuda' (this rank's GPU) or 'cuda:N'."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device == 'auto':
        device = torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
    else:
        device = torch.device(device)
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank, world, device

#----------------------------------------------------------------------------
# Per-image randomness exactly as EDM's generate.py (edm-formats.md (d)): one torch.Generator per seed,
# seeded with seed % 2^32, created on the sampling device. Image i's latents are its generator's first
# randn([C, H, W]); for conditional nets its class is the next randint(label_dim); the stochastic sampler's
# noise continues from the same generator. An image therefore depends only on its seed, not on the batch.

class SeededRandom:
    def __init__(self, seeds, device):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, shape, device):
        return torch.stack([torch.randn(shape, generator=g, device=device) for g in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape[1:], x.device).to(x.dtype)

    def randint(self, high, device):
        return torch.stack([torch.randint(high, [], generator=g, device=device) for g in self.generators])


def quantize(x):
    """Float images in ~[-1, 1] -> uint8, as EDM saves PNGs: uint8(clip(127.5 x + 128, 0, 255)), truncating (recipe A.3)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


class NFECounter:
    """Counts network evaluations (forward calls times batch size) of a teacher."""
    def __init__(self, net):
        self.calls = 0
        net.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1


def generate_images(net, seeds, batch=64, class_idx=None, steps=18, device='cpu'):
    """Yield (seeds, uint8 images [B, C, H, W] on `device`) for `seeds` in order, `batch` at a time.
    A GDD generator (gdd.GDDPrecond) is run once, x = G(80 z; 80, c) (recipe A.3); any other network is a
    teacher sampled with EDM's Heun sampler in `steps` steps (2 steps - 1 evaluations, recipe F.3)."""
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
        yield batch_seeds, quantize(images)

#----------------------------------------------------------------------------
# Command line.

def load_net(source, device):
    """Generator or teacher from a path or URL, with one-line errors for files that are missing or unreadable."""
    if source == DEFAULT_NET and not os.path.exists(source):
        raise SystemExit(f'error: {source} not found; create the toy generator first with `python train_min.py toy --export assets/toy-gdd.pt`')
    try:
        net = gdd.load_generator(source, device=device)
    except FileNotFoundError as e:
        raise SystemExit(f'error: {e.args[-1] if e.args else e}') from None
    except (ValueError, OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise SystemExit(f'error: cannot load --net {source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    return net.eval().requires_grad_(False)


def gather_to_rank0(items):
    """Concatenate per-rank lists on rank 0 (other ranks get None); identity without torch.distributed."""
    if not torch.distributed.is_initialized():
        return items
    parts = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(items, parts, dst=0)
    return None if parts is None else [x for p in parts for x in p]


def _to_pil(image):
    """uint8 [C, H, W] array -> PIL image (mode L for one channel, RGB for three)."""
    return PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def atomic_write(path, write):
    """write(f) into a temporary file next to path, then rename: never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    finally:                                        # a failed write (disk full) leaves no partial file behind
        if os.path.exists(tmp):
            os.remove(tmp)


def save_grid(images, path):
    """uint8 [N, C, H, W] -> one PNG, ceil(sqrt(N)) images per row."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros([c, rows * h, cols * w], dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    atomic_write(path, lambda f: _to_pil(grid).save(f, format='png'))

#----------------------------------------------------------------------------
# Expected errors -> one line, shared by the three CLIs (sample_min, fid_min, train_min). Bad input (a missing
# or refused file, a wrong shape, a full disk, a corrupt image in a DataLoader worker) ends with `error: ...`
# and exit status 1; anything else (AssertionError, TypeError, KeyError, ... in our own code) is a bug and
# keeps its traceback. Loaders raise ValueError('<file>: <problem>') for files they refuse.

MAX_STEPS = 1000     # --steps bound: EDM's sampler allocates its noise levels up front
EXPECTED_ERRORS = (ValueError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, RecursionError, MemoryError)


def error_line(e):
    """The one line that says what went wrong."""
    text = str(e).strip()
    if isinstance(e, OSError) and e.filename is not None and e.strerror:    # [Errno 28] ... -> what + which file
        return f'{e.strerror}: {e.filename}'
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith('Caught ') and 'in DataLoader worker process' in lines[0]:
        lines = [lines[-1].partition(': ')[2] or lines[-1]]     # the worker's original message, not its traceback
    elif lines and lines[0].startswith('Weights only load failed'):  # torch.load(weights_only=True) refused the file
        why = [line for line in lines[1:] if any(k in line for k in ('GLOBAL', 'Unsupported', 'WeightsUnpickler'))]
        lines = ['torch.load(weights_only=True) refused it: ' + (why or lines[1:] or ['unsupported content'])[0]]
    if isinstance(e, MemoryError):
        return 'out of memory' + (f' ({lines[0]})' if lines else '')
    return lines[0] if lines else type(e).__name__


@contextlib.contextmanager
def cli_errors():
    """with cli_errors(): ...  turns the expected errors into SystemExit('error: <one line>')."""
    try:
        yield
    except EXPECTED_ERRORS as e:
        raise SystemExit(f'error: {error_line(e)}') from None


def check_output(path, flag, folder=False):
    """Fail before any work when `path` cannot be written: a folder given for a file (or a file for a folder),
    or a place where nothing can be created. Creates nothing (a probe file is made and removed)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f'{flag} {path} is a file, not a folder')
    if not folder and os.path.isdir(path):
        raise ValueError(f'{flag} {path} is a folder; give a file name')
    parent = path if folder else os.path.dirname(path)
    while not os.path.exists(parent):                      # the nearest folder that exists: the rest is made later
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f'{flag} {path}: {parent} is a file, not a folder')
    try:
        probe = os.path.join(parent, f'.write-test-{os.getpid()}')
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
        os.remove(probe)
    except OSError as e:
        raise ValueError(f'{flag} {path}: cannot write into {parent} ({e.strerror or e})') from None
    return path

#----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--net', default=DEFAULT_NET, help='checkpoint / GDD or D2O pickle / EDM teacher pickle, path or URL (default: %(default)s)')
    p.add_argument('--seeds', type=parse_seeds, default='0-63', help='seeds, e.g. 0-49999 or 0,5,10-12 (default: %(default)s)')
    p.add_argument('--class', dest='class_idx', type=int, default=None, help='class for every image (default: random per seed)')
    p.add_argument('--batch', type=int, default=64, help='images per batch and rank (default: %(default)s)')
    p.add_argument('--steps', type=int, default=18, help=f'EDM sampler steps for a teacher, 2..{MAX_STEPS} (NFE = 2 steps - 1; default: %(default)s)')
    p.add_argument('--outdir', help='write {seed:06d}.png per image in folders of 1000, as EDM')
    p.add_argument('--grid', help='write one PNG grid of all images (default when no output is given: runs/samples.png)')
    p.add_argument('--npz', help='write a compressed npz: images uint8 [N, H, W, C], seeds [N]')
    args = p.parse_args(argv)
    with cli_errors():
        check_sampling_options(args.batch, args.steps)
        if not (args.outdir or args.grid or args.npz):
            args.grid = os.path.join('runs', 'samples.png')
        for flag, path, folder in (('--outdir', args.outdir, True), ('--grid', args.grid, False), ('--npz', args.npz, False)):
            if path:
                check_output(path, flag, folder)     # before loading anything: a bad path fails in a second
        rank, world, device = init_distributed()
        try:
            return _sample(args, rank, world, device)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


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

    kept = []                                       # (seed, uint8 CHW) for the grid / npz
    elapsed, done = 0.0, 0
    t0 = time.perf_counter()
    for batch_seeds, images in generate_images(net, seeds, args.batch, args.class_idx, args.steps, device):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - t0
        images = images.cpu().numpy()
        done += len(batch_seeds)
        if args.outdir:
            for seed, image in zip(batch_seeds, images):
                path = os.path.join(args.outdir, f'{seed - seed % 1000:06d}', f'{seed:06d}.png')
                atomic_write(path, lambda f: _to_pil(image).save(f, format='png'))
        if args.grid or args.npz:
            kept.extend(zip(batch_seeds, images))
        if rank == 0:
            print(f'\r{done}/{len(seeds)} images', end='', flush=True)
        t0 = time.perf_counter()
    if rank == 0:
        print()

    kept = gather_to_rank0(kept)
    if rank == 0:
        kept.sort(key=lambda item: item[0])
        if args.grid:
            save_grid(np.stack([x for _, x in kept]), args.grid)
            print(f'grid of {len(kept)} images: {args.grid}')
        if args.npz:
            images = np.stack([x.transpose(1, 2, 0) for _, x in kept])
            atomic_write(args.npz, lambda f: np.savez_compressed(f, images=images, seeds=np.array([s for s, _ in kept])))
            print(f'{len(kept)} images: {args.npz}')
        if args.outdir:
            print(f'PNGs: {args.outdir}')
        # Throughput of this process (rank 0); with N processes the total is about N times this.
        line = f'{done} images in {elapsed:.2f} s: {done / max(elapsed, 1e-9):.2f} images/s'
        if counter is not None and done:
            line += f', {counter.calls / math.ceil(done / args.batch):.0f} network evaluations per image'
        print(line + ('' if world == 1 else f' (rank 0 of {world})'))

if __name__ == '__main__':
    main()
