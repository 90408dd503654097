"""A researcher's real run without sharp edges: wrong inputs stop before any work in one line, Ctrl-C / SIGTERM
end every command cleanly and --resume auto continues bit for bit, a failed torchrun peer or a killed launcher
ends the other ranks quietly, and --resume auto finds the run whose options match. One section per problem."""

import glob
import os
import select
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import dataset_min  # noqa: E402
import edm_nets  # noqa: E402
import fid_min  # noqa: E402
import gdd  # noqa: E402
import safe_files  # noqa: E402
import sample_min  # noqa: E402
import toy  # noqa: E402
import train_min  # noqa: E402
import training_state  # noqa: E402
from edm_pickle import dump_edm_pickle  # noqa: E402
from test_fid import StandInDetector  # noqa: E402
from test_resume_hardening import one_line_error  # noqa: E402
from test_scale import _compare, _load, _setup  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES='')
UNCOND = dict(img_resolution=16, img_channels=3, label_dim=0, model_type='SongUNet', embedding_type='fourier',
              encoder_type='residual', decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
              model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """The tiny toy setup of test_scale (16x16, 10 classes), an unlabelled copy of its data, a tiny unconditional
    NCSN++ teacher (16 channels, not the paper's 128) and a conditional one-step generator."""
    d = tmp_path_factory.mktemp('robust')
    args = _setup(d)
    images, _ = toy.draw_toy_images(24, seed=0, resolution=16)
    dataset_min.save_dataset(str(d / 'unlabelled.zip'), images)
    torch.manual_seed(0)
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(edm_nets.EDMPrecond(**UNCOND))}, d / 'uncond.pt')
    G = gdd.generator_from_teacher(safe_files.load_network(str(d / 'teacher.pt')))
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(G)}, d / 'G.pt')
    return d, args


@pytest.fixture(autouse=True)
def one_thread():
    """One thread per process here and in the subprocesses: the same arithmetic, and fast on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def runs_in(outdir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(outdir), '0*')))


def stop_process(argv, ready, sig, timeout=180):
    """Run `python *argv`, send `sig` once ready(stdout so far) is true; (returncode, stdout, stderr)."""
    env = dict(ENV, OMP_NUM_THREADS=str(torch.get_num_threads()))     # CPU arithmetic depends on the threads
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, deadline = b'', time.time() + timeout
    try:
        while not ready(out.decode(errors='replace')):
            assert time.time() < deadline and proc.poll() is None, (out, proc.stderr.read())
            if select.select([proc.stdout], [], [], 0.05)[0]:
                out += os.read(proc.stdout.fileno(), 1 << 16)
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, (out + rest).decode(), err.decode()


def assert_stop_line(code, err, sig, text=''):
    lines = [line for line in err.splitlines() if line.strip()]
    name = {signal.SIGINT: 'SIGINT (Ctrl-C)', signal.SIGTERM: 'SIGTERM'}[sig]
    assert code == 128 + sig and len(lines) == 1 and lines[0].startswith(f'stopped by {name}') and text in lines[0], (code, err)
    return lines[0]

#----------------------------------------------------------------------------
# Only the toy preset draws its own data: a paper preset without --data (or with --data "") stops up front.

def test_paper_preset_needs_data(tmp_path):
    for argv in (['cifar10'], ['cifar10', '--data', ''], ['imagenet64', '--data', '']):
        msg = one_line_error(train_min.main, [*argv, '--outdir', str(tmp_path / 'runs')])
        assert f'preset {argv[0]} needs --data' in msg and 'dataset_min.py' in msg
    assert not (tmp_path / 'runs').exists()

#----------------------------------------------------------------------------
# Conditional presets need a conditional teacher (and the others an unconditional one); a conditional teacher
# needs labelled data whose classes it knows. A failed start leaves no run folder.

def test_conditioning_must_agree_before_any_work(files, tmp_path):
    d, args = files
    out = ['--outdir', str(tmp_path / 'runs')]
    common = ['--features', 'teacher', '--workers', '0', '--batch', '4', '--kimg', '0.004']
    msg = one_line_error(train_min.main, ['cifar10-cond', '--data', str(d / 'data.zip'), '--teacher', str(d / 'uncond.pt'), *common, *out])
    assert 'preset cifar10-cond is class-conditional (10 classes), the teacher' in msg and 'is unconditional' in msg
    msg = one_line_error(train_min.main, ['cifar10', '--data', str(d / 'data.zip'), '--teacher', str(d / 'teacher.pt'), *common, *out])
    assert 'preset cifar10 is unconditional' in msg and 'is class-conditional (10 classes)' in msg
    # A conditional teacher with an unlabelled dataset, or with labels beyond its classes.
    msg = one_line_error(train_min.main, [*args, '--data', str(d / 'unlabelled.zip'), *out])
    assert '(16, 3, 0), the teacher needs (16, 3, 10)' in msg
    images, _ = toy.draw_toy_images(8, seed=0, resolution=16)
    dataset_min.save_dataset(str(tmp_path / 'twelve.zip'), images, [0, 1, 2, 3, 4, 5, 6, 11])
    msg = one_line_error(train_min.main, [*args, '--data', str(tmp_path / 'twelve.zip'), *out])
    assert '(16, 3, 12), the teacher needs (16, 3, 10)' in msg
    assert runs_in(tmp_path / 'runs') == []         # no empty numbered folder from the failed starts

#----------------------------------------------------------------------------
# The generator takes the teacher's architecture; a difference from the paper's network is noted.

def test_teacher_architecture_is_the_teachers(files, tmp_path, capsys):
    d, _ = files
    train_min.main(['cifar10', '--data', str(d / 'unlabelled.zip'), '--teacher', str(d / 'uncond.pt'), '--features', 'teacher',
                    '--dwidth', '0.25', '--workers', '0', '--batch', '4', '--kimg', '0.004', '--tick', '0.004',
                    '--outdir', str(tmp_path / 'runs'), '--export', str(tmp_path / 'g.pt')])
    out = capsys.readouterr().out
    assert "note: the teacher differs from the paper's cifar10 network: model_channels=16 (paper: 128), " \
           "channel_mult=[1, 2] (paper: [2, 2, 2]); the generator takes the teacher's" in out
    G = sample_min.load_generator(str(tmp_path / 'g.pt'))
    assert isinstance(G, gdd.GDDPrecond) and G.init_kwargs['model_channels'] == 16 and G.label_dim == 0

#----------------------------------------------------------------------------
# --resume auto continues the run whose options match, not the newest folder of the preset.

def test_resume_auto_finds_the_matching_run(files, tmp_path, capsys):
    d, args = files
    base = [*args, '--outdir', str(tmp_path / 'runs'), '--tick', '0.004']
    train_min.main([*base, '--kimg', '0.008'])                          # 00000-toy: GDD-I
    train_min.main([*base, '--kimg', '0.008', '--freeze', '0'])         # 00001-toy: GDD, the newest
    capsys.readouterr()
    train_min.main([*base, '--kimg', '0.012', '--resume', 'auto'])
    assert 'resuming from ' + str(tmp_path / 'runs' / '00000-toy' / 'training-state-00000002.pt') in capsys.readouterr().out
    train_min.main([*base, '--kimg', '0.012', '--resume', 'auto', '--freeze', '0'])
    assert 'resuming from ' + str(tmp_path / 'runs' / '00001-toy' / 'training-state-00000002.pt') in capsys.readouterr().out
    for run in ('00000-toy', '00001-toy'):
        assert os.path.basename(training_state.training_states(str(tmp_path / 'runs' / run))[0]) == 'training-state-00000003.pt'
    # No run has these options: a new one starts; the note names the others and how to pick one, and never
    # suggests an override (that would continue another run).
    train_min.main([*base, '--kimg', '0.004', '--resume', 'auto', '--lr', '2e-3'])
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if line.startswith('note: --resume auto'))
    assert '00000-toy (lr=0.001 (now 0.002))' in note and '00001-toy (freeze=0 (now 1), lr=0.001 (now 0.002))' in note
    assert 'name it: --resume RUN_DIR' in note and 'override' not in note
    assert runs_in(tmp_path / 'runs') == ['00000-toy', '00001-toy', '00002-toy'] and 'resuming' not in out
    # Options that --resume-override names may differ.
    train_min.main([*base, '--kimg', '0.016', '--resume', 'auto', '--freeze', '0', '--lr', '2e-3', '--resume-override', 'lr'])
    assert 'resuming from ' + str(tmp_path / 'runs' / '00001-toy' / 'training-state-00000003.pt') in capsys.readouterr().out

#----------------------------------------------------------------------------
# A dataset.json that lists files the zip (or folder) does not hold: the copy is incomplete.

def test_dataset_json_listing_missing_images_is_refused(files, tmp_path):
    d, args = files
    with zipfile.ZipFile(d / 'data.zip') as src, zipfile.ZipFile(tmp_path / 'cut.zip', 'w') as dst:
        for info in src.infolist():
            if not info.filename.endswith(('img00000007.png', 'img00000009.png')):
                dst.writestr(info, src.read(info))
    with pytest.raises(ValueError, match=r'dataset.json lists 2 file\(s\) that .*cut.zip does not hold, e.g. 00000/img00000007.png'):
        dataset_min.ImageDataset(str(tmp_path / 'cut.zip'))
    images, labels = toy.draw_toy_images(3, seed=0, resolution=16)
    dataset_min.save_dataset(str(tmp_path / 'folder'), images, labels)
    os.remove(tmp_path / 'folder' / '00000' / 'img00000001.png')
    with pytest.raises(ValueError, match=r'lists 1 file\(s\) .* e.g. 00000/img00000001.png'):
        dataset_min.ImageDataset(str(tmp_path / 'folder'))
    assert 'does not hold' in one_line_error(train_min.main, [*args, '--data', str(tmp_path / 'cut.zip'), '--outdir', str(tmp_path / 'runs')])
    assert runs_in(tmp_path / 'runs') == []

#----------------------------------------------------------------------------
# Failures that used to come late come first; a state whose counters disagree is refused.

def test_late_failures_come_first(files, tmp_path, monkeypatch):
    d, args = files
    (tmp_path / 'bad-classifier.pt').write_bytes(b'not a network')
    (tmp_path / 'folder').mkdir()
    out = ['--outdir', str(tmp_path / 'runs')]
    msg = one_line_error(train_min.main, [*args, '--fd-images', '10', '--classifier', str(tmp_path / 'bad-classifier.pt'), *out])
    assert 'bad-classifier.pt' in msg
    assert 'is a folder; give a file name' in one_line_error(train_min.main, [*args, '--export', str(tmp_path / 'folder'), *out])
    assert not (tmp_path / 'runs').exists()
    # dataset_min.py --dest naming a folder: before any image is read.
    monkeypatch.setattr(dataset_min, 'convert', lambda *a, **k: pytest.fail('converted'))
    assert 'is a folder; give a file name' in one_line_error(dataset_min.main, ['--source', str(d), '--dest', str(tmp_path / 'folder')])


def test_training_state_counters_must_agree(files, tmp_path):
    d, args = files
    base = [*args, '--outdir', str(tmp_path / 'runs'), '--tick', '0.004']
    train_min.main([*base, '--kimg', '0.008'])
    run = tmp_path / 'runs' / '00000-toy'
    good = _load(run / 'training-state-00000002.pt')
    for edit in (dict(seen=10**12), dict(tick=5), dict(seen=12)):
        folder = tmp_path / f'bad{len(os.listdir(tmp_path))}'
        folder.mkdir()
        path = folder / 'training-state-00000002.pt'
        safe_files.save_torch({**good, **edit}, path)
        msg = one_line_error(train_min.main, [*base, '--kimg', '0.012', '--resume', str(path)])
        assert 'its counters disagree' in msg and str(path) in msg, msg
    # A run whose --batch changed on resume keeps consistent counters (batch_since), also on the next resume.
    train_min.main([*base, '--kimg', '0.016', '--resume', str(run), '--batch', '8', '--batch-gpu', '4', '--resume-override', 'batch'])
    state = _load(run / 'training-state-00000003.pt')
    assert (state['step'], state['seen'], state['config']['batch_since']) == (3, 16, [2, 8])
    train_min.main([*base, '--kimg', '0.024', '--resume', str(run), '--batch', '8', '--batch-gpu', '4'])
    assert _load(run / 'training-state-00000004.pt')['seen'] == 24


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_edm_nets_bench_on_cuda_without_cuda_is_one_line():
    r = subprocess.run([sys.executable, 'edm_nets.py', '--bench', '--device', 'cuda'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and (r.stdout + r.stderr).strip() == 'error: CUDA is not available; use --device cpu'

#----------------------------------------------------------------------------
# Ctrl-C (SIGINT) and SIGTERM: one line, exit status 130 / 143, nothing half-written; training names its last
# good state and the next --resume auto continues it bit for bit.

@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_training_stops_cleanly_and_resumes_bit_for_bit(files, tmp_path, sig):
    d, args = files
    argv = [*args, '--kimg', '0.1', '--tick', '0.012']      # 25 iterations, a state every 3
    train_min.main([*argv, '--outdir', str(tmp_path / 'whole')])
    outdir = tmp_path / 'stopped'
    run = outdir / '00000-toy'
    code, out, err = stop_process(['train_min.py', *argv, '--outdir', str(outdir)],
                                  lambda out: bool(training_state.training_states(str(run))), sig)
    newest = training_state.training_states(str(run))[0]
    line = assert_stop_line(code, err, sig, f'; the last good training state is {newest}; to continue, run the same '
                                            'command with --resume auto')
    assert int(newest[-11:-3]) < 25 and (run / 'log.txt').read_text().rstrip().endswith(line)
    assert not [n for n in os.listdir(run) if training_state.TEMP_RE.search(n)] and 'Traceback' not in out + err
    train_min.main([*argv, '--outdir', str(outdir), '--resume', 'auto'])
    _compare(_load(tmp_path / 'whole' / '00000-toy' / 'training-state-00000025.pt'),
             _load(run / 'training-state-00000025.pt'), exact=True)


def test_signal_during_a_state_write_waits_for_the_state(files, tmp_path, monkeypatch, capsys):
    # torch.save turns an exception raised in its writer into a RuntimeError; the stop must wait for the file
    # instead of becoming 'cannot write training state' (a disk failure).
    d, args = files
    save, sent = torch.save, []

    def save_and_signal(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get('format') == training_state.STATE_FORMAT and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save_and_signal)
    with pytest.raises(SystemExit) as e:
        train_min.main([*args, '--outdir', str(tmp_path / 'runs'), '--kimg', '0.012', '--tick', '0.004'])
    state = tmp_path / 'runs' / '00000-toy' / 'training-state-00000001.pt'
    assert e.value.code == 143 and training_state.read_training_state(str(state))['step'] == 1
    assert capsys.readouterr().err.strip() == f'stopped by SIGTERM; the last good training state is {state}; ' \
                                              'to continue, run the same command with --resume auto'
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL      # the handlers are put back


def test_sample_fid_dataset_and_toy_stop_cleanly(files, tmp_path):
    d, _ = files
    torch.jit.script(StandInDetector()).save(str(tmp_path / 'det.pt'))
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(8), sigma=np.eye(8))
    code, out, err = stop_process(['sample_min.py', '--net', str(d / 'G.pt'), '--seeds', '0-99999', '--batch', '8',
                                   '--outdir', str(tmp_path / 'png')], lambda out: '/100000 images' in out, signal.SIGINT)
    assert_stop_line(code, err, signal.SIGINT)
    pngs = glob.glob(str(tmp_path / 'png' / '*' / '*'))
    assert pngs and all(p.endswith('.png') for p in pngs) and out.endswith('\n')      # no temporary file left
    code, out, err = stop_process(['fid_min.py', 'calc', '--net', str(d / 'G.pt'), '--seeds', '0-99999', '--batch', '8',
                                   '--ref', str(tmp_path / 'ref.npz'), '--detector', str(tmp_path / 'det.pt')],
                                  lambda out: ' images' in out, signal.SIGTERM)
    assert_stop_line(code, err, signal.SIGTERM)
    (tmp_path / 'src').mkdir()
    for i in range(400):
        cli.save_png(np.full([3, 8, 8], i % 256, np.uint8), str(tmp_path / 'src' / f'{i:04d}.png'), fsync=False)
    code, out, err = stop_process(['dataset_min.py', '--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'out' / 'd.zip'),
                                   '--resolution', '512x512'], lambda out: ' images (' in out, signal.SIGINT)
    assert_stop_line(code, err, signal.SIGINT)
    assert not os.listdir(tmp_path / 'out')                     # neither the zip nor its temporary file
    code, out, err = stop_process(['toy.py', 'teacher', '--data', str(d / 'data.zip'), '--kimg', '1000', '--tick', '0.008',
                                   '--batch', '8', '--outdir', str(tmp_path / 'toy')], lambda out: 'kimg ' in out, signal.SIGINT)
    assert_stop_line(code, err, signal.SIGINT)

#----------------------------------------------------------------------------
# Under torchrun a failing rank prints the one cause; the other ends within a bounded time without a
# traceback. A rank whose launcher is killed stops.

def torchrun(tmp_path, script, argv, **popen):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--redirects', '3',
           '--log-dir', str(tmp_path / 'logs'), script, *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, OMP_NUM_THREADS='1'), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **popen)


def rank_output(tmp_path, rank, name):
    return ''.join(open(p).read() for p in glob.glob(str(tmp_path / 'logs' / '*' / 'attempt_0' / str(rank) / name)))


FAULTS = {   # run train_min.py with one fault: rank 1 meets a broken image, or rank 0 a full disk at its first state
    'image on rank 1': 'import dataset_min\nload, reads = dataset_min.ImageDataset._load, []\n'
                       'def broken(self, i):\n'
                       '    reads.append(i)\n'
                       '    if os.environ["RANK"] == "1" and len(reads) == 4:\n'
                       '        raise ValueError("cannot read image 00000/img00000005.png: broken PNG")\n'
                       '    return load(self, i)\n'
                       'dataset_min.ImageDataset._load = broken\n',
    'disk on rank 0': 'import torch\nsave = torch.save\n'
                      'def full(obj, f, *a, **k):\n'
                      '    if isinstance(obj, dict) and obj.get("format") == "gdd-min-training-state":\n'
                      '        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n'
                      '    return save(obj, f, *a, **k)\n'
                      'torch.save = full\n'}


@pytest.mark.parametrize('fault', FAULTS)
def test_failing_rank_gives_one_cause(files, tmp_path, fault):
    d, args = files
    script = tmp_path / 'faulty.py'
    script.write_text(f'import errno, os, runpy, sys\nsys.path.insert(0, {ROOT!r})\n{FAULTS[fault]}'
                      f'runpy.run_path({os.path.join(ROOT, "train_min.py")!r}, run_name="__main__")\n')
    t0 = time.time()
    proc = torchrun(tmp_path, str(script), [*args, '--outdir', str(tmp_path / 'runs'), '--kimg', '0.2', '--tick', '0.02'])
    assert proc.wait(timeout=240) != 0 and time.time() - t0 < 180
    err = [rank_output(tmp_path, r, 'stderr.log') for r in (0, 1)]
    errors = [line for e in err for line in e.splitlines() if line.startswith('error: ')]
    cause = 'cannot read image 00000/img00000005.png: broken PNG' if 'image' in fault else 'cannot write training state'
    assert len(errors) == 1 and cause in errors[0] and not any('Traceback' in e for e in err), err
    # Rank 0 may say that it stopped (torchrun's SIGTERM, or the broken collective); rank 1 says nothing more.
    others = [line for e in err for line in e.splitlines() if line.strip() and not line.startswith('error: ')]
    assert all(line.startswith('stopped') for line in others) and not rank_output(tmp_path, 1, 'stdout.log'), err


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='reads /proc')
def test_ranks_stop_when_the_launcher_is_killed(files, tmp_path):
    d, args = files
    run = tmp_path / 'runs' / '00000-toy'
    proc = torchrun(tmp_path, os.path.join(ROOT, 'train_min.py'), [*args, '--outdir', str(tmp_path / 'runs'), '--kimg', '100',
                                                                   '--tick', '0.004'], start_new_session=True)
    parent = lambda pid: int(open(f'/proc/{pid}/stat').read().rpartition(')')[2].split()[1])
    alive = lambda pid: os.path.exists(f'/proc/{pid}') and open(f'/proc/{pid}/stat').read().rpartition(')')[2].split()[0] != 'Z'
    try:
        deadline = time.time() + 180
        while not training_state.training_states(str(run)):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        ranks = [int(p) for p in os.listdir('/proc') if p.isdigit() and os.path.exists(f'/proc/{p}/stat') and parent(p) == proc.pid]
        assert len(ranks) == 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)         # the launcher's whole process group, as a scheduler does
        proc.wait()
    deadline = time.time() + 60
    while any(map(alive, ranks)) and time.time() < deadline:
        time.sleep(0.1)
    left = [pid for pid in ranks if alive(pid)]
    for pid in left:                                # a failed test leaves no rank training on
        os.kill(pid, signal.SIGKILL)
    assert not left
    newest = training_state.training_states(str(run))[0]
    assert (run / 'log.txt').read_text().rstrip().endswith(
        f'stopped: the torchrun launcher is gone; the last good training state is {newest}; to continue, run the same '
        'command with --resume auto')

#----------------------------------------------------------------------------
# CPU arithmetic depends on the threads per process: the log says how many. Ticks under 1 kimg: every
# snapshot keeps its own name and progress is readable. --bench says it writes nothing.

def test_small_ticks_keep_every_snapshot(files, tmp_path, capsys):
    d, args = files
    train_min.main([*args, '--outdir', str(tmp_path / 'runs'), '--kimg', '0.012', '--tick', '0.004', '--snap', '1'])
    run = tmp_path / 'runs' / '00000-toy'
    assert sorted(os.path.basename(p) for p in glob.glob(str(run / 'network-snapshot-*'))) == \
        ['network-snapshot-000000.004.pt', 'network-snapshot-000000.008.pt', 'network-snapshot-000000.012.pt']
    assert len(glob.glob(str(run / 'samples-000000.0??.png'))) == 3
    out = capsys.readouterr().out
    assert 'kimg    0.004  ' in out and 'Training done: 3 iterations, 0.012 kimg' in out
    assert f'device cpu, {torch.get_num_threads()} threads per process' in out
    assert training_state.kimg_name(5_000_000, 25) == '005000' and training_state.kimg_name(72, 0.004) == '000000.072'
    train_min.main(['toy', '--bench', '1', '--batch', '2', '--outdir', str(tmp_path / 'bench')])
    out = capsys.readouterr().out
    assert 'Preset toy, benchmark (writes nothing), device cpu' in out and 'run directory None' not in out


def test_workers_at_most_the_cores():
    assert train_min.parse_args(['toy', '--workers', '512']).workers == cli.cpu_count()
    assert train_min.parse_args(['cifar10', '--workers', '1']).workers == 1

#----------------------------------------------------------------------------
# Toy-only options are not offered by the paper presets; --check reads every network format; --npz of a
# conditional network stores the classes; the old edm_nets.py --load names the new command.

def test_paper_presets_offer_no_toy_options(capsys):
    for preset, shown in (('cifar10', False), ('toy', True)):
        with pytest.raises(SystemExit):
            train_min.parse_args([preset, '--help'])
        out = capsys.readouterr().out
        assert ('--fd-images' in out) == shown and ('--classifier' in out) == shown and '--data' in out
    with pytest.raises(SystemExit) as e:
        train_min.parse_args(['cifar10', '--fd-images', '10'])
    assert e.value.code == 2 and 'unrecognized arguments: --fd-images' in capsys.readouterr().err
    assert train_min.parse_args(['cifar10']).fd_images == 0


def test_check_reads_checkpoints_and_pickles(files, tmp_path, capsys):
    d, _ = files
    official = sample_min.load_generator(str(d / 'G.pt'))
    G = official
    unet = {k: v for k, v in G.init_kwargs.items() if k not in ('img_channels', 'use_fp16', 'sigma_data', 'eps', 'model_type')}
    official.model.init_kwargs = dict(unet, in_channels=3, out_channels=3)     # as EDM's files record the U-Net's kwargs
    dump_edm_pickle({'ema': official}, str(tmp_path / 'd2o.pkl'), class_name='D2OPrecond')
    dump_edm_pickle({'ema': safe_files.load_network(str(d / 'uncond.pt'))}, str(tmp_path / 'edm.pkl'))
    for name, kind in (('G.pt', 'one-step generator (GDDPrecond), 16x16x3, label_dim 10'),
                       ('d2o.pkl', 'one-step generator (GDDPrecond), 16x16x3, label_dim 10'),
                       ('edm.pkl', 'teacher (EDMPrecond), 16x16x3, label_dim 0')):
        path = d / name if name == 'G.pt' else tmp_path / name
        sample_min.main(['--net', str(path), '--check'])
        assert f'{path}: {kind}' in capsys.readouterr().out
    r = subprocess.run([sys.executable, 'edm_nets.py', '--load', str(d / 'G.pt')], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and (r.stdout + r.stderr).strip() == f'error: this check moved; run: python sample_min.py --net {d / "G.pt"} --check'


def test_npz_of_a_conditional_net_stores_the_classes(files, tmp_path):
    d, _ = files
    sample_min.main(['--net', str(d / 'G.pt'), '--seeds', '0-9', '--npz', str(tmp_path / 's.npz')])
    sample_min.main(['--net', str(d / 'G.pt'), '--seeds', '0-9', '--class', '3', '--npz', str(tmp_path / 'c.npz')])
    with np.load(tmp_path / 's.npz') as f, np.load(tmp_path / 'c.npz') as g:
        assert f['images'].shape == (10, 16, 16, 3) and list(f['seeds']) == list(range(10)) and list(g['labels']) == [3] * 10
        # The class each seed draws (EDM's generate.py: after the latents, from the seed's generator).
        want = [sample_min.SeededRandom([s], 'cpu').generators[0] for s in range(10)]
        want = [(torch.randn([3, 16, 16], generator=r), int(torch.randint(10, [], generator=r)))[1] for r in want]
        assert f['labels'].dtype == np.int64 and list(f['labels']) == want
    assert len(safe_files.NpzImages(str(tmp_path / 's.npz'))) == 10      # fid_min.py calc --images still reads it


def test_progress_under_torchrun_says_whose_count(files, tmp_path, capsys):
    d, _ = files
    args = sample_min.argparse.Namespace(net=str(d / 'G.pt'), seeds=list(range(6)), batch=4, class_idx=None, steps=18,
                                         outdir=None, grid=None, npz=str(tmp_path / 's.npz'))
    sample_min._sample(args, 0, 2, torch.device('cpu'))      # rank 0 of 2 (no process group: gathers its own)
    out = capsys.readouterr().out
    assert '\r3/3 images of rank 0 (6 on 2 processes)' in out


def test_failed_toy_start_leaves_no_folder(tmp_path):
    msg = one_line_error(toy.main, ['teacher', '--data', str(tmp_path / 'missing.zip'), '--outdir', str(tmp_path / 'runs')])
    assert 'missing.zip' in msg and runs_in(tmp_path / 'runs') == []


def test_small_fid_is_quiet_and_a_short_image_set_names_num(tmp_path):
    # FID of fewer images than features: singular covariances, no LinAlgWarning for a newcomer to read as an error.
    rng = np.random.RandomState(0)
    a, b = rng.randn(20, 64), rng.randn(20, 64) + 0.1
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fid = fid_min.frechet_distance(*fid_min.feature_stats(a), *fid_min.feature_stats(b))
    assert np.isfinite(fid) and fid > 0
    # Fewer images than --num (the protocol's 50,000 by default): the error says which option to change.
    np.savez(tmp_path / 'few.npz', images=rng.randint(0, 256, [3, 8, 8, 3]).astype(np.uint8))
    with pytest.raises(ValueError, match=r'has 3 images, fewer than --num 50000 .*--num 3 measures all of them'):
        next(fid_min.image_batches(str(tmp_path / 'few.npz'), 50000))


def test_dataset_check_holds_without_labels_and_folder_writes_are_atomic(tmp_path, monkeypatch):
    # fid_min.py ref reads a dataset without its labels: an incomplete copy is still refused.
    images, labels = toy.draw_toy_images(3, seed=0, resolution=16)
    dataset_min.save_dataset(str(tmp_path / 'folder'), images, labels)
    os.remove(tmp_path / 'folder' / '00000' / 'img00000002.png')
    with pytest.raises(ValueError, match=r'lists 1 file\(s\) .* e.g. 00000/img00000002.png'):
        dataset_min.ImageDataset(str(tmp_path / 'folder'), use_labels=False)
    # A folder write that fails halfway leaves neither the folder nor its temporary copy.
    calls = []
    def failing_png(x):
        calls.append(1)
        if len(calls) == 2:
            raise OSError('disk full')
        return b'png'
    monkeypatch.setattr(dataset_min, 'encode_png', failing_png)
    with pytest.raises(OSError, match='disk full'):
        dataset_min.save_dataset(str(tmp_path / 'half'), images, labels)
    assert sorted(os.listdir(tmp_path)) == ['folder']


def test_fid_options_fail_in_one_line(tmp_path):
    rng = np.random.RandomState(0)
    np.savez(tmp_path / 'x.npz', images=rng.randint(0, 256, [12, 8, 8, 3]).astype(np.uint8))
    for argv, expected in (
            (['bench', '--num', '1', '--metrics', 'fid'], '--num must be >= 2'),
            (['bench', '--num', '5', '--metrics', 'fid,is'], '--num must be >= 10'),
            (['bench', '--num', '3', '--metrics', 'pr'], '--num must be >= 4'),
            (['bench', '--pr-num', '-1'], '--pr-num must be 0'),
            (['bench', '--pr-num', '2'], '--pr-num must be 0'),
            (['bench', '--batch', '0'], '--batch must be >= 1'),
            (['calc', '--images', str(tmp_path / 'x.npz'), '--seeds', '0-9', '--ref', 'r.npz'], '--seeds chooses'),
    ):
        assert expected in one_line_error(fid_min.main, argv), argv
    # Fewer images than processes: each rank must have a share, or the others wait for it forever.
    args = fid_min.argparse.Namespace(cmd='calc', images=str(tmp_path / 'x.npz'), net=None, seeds=None, num=2,
                                      metrics=['fid'], batch=4, json=None, ref='r.npz')
    with pytest.raises(ValueError, match='2 images are fewer than the 3 processes'):
        fid_min.run_command(args, 0, 3, 'cpu')
    args = fid_min.argparse.Namespace(cmd='ref', data=str(tmp_path / 'x.npz'), dest=str(tmp_path / 'r.npz'),
                                      metrics=['fid'], pr_num=50000, batch=4)
    with pytest.raises(ValueError, match='has 12 images, fewer than the 16 processes'):
        fid_min.run_command(args, 0, 16, 'cpu')
    # The npz image reader lets go of its file.
    images = safe_files.NpzImages(str(tmp_path / 'x.npz'))
    assert images[11].shape == (3, 8, 8)
    images.close()
    assert images.npz.file.closed


def test_toy_device_is_checked_first(tmp_path):
    msg = one_line_error(toy.main, ['teacher', '--device', 'tpu', '--outdir', str(tmp_path / 'runs')])
    assert "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'" in msg and runs_in(tmp_path / 'runs') == []


def test_backbone_weights_name_a_pretrained_feature_network(tmp_path):
    # The toy preset's feature network is the teacher's own encoder: there is no weight file to give it.
    msg = one_line_error(train_min.main, ['toy', '--backbone-weights', 'teacher=x.pt', '--outdir', str(tmp_path / 'runs')])
    assert '--backbone-weights must be NAME=PATH_OR_URL with NAME a pretrained network of --features' in msg
    assert runs_in(tmp_path / 'runs') == []
