"""Command-line plumbing shared by the scripts: seed lists, torchrun start-up, one-line errors, output checks and
the one atomic writer (a file is complete or absent, never half-written), the clean stop on Ctrl-C, SIGTERM, a
lost torchrun launcher or a failed peer process, and the run folder's log. Nothing here is part of the method; a
reader of the paper may skip this file.

torch is imported inside the functions that use it, so that dataset_min (numpy and pillow) can use the rest.
"""

import argparse
import contextlib
import math
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
import traceback
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
    if 'TORCHELASTIC_RUN_ID' in os.environ:     # started by torchrun
        watch_launcher()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank, world, device


@contextlib.contextmanager
def distributed(device='auto'):
    """with distributed() as (rank, world, device): init_distributed for the block, the process group left
    however the block ends (a command that returns or fails leaves no NCCL / gloo group behind)."""
    import torch
    try:
        yield init_distributed(device)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def watch_launcher(interval=1.0):
    """A rank must not go on training unsupervised when its torchrun launcher is killed (kill -9 of the launcher's
    process group: torchrun starts each rank in a session of its own, so the ranks survive it and are re-parented).
    A daemon thread checks the parent once per `interval` seconds and, when it is gone, sends this process SIGTERM:
    the clean stop of clean_stop, or the default end where none is installed."""
    if _stop['watched']:
        return
    parent = _stop['watched'] = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        _stop['launcher_gone'] = True
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name='watch-launcher', daemon=True).start()


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


def device_problem(name):
    """What is wrong with a --device value ('auto', 'cpu', 'cuda' or 'cuda:N') on this machine, or None."""
    import torch
    if name == 'auto':
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        return f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}"
    if device.type == 'cuda' and not torch.cuda.is_available():
        return 'CUDA is not available; use --device cpu'
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        return f'--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)'
    return None


@contextlib.contextmanager
def torch_flags(tf32=None):
    """torch's global arithmetic switches (cuDNN benchmark, TF32, fp16 reduced-precision sums) as they were
    before the block, restored after it; tf32 True / False sets TF32 for the block."""
    import torch
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = c.benchmark, m.allow_tf32, c.allow_tf32, m.allow_fp16_reduced_precision_reduction
    if tf32 is not None:
        m.allow_tf32 = c.allow_tf32 = tf32
    try:
        yield
    finally:
        c.benchmark, m.allow_tf32, c.allow_tf32, m.allow_fp16_reduced_precision_reduction = saved


def peak_memory_gb(device):
    """Peak memory: allocated on a CUDA device, else the resident memory of the process (ru_maxrss, kB on Linux)."""
    import torch
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource     # POSIX only: imported where it is used
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def nonfinite_parameters(*modules):
    """1.0 when any parameter of the modules holds NaN or inf, else 0.0 (a tensor: no host synchronisation)."""
    import torch
    return torch.stack([~torch.isfinite(p).all() for m in modules for p in m.parameters()]).any().float()


def cpu_count():
    """CPU cores this process may use (what a DataLoader compares its number of workers with)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1

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
def cli_errors(note=None):
    """with cli_errors(): ...  turns the expected errors into SystemExit('error: <one line>'), and ends cleanly
    on Ctrl-C, SIGTERM, a lost torchrun launcher or a failed peer process (clean_stop(note))."""
    with clean_stop(note):
        try:
            yield
        except EXPECTED_ERRORS as e:
            raise SystemExit(f'error: {error_line(e)}') from None

#----------------------------------------------------------------------------
# Stopping cleanly. Ctrl-C (SIGINT) and SIGTERM (a cluster's preemption; also what torchrun sends the other
# processes when one failed) end a command with one line and exit status 128 + the signal's number: 130 and 143,
# the shell's convention. Outputs are complete or absent (atomic_write removes its temporary file); a torch.save
# in progress is finished first (deferred_signals: torch's writer would turn the interrupt into a RuntimeError,
# which reads like a failed disk). Under torchrun (RANK set) only rank 0 reports a stop, and a rank whose
# collective breaks because another process ended says only that: the process that failed prints the cause.

STOP_SIGNALS = {signal.SIGINT: 'SIGINT (Ctrl-C)', signal.SIGTERM: 'SIGTERM'}
_stop = dict(depth=0, nest=0, pending=None, stopping=False, watched=None, launcher_gone=False)


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM within clean_stop. A KeyboardInterrupt, so that DataLoader workers, which inherit the
    handler, end quietly as they do on Ctrl-C."""
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    if _stop['stopping']:           # a second Ctrl-C while the first one unwinds: it is stopping already
        return
    if _stop['depth']:
        _stop['pending'] = _stop['pending'] or signum
        return
    _stop['stopping'] = True
    raise Stopped(signum)


@contextlib.contextmanager
def deferred_signals():
    """A section that a stop does not cut (a file being written): the signal takes effect when it ends."""
    _stop['depth'] += 1
    try:
        yield
    finally:
        _stop['depth'] -= 1
    if _stop['depth'] == 0 and _stop['pending'] and not _stop['stopping']:
        signum, _stop['pending'], _stop['stopping'] = _stop['pending'], None, True
        raise Stopped(signum)


def peer_failed(e):
    """Whether `e` is what a collective raises in a multi-process run when another process has ended (gloo:
    'Connection closed by peer'; NCCL: a remote error), not a fault of this process."""
    if int(os.environ.get('WORLD_SIZE', '1')) < 2 or not isinstance(e, RuntimeError) or e.__traceback__ is None:
        return False
    dist = getattr(sys.modules.get('torch'), 'distributed', None)
    if isinstance(e, getattr(dist, 'DistNetworkError', ())):
        return True
    where = traceback.extract_tb(e.__traceback__)[-1].filename.replace('\\', '/')
    return '/torch/distributed/' in where and re.search(r'peer|remote|broken pipe|connection|timed out|timeout', str(e), re.I) is not None


def _say_stopped(text, note):
    if int(os.environ.get('RANK', '0')) > 0:
        return                      # rank 0 reports for the run
    extra = note() if note is not None else None
    line = text + (f'; {extra}' if extra else '')
    print(line, file=sys.stderr, flush=True)
    if isinstance(sys.stdout, Logger):
        sys.stdout.file.write(line + '\n')


@contextlib.contextmanager
def clean_stop(note=None):
    """Within (a with block or, as @clean_stop(), a function): SIGINT and SIGTERM raise Stopped in the main
    thread (or when the current deferred_signals section ends). A stop ends with one line on stderr, `stopped by
    SIGINT (Ctrl-C)` or `stopped: the torchrun launcher is gone` plus `; note()` (what the user needs to know,
    e.g. where the last good training state is), and exit status 128 + the signal's number; a failed peer
    process with `stopped: another process of this run failed (...)` and exit status 1. Nested blocks share the
    outermost one's handlers and state."""
    main = threading.current_thread() is threading.main_thread()
    outer = main and _stop['nest'] == 0
    old = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS} if outer else {}
    _stop['nest'] += main
    try:
        yield
    except KeyboardInterrupt as e:
        signum = getattr(e, 'signum', signal.SIGINT)
        _stop['stopping'] = True
        _say_stopped('stopped: the torchrun launcher is gone' if _stop['launcher_gone'] else f'stopped by {STOP_SIGNALS[signum]}', note)
        raise SystemExit(128 + signum) from None
    except RuntimeError as e:
        if not peer_failed(e):
            raise
        _stop['stopping'] = True
        _say_stopped('stopped: another process of this run failed (its own error line gives the cause)', note)
        raise SystemExit(1) from None
    finally:
        _stop['nest'] -= main
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if outer:
            _stop.update(pending=None, stopping=False, launcher_gone=False)

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


class RunLog:
    """A run folder's log.txt for the length of a `with` block, from start(run_dir, made): print() goes to the
    console and the log, and the line that ends a failed run goes into the log too. After a failure, a folder
    this start made (made=True) that holds nothing but its log and hidden files (lock, temporaries) is removed:
    a failed start leaves no empty run behind."""
    def __init__(self):
        self.dir, self.made, self.stdout = None, False, None

    def start(self, run_dir, made):
        self.dir, self.made, self.stdout = run_dir, made, sys.stdout
        sys.stdout = Logger(os.path.join(run_dir, 'log.txt'), self.stdout)

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if self.stdout is not None:
            if isinstance(e, SystemExit) and isinstance(e.code, str):
                sys.stdout.file.write(e.code + '\n')
            sys.stdout.file.close()
            sys.stdout, self.stdout = self.stdout, None
        failed = kind is not None and not (isinstance(e, SystemExit) and e.code in (0, None))
        if failed and self.made and all(n == 'log.txt' or n.startswith('.') for n in os.listdir(self.dir)):
            shutil.rmtree(self.dir, ignore_errors=True)


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
