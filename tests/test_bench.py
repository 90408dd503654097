"""Tests for bench_min.py: --bench's phase breakdown and FLOP count, and the speed options beyond the official
numerics (--tf32, --channels-last, --bf16-features): applied, recorded for resume, and how far each moves one
training iteration from the default. `python tests/test_bench.py` prints those distances for the cifar10 and
imagenet64 discriminators (README: On a GPU)."""

import contextlib
import json
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)
import bench_min  # noqa: E402
import gdd  # noqa: E402
import gdd_iteration  # noqa: E402
import sample_min  # noqa: E402
import train_min  # noqa: E402
import training_state  # noqa: E402
from test_scale import _compare, _load, _setup  # noqa: E402

#----------------------------------------------------------------------------
# --bench: where the time goes.

def test_bench_splits_the_iteration_into_phases(tmp_path, capsys):
    # 2 timed iterations of 2 chunks, in a 1-process gloo group so that the all-reduce phase exists too (main
    # destroys the group at the end). R1 runs every 16th iteration: none is timed here (the next test has one).
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    result = train_min.main(['toy', '--bench', '2', '--batch', '2', '--batch-gpu', '1', '--cres', '1,2'])
    assert not torch.distributed.is_initialized()
    out = capsys.readouterr().out
    assert 'where the time goes (wall time' in out and 'no R1 step among the timed iterations' in out
    expected = ['G step: G forward', 'G step: teacher forward (fake)', 'G step: heads, projections, losses',
                'G step: teacher backward (fake)', 'G step: G backward', 'G step: all-reduce', 'G step: optimizer',
                'D step: G forward', 'D step: teacher forward (fake)', 'D step: heads, projections, losses',
                'D step: teacher forward (real)', 'D step: all-reduce', 'D step: optimizer', bench_min.Phases.OTHER]
    assert list(result['phases_ms']) == expected and result['r1_phases_ms'] == {}
    assert all(v > 0 for v in result['phases_ms'].values())
    # The phases cover the iteration: their sum against the wall time of the timed loop.
    covered = sum(result['phases_ms'].values())
    assert abs(covered - 1000 * result['sec_per_iteration']) < 0.05 * covered
    assert result['gflop_per_iteration'] > 0 and result['gflop_per_r1_step'] is None and result['tflop_per_s'] > 0
    assert json.loads(out.split('BENCH ', 1)[1]) == result


def test_flops_are_attributed_to_their_phase(capsys):
    # In an iteration with R1 (index 16) and one without: the R1 phases, and the FLOPs counted in the phase 'G
    # step: G forward' equal those of the generator's forward pass counted on its own by PyTorch's FlopCounterMode.
    cfg, (G, G_ema, D, opt_G, opt_D), chunks = gdd_iteration.build('toy', ['--cres', '1,2'], batch=2)
    phases = bench_min.Phases(G, D, [opt_G, opt_D], torch.device('cpu'))
    iteration = lambda chunks, step, seen, reduce_grads: gdd.train_step(G, D, opt_G, opt_D, chunks, step, 1.0,
                                                                       reduce_grads=reduce_grads)
    for step in (15, 16):
        with bench_min.FlopCount() as counter:
            table = bench_min.phase_table(phases.run(iteration, chunks, step, 0, counter))
        assert sum(f for _, f in table.values()) == counter.total
        assert [k for k in table if k.startswith('R1 step')] == ([] if step == 15 else [
            'R1 step: teacher forward (real)', 'R1 step: heads, projections, losses', 'R1 step: teacher backward (real)',
            'R1 step: double backward', 'R1 step: optimizer'])
    x, c, z, _ = chunks[0]
    with FlopCounterMode(display=False) as reference:
        gdd.generate(G, z, c)
    assert table['G step: G forward'][1] == table['D step: G forward'][1] == reference.get_total_flops() > 0
    assert table['R1 step: double backward'][1] > table['R1 step: teacher backward (real)'][1] > 0
    assert all(sec > 0 for sec, _ in table.values())


#----------------------------------------------------------------------------
# Speed options: applied, recorded in training states, and refused as a silent change on --resume.

def test_speed_options_are_applied(capsys):
    cfg, (G, G_ema, D, opt_G, opt_D), chunks = gdd_iteration.build(
        'toy', ['--cres', '1,2', '--tf32', '1', '--channels-last', '1', '--bf16-features', '1'])
    try:
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    convs = [p for p in [*G.parameters(), *D.parameters()] if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(isinstance(f, bench_min.BF16Features) for f in D.features.values())
    # The taps come back in fp32 from bf16 arithmetic.
    maps = D.features['teacher'](chunks[0][0])
    assert all(m.dtype == torch.float32 for m in maps)
    assert 'Speed options tf32, channels_last, bf16_features: not the official numerics' in capsys.readouterr().out
    assert all(p.is_contiguous() for p in G_ema.parameters())      # snapshots: the EMA copy stays contiguous


def test_speed_options_resume_exactly_and_refuse_a_change(tmp_path):
    args = [*_setup(tmp_path), '--channels-last', '1', '--bf16-features', '1', '--kimg', '0.008', '--tick', '0.004']
    train_min.main([*args, '--outdir', str(tmp_path / 'a')])
    run_a = tmp_path / 'a' / '00000-toy'
    states = training_state.training_states(str(run_a))
    assert len(states) == 2 and _load(states[0])['config']['bf16_features'] is True
    run_b = tmp_path / 'b' / '00000-toy'
    run_b.mkdir(parents=True)
    (run_b / os.path.basename(states[1])).write_bytes(open(states[1], 'rb').read())
    (run_b / (os.path.basename(states[1]) + '.sha256')).write_bytes(open(states[1] + '.sha256', 'rb').read())
    train_min.main([*args, '--outdir', str(tmp_path / 'b'), '--resume', str(run_b)])
    _compare(_load(states[0]), _load(training_state.training_states(str(run_b))[0]), exact=True)
    assert sample_min.load_generator(str(run_a / 'network-snapshot-000000.008.pt')).img_resolution == 16
    for flag, old in (('--bf16-features', True), ('--channels-last', True), ('--tf32', False)):
        new = {True: '0', False: '1'}[old]
        with pytest.raises(SystemExit, match=f'{flag[2:].replace("-", "_")}={old} \\(now {not old}\\)'):
            train_min.main([*args, flag, new, '--outdir', str(tmp_path / 'a'), '--resume', str(run_a), '--kimg', '0.012'])


def test_states_written_before_the_speed_options_resume_without_them(tmp_path):
    cfg = train_min.parse_args(['toy'])
    state = dict(step=1, seen=4, config={k: getattr(cfg, k) for k in training_state.RESUME_MUST_MATCH
                                         if k not in training_state.RESUME_ABSENT})
    (tmp_path / 'training-state-00000001.pt').write_bytes(b'')
    training_state.resume_run_dir(str(tmp_path / 'training-state-00000001.pt'), state, cfg, 32)
    cfg.bf16_features = True
    with pytest.raises(SystemExit, match=r'bf16_features=False \(now True\)'):
        training_state.resume_run_dir(str(tmp_path / 'training-state-00000001.pt'), state, cfg, 32)

#----------------------------------------------------------------------------
# How far each option moves one iteration (with its R1 step) from the default, on the CPU.

class TF32(TorchDispatchMode):
    """TF32 tensor-core arithmetic emulated on a CPU, which has none: the fp32 operands of every convolution and
    matrix product (forward, backward, double backward) rounded to TF32's 10-bit mantissa (to nearest, ties to
    even), the products summed in fp32 by the CPU kernel, as Ampere and later GPUs do with TF32 enabled."""
    OPS = {torch.ops.aten.convolution, torch.ops.aten.convolution_backward, torch.ops.aten.mm, torch.ops.aten.bmm,
           torch.ops.aten.addmm, torch.ops.aten.baddbmm}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket in self.OPS:
            args = tree_map(round_to_tf32, args)
        return func(*args, **(kwargs or {}))


def round_to_tf32(t):
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32):
        return t
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)    # 13 of 23 mantissa bits dropped


def test_tf32_rounding():
    x = torch.tensor([1.0, 1 + 2 ** -10, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -12, -(1 + 2 ** -11 + 2 ** -20)])
    assert round_to_tf32(x).tolist() == [1.0, 1 + 2 ** -10, 1.0, 1 + 2 ** -9, 1.0, -(1 + 2 ** -10)]


OPTIONS = {'tf32': ['--tf32', '1'], 'channels_last': ['--channels-last', '1'], 'bf16_features': ['--bf16-features', '1']}
# Largest relative distance from the default that the test allows, about 3x what was measured (README: On a GPU).
# For scale, in this test's setup: 1 thread instead of 2 (only the order of fp32 sums changes) moves the G step's
# gradient by 0.4%.
BOUNDS = {'tf32': 0.4, 'channels_last': 0.03, 'bf16_features': 0.6}


def one_iteration(options, preset='cifar10', features='vgg16_bn', batch=1, threads=None):
    """gdd_iteration.run() of one iteration with the train_min flags `options` ('--tf32 1' emulated on the CPU)."""
    cfg, nets, chunks = gdd_iteration.build(preset, ['--features', features, *options], batch=batch)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or before)
        with TF32() if cfg.tf32 else contextlib.nullcontext():
            return gdd_iteration.run(cfg, nets, chunks)
    finally:
        torch.set_num_threads(before)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope='module')
def default_iteration():
    return one_iteration([])


@pytest.mark.parametrize('option', list(OPTIONS))
def test_speed_option_moves_one_iteration_a_bounded_distance(option, default_iteration, capsys):
    # One G step, D step and R1 step with VGG16-BN, the CIFAR-10 discriminator's main feature network, at batch 1:
    # the relative L2 distance of each step's gradient from the default's, and of the losses and logits.
    d = gdd_iteration.differences(one_iteration(OPTIONS[option]), default_iteration)
    with capsys.disabled():
        print(f'\n{option}: ' + ', '.join(f'{k} {v:.2e}' for k, v in d.items()))
    assert d['G step'] <= BOUNDS[option] and d['D step'] <= BOUNDS[option] and d['R1 step'] <= BOUNDS[option]
    assert d['stats'] <= BOUNDS[option] / 10


if __name__ == '__main__':      # the README table: both discriminators of the paper at batch 2
    for preset, features in (('cifar10', 'vgg16_bn,tf_efficientnet_lite0'),
                             ('imagenet64', 'deit_base_distilled_patch16_224,tf_efficientnet_lite0')):
        default = one_iteration([], preset, features, batch=2)
        rows = {'1 thread instead of 2': one_iteration([], preset, features, batch=2, threads=1)}
        rows.update({option: one_iteration(flags, preset, features, batch=2) for option, flags in OPTIONS.items()})
        for name, result in rows.items():
            d = gdd_iteration.differences(result, default)
            print(f'{preset} ({features}) {name}: ' + ', '.join(f'{k} {v:.2e}' for k, v in d.items()), flush=True)
