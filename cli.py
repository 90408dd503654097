"""Command-line plumbing shared by the scripts: seed lists, torchrun start-up, one-line errors, output checks and
the one atomic writer (a file is complete or absent, never half-written). Nothing here is part of the method;
a reader of the paper may skip this file.

torch is imported inside the three torchrun helpers only, so that dataset_min (numpy and pillow) can use the rest.
"""

import argparse
import contextlib
import math
import os
import pickle
import re
import zipfile

import numpy as np
import PIL.Image

#----------------------------------------------------------------------------
# Seed lists, as EDM's generate.py and fid.py take them.

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

#----------------------------------------------------------------------------
# torchrun: one process per GPU (NCCL), or per CPU process (gloo).

def init_distributed(device='auto'):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on CUDA, gloo on
    CPU. device: 'auto' (this rank's GPU if any, else the CPU), 'cpu', 'cuda' (this rank's GPU) or 'cuda:N'."""
    import torch
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


def broadcast(obj, rank):
    """A picklable value from rank 0 to every rank (identity in a single process)."""
    import torch
    if not torch.distributed.is_initialized():
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(items):
    """Concatenate per-rank lists on rank 0 (other ranks get None); identity without torch.distributed."""
    import torch
    if not torch.distributed.is_initialized():
        return items
    parts = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(items, parts, dst=0)
    return None if parts is None else [x for p in parts for x in p]

#----------------------------------------------------------------------------
# Expected errors -> one line. Bad input (a missing or refused file, a wrong shape, a full disk, a corrupt image
# in a DataLoader worker) ends with `error: ...` and exit status 1; anything else (AssertionError, TypeError,
# KeyError, ... in our own code) is a bug and keeps its traceback. Loaders raise ValueError('<file>: <problem>').

EXPECTED_ERRORS = (ValueError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, RecursionError, MemoryError)


def error_line(e):
    """The one line that says what went wrong."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:    # [Errno 28] ... -> what + which file
        return f'{e.strerror}: {e.filename}'
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith('Caught ') and 'in DataLoader worker process' in lines[0]:
        lines = [lines[-1].partition(': ')[2] or lines[-1]]     # the worker's original message, not its traceback
    elif lines and lines[0].startswith('Weights only load failed'):  # torch.load(weights_only=True) refused the file
        why = [line for line in lines[1:] if any(k in line for k in ('GLOBAL', 'Unsupported', 'WeightsUnpickler'))]
        why = (why or lines[1:] or ['unsupported content'])[0].removeprefix('WeightsUnpickler error: ')
        lines = [f'torch.load(weights_only=True) refused it: {why}']
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

#----------------------------------------------------------------------------
# Outputs.

def make_run_dir(outdir, name):
    """A new numbered folder OUTDIR/NNNNN-NAME (one more than the highest number there)."""
    os.makedirs(outdir, exist_ok=True)
    while True:
        ids = [int(m.group(1)) for m in (re.match(r'^(\d+)-', d) for d in os.listdir(outdir)) if m]
        run_dir = os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{name}')
        try:
            os.makedirs(run_dir)
            return run_dir
        except FileExistsError:     # another run started at the same moment and took this number
            pass


class Logger:
    """sys.stdout = Logger(path): print() to the console and to a log file."""
    def __init__(self, path, stdout):
        self.file, self.stdout = open(path, 'a'), stdout

    def write(self, text):
        self.stdout.write(text)
        self.file.write(text)
        self.file.flush()

    def flush(self):
        self.stdout.flush()


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


def atomic_write(path, write, fsync=True):
    """write(f) into the hidden temporary file .NAME.tmpPID next to path, flush it to disk (fsync, unless the
    caller writes many small files it can redo), then rename: readers see the whole file or none. A failed
    write (a full disk) leaves no partial file behind."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_pil(image):
    """uint8 [C, H, W] array -> PIL image (mode L for one channel, RGB for three)."""
    return PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def save_png(image, path, fsync=True):
    atomic_write(path, lambda f: to_pil(np.asarray(image)).save(f, format='png'), fsync)


def save_grid(images, path):
    """uint8 [N, C, H, W] (array or tensor) -> one PNG, ceil(sqrt(N)) images per row."""
    images = np.asarray(images.cpu() if hasattr(images, 'cpu') else images)
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    grid = np.zeros([c, math.ceil(n / cols) * h, cols * w], dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    save_png(grid, path)


def quantize(x):
    """Images (a tensor) in ~[-1, 1] -> uint8(clip(127.5 x + 128, 0, 255)), truncating: how EDM's generate.py
    saves PNGs, and so what the FID of saved images sees."""
    return (x * 127.5 + 128).clip(0, 255).byte()
