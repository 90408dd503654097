"""Training states for --resume, and the run folder they live in. Infrastructure: a reader of the method may
skip this file.

A training state holds everything the next iteration depends on, as plain types and tensors
(loadable with torch.load(weights_only=True)). Training draws randomness only from the data order (a function
of --seed and the image counter) and the latent generator, whose state is saved. Written by rank 0 with
cli.atomic_write (temporary file, fsync, rename), named by iteration; the last 3 are kept. A file cut off
by a kill is never a candidate (temporary files are hidden and unnamed like states), and a corrupt one is
skipped in favour of the previous one. Multi-node runs need --outdir on a shared filesystem.

Integrity: torch.load does not check the zip CRCs, so a flipped byte in tensor data would load silently. Each
state gets a sidecar training-state-IIIIIIII.pt.sha256 (sha256sum's format, written atomically after the
state) that is checked before torch.load. A state without one (written by an older version, or killed between
the two renames) is accepted after the CRC-32 of every zip member checks out, with a note. A state that passes
is then checked for structure (keys, types, the RNG state a uint8 tensor) and, once the networks exist, for
names, shapes and dtypes of every tensor: a mismatch is a one-line error, never a silent cast.
One process per run folder: rank 0 holds an exclusive flock on RUN_DIR/.lock (released by the kernel when the
process ends, however it ends); with the lock held, temporary files a killed run left behind are removed.
The counters must agree: seen = the images of `step` iterations of --batch (a run whose --batch was overridden on
resume records in its config batch_since = [iteration, images] at which the current batch began).
--resume auto continues the newest run of the preset in --outdir whose state has this command's options (those
--resume-override names may differ); with none, a new run starts and the note names the runs that differ.
"""

import hashlib
import json
import math
import os
import re
import socket
import sys

import torch

import cli
import safe_files

try:
    import fcntl                # the run-folder lock (POSIX)
except ImportError:
    fcntl = None

STATE_FORMAT = 'gdd-min-training-state'
STATE_RE = re.compile(r'^training-state-(\d+)\.pt$')
STATE_KEEP = 3
STATE_KEYS = ('format', 'step', 'tick', 'seen', 'config', 'G', 'G_ema', 'D', 'opt_G', 'opt_D', 'latent_gen')
# Every option that changes what a run computes. Resume refuses a change unless --resume-override names it (then
# the log says so); those in RESUME_FIXED shape the networks and cannot be overridden. Not here: kimg (only the
# end point) and tick, snap, state, outdir, export, workers, device, fd_images, classifier, metrics, ref,
# metric_images, detector, bench (when and where results are written and measured, how the data is loaded). batch_gpu is compared as the effective value (0 = derived from the batch).
RESUME_MUST_MATCH = ('preset', 'arch', 'cres', 'freeze', 'features', 'dwidth', 'proj_seed', 'teacher_sigma', 'seed',
                     'batch', 'loss_batch', 'lr', 'dlr', 'r1_gamma', 'ema', 'batch_gpu', 'xflip', 'data', 'teacher',
                     'backbone_weights', 'fp16')
RESUME_FIXED = ('preset', 'arch', 'cres', 'freeze', 'features', 'dwidth')
# The speed options of bench_min.py change the arithmetic too; states written before they existed ran without them.
RESUME_ABSENT = {'tf32': False, 'channels_last': False, 'bf16_features': False}
RESUME_MUST_MATCH += tuple(RESUME_ABSENT)
# cli.atomic_write's .NAME.tmpPID (and NAME.tmpPID, NAME.tmpPID.png of older versions)
TEMP_RE = re.compile(r'\.tmp\d*(\.png)?$')
LOCK_NAME = '.lock'


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
    sidecar = path + '.sha256'
    with cli.deferred_signals():    # a Ctrl-C / SIGTERM waits until the state, its checksum and the pruning are done
        try:
            safe_files.save_torch(state, path)
            cli.atomic_write(sidecar, lambda f: f.write(f'{file_sha256(path)}  {os.path.basename(path)}\n'.encode()))
        except (OSError, RuntimeError) as e:    # disk full, folder gone: the earlier states stay as they were
            raise OSError(f'cannot write training state {path}: {getattr(e, "strerror", None) or e}') from None
        for old in training_states(run_dir)[STATE_KEEP:]:
            os.remove(old)
            if os.path.exists(old + '.sha256'):
                os.remove(old + '.sha256')
    return path


def kimg_name(seen, tick):
    """KKKKKK of the snapshot and sample-grid names: whole kimg as in EDM, or with the images (KKKKKK.III) in a run
    whose ticks are under 1 kimg, so that each snapshot keeps a name of its own."""
    return f'{seen // 1000:06d}' if tick >= 1 else f'{seen / 1000:010.3f}'


def training_states(run_dir):
    """Paths of the training states in run_dir, newest first."""
    names = [n for n in os.listdir(run_dir) if STATE_RE.match(n)] if os.path.isdir(run_dir) else []
    return [os.path.join(run_dir, n) for n in sorted(names, reverse=True)]


def verify_training_state(path):
    """Check the bytes of a state against its .sha256 file before torch.load reads them. Without one (an older
    version's state) returns a note: safe_files.load_torch_file then checks the CRC-32 of every zip member."""
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
    return (f'note: {path} has no {os.path.basename(sidecar)} (older version?); '
            'the CRC-32 of each zip member checked out as it loaded')


def read_training_state(path):
    """The state in `path` as plain data, or ValueError('<path>: <problem>'). Every state is read here."""
    try:
        note = verify_training_state(path)
    except OSError as e:        # unreadable (a folder of that name, no permission, ...)
        raise ValueError(f'{path}: {cli.error_line(e)}') from None
    state = safe_files.load_torch_file(path)   # validated torch.load: bounded by what the file holds, one-line errors
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
    batch, since = state['config'].get('batch'), state['config'].get('batch_since', [0, 0])
    if not (type(batch) is int and batch >= 1 and isinstance(since, list) and len(since) == 2 and all(type(v) is int for v in since)
            and state['tick'] <= state['step'] and 0 <= since[0] <= state['step'] and since[1] + (state['step'] - since[0]) * batch == state['seen']):
        raise ValueError(f'{path}: its counters disagree: {state["seen"]} images after {state["step"]} iterations of batch '
                         f'{batch!r:.40} and {state["tick"]} ticks (batch_since {since!r:.40}); a damaged or edited state')
    rng = state['latent_gen']
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.ndim != 1:
        got = f'{rng.dtype} tensor of shape {list(rng.shape)}' if isinstance(rng, torch.Tensor) else type(rng).__name__
        raise ValueError(f'{path}: latent_gen must be a torch.Generator state (1-D uint8 tensor), got {got}')


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
        safe_files.check_tensors(state[key], module.state_dict(), f'{path}: {key}')
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
        raise ValueError(f'{path}: latent_gen is not a valid generator state ({cli.error_line(e)})') from None
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
        print(f'note: removed {len(junk)} file(s) an interrupted run left in {run_dir}: {safe_files.few_names(junk)}')


def newest_intact_state(folder):
    """(path, state) of the newest training state in folder that reads back intact, or (None, None); a damaged
    one is skipped with a note in favour of the previous one."""
    for path in training_states(folder):
        try:
            return path, read_training_state(path)
        except ValueError as e:     # cut off or corrupt: fall back to the previous state
            print(f'note: skipping {path}: {str(e).partition(": ")[2] or e}')
    return None, None


def find_training_state(resume, outdir, preset, lock=None, differences=None):
    """(path, state) of the newest intact training state of --resume (a FILE, a RUN_DIR or 'auto'), or (None, None)
    for 'auto' with none. A damaged state is skipped with a note (an explicit FILE is an error). With a RunLock,
    the folder of the state is locked before its states are listed and read (for 'auto': once it matches, and
    then listed again). differences(state) -> the options of this command that the state does not share: 'auto'
    takes the newest run of the preset in outdir without any, and when there is none says which runs differ."""
    if resume != 'auto':
        if os.path.isfile(resume):
            if lock is not None:
                lock.hold(os.path.dirname(os.path.abspath(resume)))
            try:
                return resume, read_training_state(resume)
            except ValueError as e:
                raise SystemExit(f'error: --resume {resume}: no complete training state: {str(e).partition(": ")[2] or e}') from None
        if not os.path.isdir(resume):
            raise SystemExit(f'error: --resume {resume}: no such file or folder')
        if lock is not None and training_states(resume):
            lock.hold(resume)
        path, state = newest_intact_state(resume)
        if path is None:
            if lock is not None:
                lock.release()
            raise SystemExit(f'error: --resume {resume}: no complete training state found')
        return path, state
    runs = sorted((d for d in (os.listdir(outdir) if os.path.isdir(outdir) else []) if re.match(rf'^\d+-{re.escape(preset)}$', d)), reverse=True)
    others = []
    for folder in (os.path.join(outdir, d) for d in runs):
        path, state = newest_intact_state(folder)      # read unlocked: states are renamed into place whole
        if path is None:
            continue
        try:
            check_training_state(state, path)
            differ = differences(state) if differences is not None else None
        except ValueError as e:
            differ = f'unusable: {str(e).partition(": ")[2] or e}'
        if differ:
            others.append(f'{folder} ({differ})')
            continue
        if lock is not None:
            lock.hold(folder)       # its own run, if another process trains it now; then a newer state may exist
            if training_states(folder)[0] != path:
                path, state = newest_intact_state(folder)
        return path, state
    if others:
        print(f'note: --resume auto: no run of preset {preset} in {outdir} has these options, so a new run starts. '
              f'Runs there: {"; ".join(others)}. To continue one of them, name it: --resume RUN_DIR')
    return None, None


def option_changes(state, cfg, batch_gpu):
    """(changed, refused): {option: (value in the state, value now)} of the options that change the trajectory and
    differ (batch_gpu: this run's effective value), and the list of those that --resume-override does not name."""
    saved = state['config']
    now = {k: getattr(cfg, k) for k in RESUME_MUST_MATCH if hasattr(cfg, k)}
    old = {k: saved.get(k, RESUME_ABSENT.get(k)) for k in now}
    if 'batch_gpu' in state:    # states of older versions hold only the option, 0 when derived
        now['batch_gpu'], old['batch_gpu'] = batch_gpu, state['batch_gpu']
    changed = {k: (old[k], now[k]) for k in now if old[k] != now[k]}
    override = [k.strip().replace('-', '_') for k in getattr(cfg, 'resume_override', '').split(',') if k.strip()]
    return changed, [k for k in changed if k not in override]


def describe_changes(changed, keys):
    return ', '.join(f'{k}={changed[k][0]!r:.200} (now {changed[k][1]!r:.200})' for k in keys)


def resume_run_dir(path, state, cfg, batch_gpu):
    """Check the state belongs to this configuration (batch_gpu: this run's effective value); drop the
    stats.jsonl and metrics.jsonl lines written after it. Returns the run folder."""
    changed, refused = option_changes(state, cfg, batch_gpu)
    if refused:
        hint = '' if set(refused) & set(RESUME_FIXED) else f'; to continue anyway with the new values: --resume-override {",".join(refused)}'
        raise SystemExit(f'error: {path} was written with {describe_changes(changed, refused)}{hint}')
    for k, (old, now) in changed.items():
        print(f'note: --resume-override {k}: {old!r:.200} -> {now!r:.200} from iteration {state["step"]} on')
    since = [state['step'], state['seen']] if 'batch' in changed else state['config'].get('batch_since', [0, 0])
    if since != [0, 0]:
        cfg.batch_since = since     # saved with the config: where the current --batch began (the counter check)
    run_dir = os.path.dirname(os.path.abspath(path))
    for stats_path in (os.path.join(run_dir, name) for name in ('stats.jsonl', 'metrics.jsonl')):
        if not os.path.isfile(stats_path):
            continue
        keep = []
        with open(stats_path) as f:
            for line in f:
                try:
                    if json.loads(line)['kimg'] <= state['seen'] / 1000:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):
                    pass        # a line cut off by the kill
        cli.atomic_write(stats_path, lambda f: f.write(''.join(keep).encode()))
    return run_dir


class RunFolder:
    """A training run's folder from start to end. open(): rank 0 finds the state to continue or makes a new
    numbered folder, holds the folder's lock, logs to its log.txt (cli.RunLog) and removes what a killed run left;
    the other ranks print nothing (rank 0 reports for all). Leaving the `with` block, however the run ends: the
    lock is released, the log closed (a failed start leaves no folder behind) and the process group closed."""
    def __init__(self):
        self.dir, self.lock, self.log, self.stdout = None, RunLock(), cli.RunLog(), None

    def open(self, cfg, rank, batch_gpu):
        """(path, state) to continue from, checked against this configuration, or (None, None) for a new run."""
        path = state = None
        if cfg.resume and rank == 0:
            differences = lambda s: describe_changes(*option_changes(s, cfg, batch_gpu))
            path, state = find_training_state(cfg.resume, cfg.outdir, cfg.preset, self.lock, differences)
        path = cli.broadcast(path, rank)
        if rank == 0 and not cfg.bench:
            self.dir = os.path.dirname(os.path.abspath(path)) if path else cli.make_run_dir(cfg.outdir, cfg.preset)
            self.lock.hold(self.dir)
            self.log.start(self.dir, made=not path)
            remove_leftovers(self.dir)
        elif rank > 0:
            self.stdout, sys.stdout = sys.stdout, open(os.devnull, 'w')
        self.dir = cli.broadcast(self.dir, rank)
        if path:
            state = state if rank == 0 else read_training_state(path)
            check_training_state(state, path)
            if rank == 0:
                resume_run_dir(path, state, cfg, batch_gpu)
        return path, state

    def stop_note(self):
        """What a stopped run leaves to continue from (the note of cli.clean_stop)."""
        if self.dir is None:
            return None
        states = training_states(self.dir)
        return (f'the last good training state is {states[0]}; to continue, run the same command with --resume auto'
                if states else 'no training state was written')

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.stdout is not None:
            sys.stdout.close()
            sys.stdout, self.stdout = self.stdout, None
        self.lock.release()
        self.log.__exit__(*exc)
