"""Tests for training at scale: the loss reduction under gradient accumulation, multi-process training (gloo on
CPU) against one process, exact resume, refusal of cut-off training states, and --bench."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)
import edm_nets
import gdd
import train_min
from test_gdd import tiny_teacher
import dataset_min
import safe_files
import toy
import training_state

#----------------------------------------------------------------------------
# The reduction: splitting a batch into chunks changes nothing when D's logits are per-image functions.

def test_accumulation_equals_one_call():
    # With the heads' BatchNorm in eval mode (fixed statistics) each image's logits depend on that image only,
    # so one call of 4 images and two calls of 2 must give the same G, D and R1 updates: the chunk factors
    # (loss_batch / B, 1 / B) make the gradients independent of the split, and every chunk starts from the same
    # spectral-norm vectors.
    runs = []
    for split in ([4], [2, 2], [1, 3]):
        teacher = tiny_teacher()
        G = gdd.generator_from_teacher(teacher).train()
        params, _, _ = gdd.freeze_generator(G, 1, verbose=False)
        torch.manual_seed(0)
        D = gdd.build_discriminator(['teacher'], teacher, label_dim=10, width=0.125, cout=8).train()
        for m in D.heads.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        # Plain SGD: Adam's first steps are ~ lr * sign(gradient), which turns rounding noise on near-zero
        # gradient entries into differences of 2 lr; SGD keeps the comparison one of gradients.
        opt_G, opt_D = torch.optim.SGD(params, lr=1e-3), torch.optim.SGD(D.heads.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        x, zg, zd = (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3))
        c = torch.eye(10)[[1, 2, 3, 4]]
        reduced = []
        for step in (15, 16):                   # a plain iteration, then one with the R1 step
            parts = [t.split(split) for t in (x, c, zg, zd)]
            stats = gdd.train_step(G, D, opt_G, opt_D, list(zip(*parts)), step, 1e-2, loss_scale=64 / 4, r1_scale=1 / 4,
                                   reduce_grads=lambda ps: reduced.append({id(p) for p in ps}))
        # Only what the optimizers update is ever reduced across ranks: no frozen parameter.
        trainable = {id(p) for p in params} | {id(p) for p in D.heads.parameters()}
        assert reduced and all(r <= trainable for r in reduced) and {id(p) for p in params} in reduced
        runs.append((G, D, stats))
    (G0, D0, s0), *others = runs
    for G1, D1, s1 in others:
        for a, b in zip([*G0.parameters(), *D0.heads.parameters()], [*G1.parameters(), *D1.heads.parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        for k in s0:
            torch.testing.assert_close(s0[k], s1[k], rtol=1e-4, atol=1e-6)

#----------------------------------------------------------------------------
# Training runs: a tiny 16x16 toy setup (toy architecture with two levels, teacher features).

def _setup(tmp_path):
    images, labels = toy.draw_toy_images(24, seed=0, resolution=16)
    dataset_min.save_dataset(str(tmp_path / 'data.zip'), images, labels)
    torch.manual_seed(0)
    cfg = train_min.parse_args(['toy', '--cres', '1,2'])
    net = edm_nets.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, **train_min.arch_kwargs(cfg))
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(net)}, tmp_path / 'teacher.pt')
    return ['toy', '--cres', '1,2', '--data', str(tmp_path / 'data.zip'), '--teacher', str(tmp_path / 'teacher.pt'),
            '--fd-images', '0', '--workers', '0', '--batch', '4', '--state', '1']


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _compare(a, b, exact):
    """Training states a and b: generator, EMA, discriminator parameters and both optimizers' states."""
    assert (a['step'], a['seen']) == (b['step'], b['seen'])
    check = (lambda x, y: torch.equal(x, y)) if exact else \
        (lambda x, y: torch.allclose(x.double(), y.double(), rtol=1e-4, atol=1e-6))
    for key in ('G', 'G_ema', 'D'):
        for name, t in a[key].items():
            if key == 'D' and ('running_' in name or 'num_batches' in name) and not exact:
                continue    # BatchNorm running statistics are per rank and never used (D is always in train mode)
            assert check(t, b[key][name]), (key, name, (t.double() - b[key][name].double()).abs().max())
    for key in ('opt_G', 'opt_D'):
        for i, s in a[key]['state'].items():
            for name, t in s.items():
                assert check(t, b[key]['state'][i][name]), (key, i, name)
    if exact:
        assert torch.equal(a['latent_gen'], b['latent_gen'])


def test_resume_continues_bit_for_bit(tmp_path):
    args = _setup(tmp_path)
    # 18 iterations (R1 at index 16) with a training state every 9: the uninterrupted run.
    train_min.main([*args, '--outdir', str(tmp_path / 'a'), '--kimg', '0.072', '--tick', '0.036'])
    run_a = tmp_path / 'a' / '00000-toy'
    assert [os.path.basename(p) for p in training_state.training_states(str(run_a))] == \
        ['training-state-00000018.pt', 'training-state-00000009.pt']
    # The interrupted run: only its state after 9 iterations survives; --resume RUN_DIR continues it.
    run_b = tmp_path / 'b' / '00000-toy'
    run_b.mkdir(parents=True)
    shutil.copy(run_a / 'training-state-00000009.pt', run_b)
    (run_b / 'stats.jsonl').write_text('{"kimg": 0.036}\n{"kimg": 0.05}\n{"kimg": 0.')     # written after it, then killed
    train_min.main([*args, '--outdir', str(tmp_path / 'b'), '--kimg', '0.072', '--tick', '0.036', '--resume', str(run_b)])
    stats = [json.loads(line) for line in (run_a / 'stats.jsonl').read_text().splitlines()]
    assert [s['kimg'] for s in stats] == [0.036, 0.072] and stats[0]['r1'] is None and stats[1]['r1'] > 0
    assert {'sec_per_kimg', 'images_per_s', 'loss_G', 'loss_D', 'logits_real', 'logits_fake', 'peak_mem_gb'} <= set(stats[1])
    a, b = _load(run_a / 'training-state-00000018.pt'), _load(run_b / 'training-state-00000018.pt')
    _compare(a, b, exact=True)
    lines = (run_b / 'stats.jsonl').read_text().splitlines()
    assert [json.loads(line)['kimg'] for line in lines] == [0.036, 0.072]
    # A real kill: SIGKILL a training process once its first state is on disk (wherever it then is: computing,
    # writing the next state), then the same command with --resume auto finishes it, bit for bit.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, 'train_min.py'), *args, '--outdir', str(tmp_path / 'c'),
           '--kimg', '0.072', '--tick', '0.004']
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not training_state.training_states(str(tmp_path / 'c' / '00000-toy')) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    steps = [int(p[-11:-3]) for p in training_state.training_states(str(tmp_path / 'c' / '00000-toy'))]
    assert steps and max(steps) < 18
    train_min.main([*args, '--outdir', str(tmp_path / 'c'), '--kimg', '0.072', '--tick', '0.004', '--resume', 'auto'])
    _compare(a, _load(tmp_path / 'c' / '00000-toy' / 'training-state-00000018.pt'), exact=True)
    # 'auto' finds the newest state of the preset in --outdir; a finished run then has nothing left to do.
    path, state = training_state.find_training_state('auto', str(tmp_path / 'b'), 'toy')
    assert path.endswith('training-state-00000018.pt') and state['step'] == 18
    assert training_state.find_training_state('auto', str(tmp_path / 'empty'), 'toy') == (None, None)
    with pytest.raises(SystemExit, match=r'batch=4 \(now 8\)'):      # (auto would start a new run: test_robustness.py)
        train_min.main([*args, '--outdir', str(tmp_path / 'b'), '--resume', str(run_b), '--batch', '8'])


def test_state_with_old_spectral_norm_layout_is_refused(tmp_path):
    # States written when the heads used torch.nn.utils.parametrizations.spectral_norm (before gdd.SNConv2d).
    args = _setup(tmp_path)
    train_min.main([*args, '--outdir', str(tmp_path / 'a'), '--kimg', '0.004', '--tick', '0.004'])
    path = training_state.training_states(str(tmp_path / 'a' / '00000-toy'))[0]
    state = _load(path)
    rename = {'weight_orig': 'parametrizations.weight.original', 'weight_u': 'parametrizations.weight.0._u',
              'weight_v': 'parametrizations.weight.0._v'}
    state['D'] = {(k.rsplit('.', 1)[0] + '.' + rename[k.rsplit('.', 1)[1]] if k.rsplit('.', 1)[1] in rename else k): v
                  for k, v in state['D'].items()}
    safe_files.save_torch(state, path)
    os.remove(path + '.sha256')         # older versions wrote no checksum (this one would say the file changed)
    with pytest.raises(SystemExit, match='older gdd-min .*parametrizations.spectral_norm'):
        train_min.main([*args, '--outdir', str(tmp_path / 'a'), '--kimg', '0.008', '--tick', '0.004', '--resume', path])


def test_cut_off_training_state_is_never_picked(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    good = {'format': training_state.STATE_FORMAT, 'step': 3, 'x': torch.arange(1000)}
    safe_files.save_torch(good, run / 'training-state-00000003.pt')
    data = (run / 'training-state-00000003.pt').read_bytes()
    (run / 'training-state-00000007.pt').write_bytes(data[:len(data) // 2])     # killed mid-write (no atomic rename)
    (run / '.training-state-00000009.pt.tmp123').write_bytes(data[:100])        # atomic_save's temporary file
    (run / 'training-state-00000008.pt').write_bytes(b'')                       # empty
    path, state = training_state.find_training_state(str(run), str(tmp_path), 'toy')
    assert path == str(run / 'training-state-00000003.pt') and torch.equal(state['x'], good['x'])
    assert capsys.readouterr().out.count('note: skipping') == 2
    # Keep only the last 3 states.
    for step in (11, 12, 13):
        safe_files.save_torch(good, run / f'training-state-{step:08d}.pt')
    assert len(training_state.training_states(str(run))) == 6
    with pytest.raises(SystemExit, match='no complete training state'):
        training_state.find_training_state(str(run / 'training-state-00000007.pt'), str(tmp_path), 'toy')
    with pytest.raises(SystemExit, match='no such file or folder'):
        training_state.find_training_state(str(run / 'missing'), str(tmp_path), 'toy')


def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    # 2 ranks x 1 chunk of 2 images (gloo) == 1 rank x 2 chunks of 2 images: same images, latents and D calls
    # per chunk; 17 iterations so the R1 step (index 16) is included.
    args = [*_setup(tmp_path), '--kimg', '0.068', '--tick', '0.068', '--batch-gpu', '2']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(ROOT, 'train_min.py'), *args, '--outdir', str(tmp_path / 'ddp')]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = (tmp_path / 'ddp' / '00000-toy' / 'log.txt').read_text()
    assert '2 process(es)' in log and 'Batch 4 = 2 processes x 1 chunks x 2 images' in log
    torch.set_num_threads(1)
    train_min.main([*args, '--outdir', str(tmp_path / 'one')])
    assert 'Batch 4 = 1 processes x 2 chunks x 2 images' in (tmp_path / 'one' / '00000-toy' / 'log.txt').read_text()
    a = _load(tmp_path / 'ddp' / '00000-toy' / 'training-state-00000017.pt')
    b = _load(tmp_path / 'one' / '00000-toy' / 'training-state-00000017.pt')
    _compare(a, b, exact=False)
    assert torch.equal(a['latent_gen'], b['latent_gen'])
    # The G update really happened (and equally): the trained parameters moved away from the teacher.
    teacher = _load(tmp_path / 'teacher.pt')['ema']['state_dict']
    moved = [n for n, t in a['G'].items() if n in teacher and not torch.equal(t, teacher[n])]
    assert len(moved) > 10


def test_batch_must_split_evenly(tmp_path):
    args = _setup(tmp_path)
    with pytest.raises(SystemExit, match='not a multiple of 1 processes x --batch-gpu 3'):
        train_min.main([*args, '--outdir', str(tmp_path / 'r'), '--batch-gpu', '3'])

#----------------------------------------------------------------------------
# --bench: random data, random-weight teacher, random-filled backbones; no dataset, no download.

@pytest.mark.parametrize('argv', [
    ['toy', '--bench', '2', '--batch', '4', '--batch-gpu', '2'],
    ['cifar10', '--bench', '1', '--batch', '2', '--freeze', '1'],
])
def test_bench_runs_without_data_or_downloads(argv, tmp_path, capsys):
    result = train_min.main([*argv, '--outdir', str(tmp_path / 'runs')])
    assert result['images_per_s'] > 0 and result['peak_mem_gb'] > 0
    assert 'BENCH {' in capsys.readouterr().out and not (tmp_path / 'runs').exists()
