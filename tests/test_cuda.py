"""Tests that need a CUDA device, run by the README's test command wherever one exists (README: On a GPU); without
one they skip. They check what no CPU test can see: the bf16 U-Net path, one training iteration per preset
geometry on CUDA against the same iteration on the CPU, the speed options on real TF32 / bf16 hardware, the EMA,
sampling and FID statistics, the command lines on CUDA, NCCL under torchrun, and resume.

GDD_TEST_DEVICE=cpu runs every test on the CPU instead (gloo for NCCL, the bf16 path emulated as in
test_edm_nets.py): a dry run of the code paths, slow, that compares the CPU with itself."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import edm_nets  # noqa: E402
import fid_min  # noqa: E402
import gdd  # noqa: E402
import gdd_iteration  # noqa: E402
import safe_files  # noqa: E402
import sample_min  # noqa: E402
import toy  # noqa: E402
import training_state  # noqa: E402
from test_bench import BOUNDS, OPTIONS  # noqa: E402
from test_edm_nets import load_fixture, recipe_state_dict  # noqa: E402
from test_scale import _compare, _load, _setup  # noqa: E402

DEVICE = torch.device(os.environ.get('GDD_TEST_DEVICE', 'cuda'))
pytestmark = pytest.mark.skipif(DEVICE.type == 'cuda' and not torch.cuda.is_available(),
                                reason='no CUDA device: these tests run wherever a GPU exists (README: On a GPU)')
ASSETS = os.path.join(ROOT, 'assets')


@pytest.fixture(autouse=True)
def official_numerics(monkeypatch):
    """TF32 off before and after each test (as train_min sets it); on the CPU dry run, the bf16 path emulated."""
    if DEVICE.type == 'cpu':
        monkeypatch.setattr(edm_nets, '_REDUCED_PRECISION_DEVICES', {'cuda', 'cpu'})
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def compare_runs(a, b, teacher, exact=False):
    """Two training states of the same run. On CUDA, which sums some gradients with atomics (the bilinear
    resize's backward), not bit for bit; Adam's first steps are lr * sign(gradient), so an element whose gradient
    is near 0 may step the other way: compared are the whole vectors, within 5% of how far training moved them."""
    if exact and DEVICE.type == 'cpu':
        return _compare(a, b, exact=True)
    assert (a['step'], a['seen']) == (b['step'], b['seen']) and torch.equal(a['latent_gen'], b['latent_gen'])
    for key in ('G', 'G_ema', 'D'):
        names = [n for n, t in a[key].items() if t.is_floating_point() and 'running_' not in n]
        start = [teacher[n].float() if key != 'D' and n in teacher else torch.zeros_like(a[key][n]) for n in names]
        moved_a = torch.cat([(a[key][n].float() - s).flatten() for n, s in zip(names, start)])
        moved_b = torch.cat([(b[key][n].float() - s).flatten() for n, s in zip(names, start)])
        assert (moved_a - moved_b).norm() <= 0.05 * moved_a.norm(), key


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout

#----------------------------------------------------------------------------
# The bf16 U-Net path (use_fp16, quirk 11) on the official network sizes.

@pytest.mark.parametrize('name', ['seeded_edm-cifar10-32x32-uncond-ve.pt', 'seeded_edm-imagenet-64x64-cond-adm.pt'])
def test_bf16_unet_path_against_fp32(name):
    # The same weights with use_fp16 True and False. bf16 keeps 8 significant bits, so each rounding moves a value
    # by up to 2^-9 = 0.2%; the U-Net's ~50 layers in sequence add these up to about 1% of the output (the CPU
    # emulation measures 0.3-0.6%). Allowed: 3% in L2 and 5% of the largest output entry at any entry; the
    # gradients reach the fp32 master weights in fp32, within 10% in L2 (they pass through the same bf16 layers).
    d = load_fixture(name)
    sd = recipe_state_dict(d['weight_seed'], d['weight_spec'], d['fixed_buffers'])
    nets = [safe_files.build_network(d['precond'], {**d['kwargs'], 'use_fp16': fp16}, sd).to(DEVICE).eval()
            for fp16 in (True, False)]
    x, sigma = d['x'].to(DEVICE), d['sigma'].to(DEVICE)
    labels = None if d['class_labels'] is None else d['class_labels'].to(DEVICE)
    dtypes = set()
    nets[0].model.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
    outs, grads = [], []
    for net in nets:
        out = net(x, sigma, labels)
        assert out.dtype == torch.float32
        out.square().mean().backward()
        outs.append(out.detach().double())
        grads.append(torch.cat([p.grad.flatten().double() for p in net.parameters() if p.grad is not None]))
    assert dtypes == {torch.bfloat16}
    assert all(p.grad.dtype == torch.float32 for p in nets[0].parameters() if p.grad is not None)
    (bf16, fp32), (g_bf16, g_fp32) = outs, grads
    assert 0 < (bf16 - fp32).norm() <= 0.03 * fp32.norm()
    assert (bf16 - fp32).abs().max() <= 0.05 * fp32.abs().max()
    assert (g_bf16 - g_fp32).norm() <= 0.10 * g_fp32.norm()
    assert torch.equal(nets[0](x, sigma, labels, force_fp32=True), nets[1](x, sigma, labels))

#----------------------------------------------------------------------------
# One full training iteration (G, D and R1 steps, EMA) per preset geometry: CUDA against the CPU.

GEOMETRIES = ['cifar10', 'cifar10-cond', 'ffhq', 'imagenet64']       # afhqv2 has ffhq's geometry


def iteration(preset, options=(), device=DEVICE):
    cfg, nets, chunks = gdd_iteration.build(preset, options, device=device)
    try:
        return gdd_iteration.run(cfg, nets, chunks)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize('preset', GEOMETRIES)
def test_iteration_on_cuda_equals_cpu(preset):
    # The generator in fp32 on both (--fp16 0), TF32 off: only the kernels differ. The gradients of an iteration
    # with random-filled feature networks are sensitive to them: on the CPU, channels_last kernels move them by up
    # to 1.2% (README: On a GPU), and cuDNN may pick Winograd or FFT convolutions, which round more. Allowed:
    # 25% for each step's gradient (a missing or misplaced term moves it by about 100%), 0.1% for the losses and
    # mean logits (the forward pass is not sensitive). Not compared: the EMA's change, which after Adam's first
    # step is (1 - beta) lr sign(gradient) and flips with the sign of every near-zero gradient (the EMA test below).
    cpu, gpu = iteration(preset, ['--fp16', '0'], 'cpu'), iteration(preset, ['--fp16', '0'])
    d = gdd_iteration.differences(gpu, cpu)
    print(preset, d)
    assert max(d['G step'], d['D step'], d['R1 step']) <= 0.25 and d['stats'] <= 1e-3
    # The presets' bf16 U-Net on CUDA against fp32 on the CPU: a bf16-sized difference, nothing broken.
    d = gdd_iteration.differences(iteration(preset, ['--fp16', '1']), cpu)
    print(preset, 'bf16 U-Net', d)
    assert max(d['G step'], d['D step'], d['R1 step']) <= 0.6 and d['stats'] <= 0.05


@pytest.mark.parametrize('option', list(OPTIONS))
@pytest.mark.parametrize('preset', ['cifar10', 'imagenet64'])
def test_speed_options_on_cuda_stay_within_the_cpu_bounds(preset, option):
    # Real TF32 tensor cores and bf16 kernels, against the same iteration without the option (bf16 U-Net in both,
    # as the presets run). Allowed: the bound the CPU test holds each option to (test_bench.py), or the 25% that a
    # change of CUDA kernels alone is allowed (above) if larger; the losses and logits a tenth of it. channels_last
    # also changes the generator's bf16 kernels, and a bf16 network moves with its kernels as much as against fp32
    # (on the CPU's oneDNN: 28% for the G step's gradient, 0.7% for the logits): the bf16 U-Net's bounds above.
    d = gdd_iteration.differences(iteration(preset, OPTIONS[option]), iteration(preset))
    print(preset, option, d)
    bound, stats = (0.6, 0.05) if option == 'channels_last' else (max(BOUNDS[option], 0.25), max(BOUNDS[option] / 10, 1e-3))
    assert max(d['G step'], d['D step'], d['R1 step']) <= bound and d['stats'] <= stats


def test_ema_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=g) for shape in ([64, 32, 3, 3], [64], [1000, 7])]
    results = []
    for device in ('cpu', DEVICE):
        G, G_ema = (torch.nn.ParameterList([torch.nn.Parameter(p.to(device) + k) for p in params]) for k in (0.0, 0.5))
        G[1].requires_grad_(False)                          # frozen: never averaged
        for seen in (0, 256, 100_000):
            gdd.update_ema(G_ema, G, gdd.ema_beta(256, seen, 0.5))
        results.append([p.detach().cpu() for p in G_ema])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(results[1][1], params[1] + 0.5)

#----------------------------------------------------------------------------
# Sampling and FID statistics: the shipped toy generator, teacher and classifier.

def test_sampling_on_cuda_equals_cpu():
    G = sample_min.load_generator(os.path.join(ASSETS, 'toy-gdd.pt'))
    teacher = sample_min.load_generator(os.path.join(ASSETS, 'toy-teacher.pt'))
    z = torch.randn([16, 3, 32, 32], generator=torch.Generator().manual_seed(0))
    c = torch.eye(10)[torch.arange(16) % 10]
    for net, sample in ((G, lambda n, z, c: gdd.generate(n, z, c)),
                        (teacher, lambda n, z, c: edm_nets.edm_sampler(n, z, c, num_steps=18))):
        with torch.no_grad():
            cpu = sample(net, z, c)
            gpu = sample(net.to(DEVICE), z.to(DEVICE), c.to(DEVICE)).cpu()
        net.cpu()
        # fp32 kernels in another order: ~1e-5 apart after one evaluation, more after the sampler's 35; a value
        # that close to a rounding boundary of the uint8 levels may round the other way.
        torch.testing.assert_close(gpu.float(), cpu.float(), rtol=0, atol=2e-3)
        a, b = cli.quantize(gpu).int(), cli.quantize(cpu).int()
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() <= 0.02
    # On a device, images draw their latents from a generator on that device, as EDM's generate.py does.
    seeds = list(range(8))
    (_, images), = sample_min.generate_images(G.to(DEVICE), seeds, batch=8, device=DEVICE)
    z = torch.stack([torch.randn([3, 32, 32], generator=torch.Generator(DEVICE).manual_seed(s), device=DEVICE) for s in seeds])
    assert images.device.type == DEVICE.type and images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    with torch.no_grad():
        rnd = sample_min.SeededRandom(seeds, DEVICE)
        assert torch.equal(rnd.randn([3, 32, 32], DEVICE), z)
        c = torch.eye(10, device=DEVICE)[rnd.randint(10, DEVICE)]
        assert torch.equal(cli.quantize(gdd.generate(G, z, c)), images)


def test_fid_statistics_on_cuda_equal_cpu():
    detector_cpu = fid_min.load_detector(os.path.join(ASSETS, 'toy-classifier.pt'))
    detector_gpu = fid_min.load_detector(os.path.join(ASSETS, 'toy-classifier.pt'), device=DEVICE)
    images = torch.from_numpy(toy.draw_toy_images(200, seed=0)[0])     # features of a classifier of these shapes
    batches = lambda: iter(images.split(64))
    cpu = fid_min.feature_stats(fid_min.detect(detector_cpu, x) for x in batches())
    gpu = fid_min.feature_stats(fid_min.detect(detector_gpu, x.to(DEVICE)) for x in batches())
    for a, b in zip(gpu, cpu):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    assert abs(fid_min.frechet_distance(*gpu, *cpu)) < 1e-3
    # The float64 sums themselves (FeatureStats keeps them on the features' device).
    f = torch.randn([500, 64], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(fid_min.feature_stats(f.to(DEVICE)), fid_min.feature_stats(f)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

#----------------------------------------------------------------------------
# The command lines on CUDA: --bench, a short run, sampling and FID; torchrun with NCCL; resume.

def test_bench_and_a_short_run_from_the_command_line(tmp_path):
    out = run_cli('train_min.py', 'cifar10', '--bench', '2', '--batch', '8', '--device', str(DEVICE))
    assert f'on {DEVICE.type}' in out and '47,597,568 frozen' in out and 'BENCH {' in out
    assert ('where the time goes (CUDA events' if DEVICE.type == 'cuda' else 'where the time goes (wall time') in out
    # A short real run of the toy preset with the bf16 U-Net, snapshots, then sampling and FID of the result.
    args = [*_setup(tmp_path), '--fp16', '1', '--kimg', '0.016', '--tick', '0.008', '--device', str(DEVICE),
            '--outdir', str(tmp_path / 'runs'), '--export', str(tmp_path / 'g.pt')]
    out = run_cli('train_min.py', *args)
    assert 'Training done: 4 iterations' in out and (DEVICE.type != 'cuda' or 'generator U-Net in bfloat16' in out)
    out = run_cli('sample_min.py', '--seeds', '0-127', '--npz', str(tmp_path / 's.npz'))    # the toy generator
    assert f'on {DEVICE.type}' in out
    images = np.load(tmp_path / 's.npz')['images']
    mu, sigma = fid_min.feature_stats(fid_min.detect(fid_min.load_detector(os.path.join(ASSETS, 'toy-classifier.pt')),
                                                     torch.from_numpy(images).permute(0, 3, 1, 2)))
    cli.atomic_write(str(tmp_path / 'ref.npz'), lambda f: np.savez(f, mu=mu, sigma=sigma))
    fid = float(run_cli('fid_min.py', 'calc', '--images', str(tmp_path / 's.npz'), '--ref', str(tmp_path / 'ref.npz'),
                        '--num', '128', '--detector', os.path.join(ASSETS, 'toy-classifier.pt')).split('FID ')[1].split()[0])
    assert abs(fid) < 1e-2           # the statistics of these images on the GPU against the CPU's


DRIVER = '''import os, sys, torch
sys.path.insert(0, {root!r})
import fid_min, train_min
backend = sys.argv[1]
torch.distributed.init_process_group(backend)
stats = fid_min.FeatureStats()
stats.add(torch.ones([3, 2], device='cuda' if backend == 'nccl' else 'cpu'))
assert stats.reduce().n == 3 and stats.sum.tolist() == [3.0, 3.0]
train_min.main(sys.argv[2:])
'''


def test_torchrun_one_process_with_nccl(tmp_path):
    # One GPU holds one NCCL rank; the driver joins the group (cli.init_distributed does from 2 processes on), so
    # that every all-reduce of the run (the gradients at each optimizer step, FID statistics) goes through NCCL.
    (tmp_path / 'driver.py').write_text(DRIVER.format(root=ROOT))
    backend = 'nccl' if DEVICE.type == 'cuda' else 'gloo'
    args = [*_setup(tmp_path), '--kimg', '0.068', '--tick', '0.068', '--device', str(DEVICE)]
    run_cli('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1', str(tmp_path / 'driver.py'), backend,
            *args, '--outdir', str(tmp_path / 'group'))
    run_cli('train_min.py', *args, '--outdir', str(tmp_path / 'plain'))
    a = _load(tmp_path / 'group' / '00000-toy' / 'training-state-00000017.pt')
    b = _load(tmp_path / 'plain' / '00000-toy' / 'training-state-00000017.pt')
    compare_runs(a, b, _load(tmp_path / 'teacher.pt')['ema']['state_dict'], exact=True)


@pytest.mark.skipif(DEVICE.type == 'cuda' and torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason='needs 2 GPUs (one NCCL rank each)')
def test_torchrun_two_processes_equal_one_with_accumulation(tmp_path):
    args = [*_setup(tmp_path), '--kimg', '0.068', '--tick', '0.068', '--batch-gpu', '2', '--device', DEVICE.type]
    run_cli('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train_min.py', *args,
            '--outdir', str(tmp_path / 'two'))
    run_cli('train_min.py', *args, '--outdir', str(tmp_path / 'one'))
    assert '2 process(es)' in (tmp_path / 'two' / '00000-toy' / 'log.txt').read_text()
    a = _load(tmp_path / 'two' / '00000-toy' / 'training-state-00000017.pt')
    b = _load(tmp_path / 'one' / '00000-toy' / 'training-state-00000017.pt')
    compare_runs(a, b, _load(tmp_path / 'teacher.pt')['ema']['state_dict'])      # NCCL sums in its own order


def test_resume_on_cuda(tmp_path):
    # 18 iterations (R1 at 16) with a state every 9, then the interrupted run resumed from its state at 9.
    args = [*_setup(tmp_path), '--fp16', '1', '--kimg', '0.072', '--tick', '0.036', '--device', str(DEVICE)]
    run_cli('train_min.py', *args, '--outdir', str(tmp_path / 'a'))
    run_a, run_b = tmp_path / 'a' / '00000-toy', tmp_path / 'b' / '00000-toy'
    run_b.mkdir(parents=True)
    for suffix in ('', '.sha256'):
        (run_b / f'training-state-00000009.pt{suffix}').write_bytes((run_a / f'training-state-00000009.pt{suffix}').read_bytes())
    out = run_cli('train_min.py', *args, '--outdir', str(tmp_path / 'b'), '--resume', 'auto')
    assert 'Resumed at iteration 9' in out
    a, b = _load(run_a / 'training-state-00000018.pt'), _load(run_b / 'training-state-00000018.pt')
    compare_runs(a, b, _load(tmp_path / 'teacher.pt')['ema']['state_dict'], exact=True)
    assert torch.equal(a['latent_gen'], b['latent_gen'])        # the CUDA generator's state, exactly
    assert training_state.RESUME_ABSENT.keys() <= a['config'].keys()
