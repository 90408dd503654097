"""Hardening of training states, resume and the command lines: checksummed states with
fallback, refused trajectory changes and --resume-override, the run-folder lock, leftover temporary files,
malformed states, the NaN stop, a full disk, up-front option checks, and one `error:` line per CLI failure."""

import errno
import io
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)
import fid_min  # noqa: E402
import gdd  # noqa: E402
import sample_min  # noqa: E402
import train_min  # noqa: E402
from test_scale import _compare, _load, _setup  # noqa: E402
import cli  # noqa: E402
import safe_files  # noqa: E402
import training_state  # noqa: E402


def one_line_error(call, *args):
    """Run call(*args); it must stop with SystemExit('error: <one line>'). Returns the line."""
    with pytest.raises(SystemExit) as e:
        call(*args)
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg and 'Traceback' not in msg, msg
    return msg


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A finished 2-iteration toy run (16x16, batch 4) with a training state after each iteration."""
    tmp = tmp_path_factory.mktemp('hardening')
    args = [*_setup(tmp), '--tick', '0.004']
    train_min.main([*args, '--outdir', str(tmp / 'a'), '--kimg', '0.008'])
    return tmp, args, tmp / 'a' / '00000-toy'


def copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest)
    os.remove(dest / training_state.LOCK_NAME)
    return dest


def flip_byte_in_largest_tensor(path):
    with zipfile.ZipFile(path) as z:
        member = max(z.infolist(), key=lambda m: m.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack('<HH', data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))

#----------------------------------------------------------------------------
# Checksums: every state has a SHA-256 sidecar; a flipped byte is caught before torch.load.

def test_flipped_byte_is_detected_and_the_previous_state_used(run, tmp_path, capsys):
    tmp, args, run_a = run
    assert [os.path.basename(p) for p in training_state.training_states(str(run_a))] == \
        ['training-state-00000002.pt', 'training-state-00000001.pt']
    for p in training_state.training_states(str(run_a)):
        assert open(p + '.sha256').read() == f'{training_state.file_sha256(p)}  {os.path.basename(p)}\n'
    good = _load(run_a / 'training-state-00000002.pt')
    run_b = copy_run(run_a, tmp_path / 'b' / '00000-toy')
    newest = run_b / 'training-state-00000002.pt'
    flip_byte_in_largest_tensor(newest)
    torch.load(newest, map_location='cpu', weights_only=True)        # torch.load itself does not notice
    path, _ = training_state.find_training_state(str(run_b), str(tmp_path), 'toy')
    assert path == str(run_b / 'training-state-00000001.pt')
    assert 'note: skipping' in capsys.readouterr().out
    assert 'SHA-256 differs' in one_line_error(training_state.find_training_state, str(newest), str(tmp_path), 'toy')
    # Without its sidecar (an older version's state) the zip CRC-32 still catches it; an intact one is used.
    os.remove(str(newest) + '.sha256')
    assert 'fails its CRC-32 check' in one_line_error(training_state.find_training_state, str(newest), str(tmp_path), 'toy')
    os.remove(run_b / 'training-state-00000001.pt.sha256')
    training_state.find_training_state(str(run_b / 'training-state-00000001.pt'), str(tmp_path), 'toy')
    assert 'the CRC-32 of each zip member checked out' in capsys.readouterr().out
    # --resume auto falls back to the intact state and recomputes the damaged one bit for bit.
    train_min.main([*args, '--outdir', str(tmp_path / 'b'), '--kimg', '0.008', '--resume', 'auto'])
    assert 'resuming from ' + str(run_b / 'training-state-00000001.pt') in (run_b / 'log.txt').read_text()
    _compare(good, _load(newest), exact=True)
    assert training_state.file_sha256(str(newest)) == open(str(newest) + '.sha256').read().split()[0]

#----------------------------------------------------------------------------
# Resume refuses every option that changes the trajectory, unless --resume-override names it.

def test_changed_trajectory_options_are_refused_unless_overridden(run, tmp_path):
    tmp, args, run_a = run
    run_b = copy_run(run_a, tmp_path / 'b' / '00000-toy')
    shutil.copy(tmp / 'data.zip', tmp_path / 'moved-data.zip')
    shutil.copy(tmp / 'teacher.pt', tmp_path / 'moved-teacher.pt')
    resume = [*args, '--outdir', str(tmp_path / 'b'), '--kimg', '0.012', '--resume', str(run_b)]
    for change, text in [(['--r1-gamma', '0.5'], 'r1_gamma=0.01 (now 0.5)'), (['--ema', '0.1'], 'ema=0.5 (now 0.1)'),
                         (['--batch-gpu', '2'], 'batch_gpu=4 (now 2)'), (['--xflip', 'true'], 'xflip=False (now True)'),
                         (['--data', str(tmp_path / 'moved-data.zip')], 'moved-data.zip'),
                         (['--teacher', str(tmp_path / 'moved-teacher.pt')], 'moved-teacher.pt'),
                         (['--lr', '2e-3'], 'lr=0.001 (now 0.002)'), (['--seed', '1'], 'seed=42 (now 1)')]:
        msg = one_line_error(train_min.main, [*resume, *change])
        assert text in msg and '--resume-override' in msg, msg
    # 0 = derived: the effective per-process batch is what counts, so saying it explicitly is no change.
    assert 'batch_gpu' not in one_line_error(train_min.main, [*resume, '--batch-gpu', '4', '--ema', '0.1'])
    assert 'cannot be overridden' in one_line_error(train_min.main, [*resume, '--resume-override', 'cres'])
    # Leftovers of a killed run are removed at the next start (the lock is held, so none is being written).
    junk = ['.training-state-00000003.pt.tmp4242', '.training-state-00000003.pt.sha256.tmp4242', 'stats.jsonl.tmp',
            'samples-000000.png.tmp4242.png', 'metrics.json.tmp', 'training-state-00000000.pt.sha256']
    for name in junk:
        (run_b / name).write_bytes(b'partial')
    train_min.main([*resume, '--r1-gamma', '0.5', '--lr', '2e-3', '--data', str(tmp_path / 'moved-data.zip'),
                    '--resume-override', 'r1_gamma,lr,data'])
    log = (run_b / 'log.txt').read_text()
    assert "note: --resume-override r1_gamma: 0.01 -> 0.5 from iteration 2 on" in log
    assert 'note: --resume-override lr: 0.001 -> 0.002' in log and 'moved-data.zip' in log
    assert 'note: removed 6 file(s)' in log and not any((run_b / name).exists() for name in junk)
    state = _load(run_b / 'training-state-00000003.pt')
    assert state['config']['r1_gamma'] == 0.5 and state['opt_G']['param_groups'][0]['lr'] == 2e-3   # the new rate is used

#----------------------------------------------------------------------------
# One training process per run folder.

def test_second_process_in_a_run_folder_is_refused(run, tmp_path):
    tmp, args, run_a = run
    run_b = copy_run(run_a, tmp_path / 'b' / '00000-toy')
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, training_state; lock = training_state.RunLock(); '
                               'lock.hold(sys.argv[1]); print("locked", flush=True); sys.stdin.read()', str(run_b)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        for resume in ('auto', str(run_b), str(run_b / 'training-state-00000002.pt')):
            msg = one_line_error(train_min.main, [*args, '--outdir', str(tmp_path / 'b'), '--kimg', '0.012', '--resume', resume])
            assert f'run folder {run_b} is in use by process {holder.pid} on ' in msg, msg
    finally:
        holder.kill()                           # a killed holder's lock goes with it
        holder.wait()
    lock = training_state.RunLock()
    lock.hold(str(run_b))
    assert lock.folder == str(run_b)
    lock.release()

#----------------------------------------------------------------------------
# A state that is intact but malformed: one line naming the state and the problem.

def test_malformed_states_are_one_line_errors(run, tmp_path):
    tmp, args, run_a = run
    base = _load(run_a / 'training-state-00000002.pt')
    g_name = next(n for n, t in base['G'].items() if t.ndim == 4)
    p0 = next(iter(base['opt_G']['state']))

    def bad(edit):
        state = {**base, 'G': dict(base['G']), 'opt_G': {'state': {k: dict(v) for k, v in base['opt_G']['state'].items()},
                                                         'param_groups': base['opt_G']['param_groups']}}
        edit(state)
        return state
    cases = [(lambda s: s.pop('opt_D'), 'missing opt_D'),
             (lambda s: s.update(step=2.0), 'step must be an integer'),
             (lambda s: s.update(latent_gen=base['latent_gen'].float()), 'latent_gen must be a torch.Generator state'),
             (lambda s: s.update(latent_gen=base['latent_gen'][:100]), 'latent_gen holds 100 bytes'),
             (lambda s: s['G'].update({g_name: s['G'][g_name][:1]}), f'G: {g_name} is torch.float32 [1,'),
             (lambda s: s['G'].update({g_name: s['G'][g_name].double()}), 'torch.float64'),
             (lambda s: s['G'].pop(g_name), f'G: missing {g_name}'),
             (lambda s: s['G'].update({g_name: torch.full_like(s['G'][g_name], float('nan'))}), 'NaN or inf'),
             (lambda s: s['opt_G']['state'][p0].update(exp_avg=torch.zeros(3)), f'opt_G: exp_avg of parameter {p0} is'),
             (lambda s: s.update(config={**s['config'], 'lr': torch.zeros(3)}), 'lr are not plain values'),
             (lambda s: s.update(format='something else'), 'not a gdd-min training state')]
    for i, (edit, text) in enumerate(cases):
        folder = tmp_path / f'r{i}' / '00000-toy'
        folder.mkdir(parents=True)
        safe_files.save_torch(bad(edit), folder / 'training-state-00000002.pt')
        msg = one_line_error(train_min.main, [*args, '--outdir', str(tmp_path / f'r{i}'), '--kimg', '0.012',
                                              '--resume', str(folder / 'training-state-00000002.pt')])
        assert text in msg and 'training-state-00000002.pt' in msg, (text, msg)
        assert not (folder / 'training-state-00000003.pt').exists()

#----------------------------------------------------------------------------
# NaN losses for a whole tick stop the run; nothing of that tick is written.

def test_nan_tick_stops_the_run_keeping_the_last_good_state(run, tmp_path, monkeypatch):
    tmp, args, _ = run
    train_step, poison = gdd.train_step, {}

    def nan_train_step(G, D, opt_G, opt_D, chunks, step, *a, **k):
        stats = train_step(G, D, opt_G, opt_D, chunks, step, *a, **k)
        if poison.get('params') == step:
            with torch.no_grad():
                next(p for p in G.parameters() if p.requires_grad).fill_(float('nan'))
        if step in poison.get('losses', ()):
            stats = {key: v * float('nan') for key, v in stats.items()}
        return stats
    monkeypatch.setattr(gdd, 'train_step', nan_train_step)
    # Ticks of 2 iterations: one NaN iteration in tick 1 is only a warning; tick 2 is all NaN -> stop.
    poison.update(losses={1, 2, 3})
    msg = one_line_error(train_min.main, [*args, '--outdir', str(tmp_path / 'n'), '--kimg', '0.024', '--tick', '0.008'])
    run_n = tmp_path / 'n' / '00000-toy'
    assert 'the losses were NaN/inf in every iteration of the tick' in msg and 'tick 2' in msg
    assert f'the last good training state is {run_n / "training-state-00000002.pt"}' in msg
    assert [os.path.basename(p) for p in training_state.training_states(str(run_n))] == ['training-state-00000002.pt']
    assert not list(run_n.glob('network-snapshot-*')) and not list(run_n.glob('samples-*'))
    log = (run_n / 'log.txt').read_text()
    assert 'warning: non-finite losses in 50% of the iterations of tick 1' in log and log.rstrip().endswith(msg)
    assert all(torch.isfinite(t).all() for t in _load(run_n / 'training-state-00000002.pt')['G'].values())
    # Parameters that turned NaN mid-tick: stop at that tick's end, before its state is written.
    poison.clear()
    poison.update(params=1)
    msg = one_line_error(train_min.main, [*args, '--outdir', str(tmp_path / 'p'), '--kimg', '0.016', '--tick', '0.004'])
    run_p = tmp_path / 'p' / '00000-toy'
    assert 'parameters became NaN/inf' in msg and str(run_p / 'training-state-00000001.pt') in msg
    assert [os.path.basename(p) for p in training_state.training_states(str(run_p))] == ['training-state-00000001.pt']


#----------------------------------------------------------------------------
# A full disk while a state is written: one line, the earlier state intact, no temporary file left.

def test_disk_full_during_state_write(run, tmp_path, monkeypatch):
    tmp, args, run_a = run
    run_b = copy_run(run_a, tmp_path / 'b' / '00000-toy')
    save = torch.save

    def full_disk_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get('format') == training_state.STATE_FORMAT:
            f.write(b'PK\x03\x04' + b'\0' * 5000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', full_disk_save)
    msg = one_line_error(train_min.main, [*args, '--outdir', str(tmp_path / 'b'), '--kimg', '0.012', '--resume', 'auto'])
    assert f'cannot write training state {run_b / "training-state-00000003.pt"}: No space left on device' in msg
    assert not [n for n in os.listdir(run_b) if training_state.TEMP_RE.search(n)]
    assert [os.path.basename(p) for p in training_state.training_states(str(run_b))][0] == 'training-state-00000002.pt'
    training_state.read_training_state(str(run_b / 'training-state-00000002.pt'))     # checksum still verifies

#----------------------------------------------------------------------------
# Bad command lines fail before any work, in one line.

def test_bad_train_options_fail_up_front(run, tmp_path):
    tmp, args, _ = run
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'folder').mkdir()
    out = ['--outdir', str(tmp_path / 'runs')]
    cases = [(['--batch', '0'], '--batch must be >= 1'), (['--batch-gpu', '-1'], '--batch-gpu must be >= 0'),
             (['--kimg', 'inf'], '--kimg must be finite'), (['--kimg', 'nan'], '--kimg must be finite'),
             (['--kimg', '0'], '--kimg must be finite'), (['--tick', '0'], '--tick must be finite and > 0'),
             (['--lr', 'nan'], '--lr must be finite'), (['--dlr', '-1'], '--dlr must be finite and >= 0'),
             (['--r1-gamma', 'inf'], '--r1-gamma must be finite'), (['--ema', '-0.5'], '--ema must be finite'),
             (['--freeze', '4'], '--freeze must be one of [0, 1, 2, 3]'), (['--cres', '1,x'], '--cres must be'),
             (['--features', 'teacher,resnet'], '--features must be'), (['--device', 'gpu0'], '--device must be'),
             (['--seed', '-1'], '--seed must be in'), (['--resume', 'auto', '--bench', '1'], 'exclude each other'),
             (['--resume-override', 'arch'], 'arch cannot be overridden'),
             (['--outdir', str(tmp_path / 'file')], 'is a file, not a folder'),
             (['--export', str(tmp_path / 'folder')], 'is a folder; give a file name'),
             (['--export', str(tmp_path / 'file' / 'sub' / 'g.pt')], 'is a file, not a folder')]
    if not torch.cuda.is_available():
        cases.append((['--device', 'cuda'], 'CUDA is not available; use --device cpu'))
    for argv, text in cases:
        msg = one_line_error(train_min.main, [*args, '--kimg', '0.004', *out, *argv])
        assert text in msg, (argv, msg)
    assert not (tmp_path / 'runs').exists()     # nothing was trained or written


def test_bad_sample_and_fid_options_fail_up_front(tmp_path):
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'folder').mkdir()
    for argv, text in [(['--batch', '0'], '--batch must be >= 1'), (['--steps', '1'], '--steps must be in 2..'),
                       (['--steps', str(10**6)], '--steps must be in 2..'),
                       (['--grid', str(tmp_path / 'folder')], 'is a folder'), (['--npz', str(tmp_path / 'folder')], 'is a folder'),
                       (['--outdir', str(tmp_path / 'file')], 'is a file, not a folder'),
                       (['--grid', str(tmp_path / 'file' / 'g.png')], 'is a file, not a folder'),
                       (['--class', str(10**7), '--seeds', '0', '--grid', str(tmp_path / 'g.png')], 'out of range')]:
        assert text in one_line_error(sample_min.main, argv), argv
    assert not (tmp_path / 'g.png').exists()
    for argv, text in [(['ref', '--data', 'd', '--dest', str(tmp_path / 'folder')], 'is a folder'),
                       (['ref', '--data', 'd', '--dest', str(tmp_path / 'file' / 'r.npz')], 'is a file, not a folder'),
                       (['ref', '--data', 'd', '--dest', str(tmp_path / 'r.npz'), '--batch', '0'], '--batch must be >= 1'),
                       (['calc', '--images', 'x', '--ref', 'r.npz', '--num', '1'], '--num must be >= 2'),
                       (['calc', '--net', 'x', '--ref', 'r.npz', '--steps', '1'], '--steps must be in 2..')]:
        assert text in one_line_error(fid_min.main, argv), argv


def test_cli_errors_one_line_for_expected_errors_traceback_for_bugs(tmp_path):
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ValueError('cannot read image 00000/img00000000.png: broken PNG')
    with pytest.raises(SystemExit, match=r'^error: cannot read image 00000/img00000000.png: broken PNG$'):
        with cli.cli_errors():
            next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))   # wrapped in the worker's traceback
    (tmp_path / 'hostile.pt').write_bytes(_hostile_torch_file())
    msg = one_line_error(_load_in_cli, tmp_path / 'hostile.pt')
    assert 'weights_only' in msg and 'system' in msg
    assert one_line_error(_raise_in_cli, OSError(errno.ENOSPC, 'No space left on device', '/x/y.pt')) == \
        'error: No space left on device: /x/y.pt'
    assert one_line_error(_raise_in_cli, MemoryError()) == 'error: out of memory'
    for bug in (TypeError('unsupported operand'), AssertionError('shape'), KeyError('G')):
        with pytest.raises(type(bug)):
            _raise_in_cli(bug)


class Hostile:
    def __reduce__(self):
        return os.system, ('echo pwned',)


def _hostile_torch_file():
    buf = io.BytesIO()
    torch.save(Hostile(), buf)
    return buf.getvalue()


def _load_in_cli(path):
    with cli.cli_errors():
        torch.load(path, weights_only=True)


def _raise_in_cli(error):
    with cli.cli_errors():
        raise error


def test_clis_print_one_error_line_and_no_traceback(tmp_path):
    (tmp_path / 'folder').mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES='')
    for argv in (['train_min.py', 'toy', '--export', str(tmp_path / 'folder')], ['sample_min.py', '--grid', str(tmp_path / 'folder')],
                 ['fid_min.py', 'ref', '--data', 'd', '--dest', str(tmp_path / 'folder')]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        lines = (r.stdout + r.stderr).strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: '), (argv, r.stdout, r.stderr)
    assert os.listdir(tmp_path) == ['folder']
