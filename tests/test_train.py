"""Tests for train_min.py: the training loop end to end (the dataset reader: test_dataset.py)."""

import json
import os
import sys

import numpy as np
import PIL.Image
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_min

#----------------------------------------------------------------------------
# Command line, toy data, training end to end.

import torch  # noqa: E402
import edm_nets  # noqa: E402
import gdd  # noqa: E402
import dataset_min  # noqa: E402
import safe_files  # noqa: E402
import sample_min  # noqa: E402
import toy  # noqa: E402


def test_presets_and_overrides(capsys):
    cfg = train_min.parse_args(['cifar10', '--freeze', '0', '--r1-gamma', '0.01'])
    assert (cfg.batch, cfg.lr, cfg.dlr, cfg.kimg, cfg.freeze, cfg.r1_gamma) == (256, 1e-4, 1e-4, 5000, 0, 0.01)
    assert cfg.teacher.endswith('edm-cifar10-32x32-uncond-ve.pkl') and cfg.features == 'vgg16_bn,tf_efficientnet_lite0'
    cfg = train_min.parse_args(['imagenet64'])
    assert (cfg.batch, cfg.lr, cfg.dlr, cfg.ema, cfg.arch) == (512, 8e-6, 4e-5, 50, 'adm')
    assert train_min.parse_args(['afhqv2']).features == 'deit_base_distilled_patch16_224,tf_efficientnet_lite0'
    with pytest.raises(SystemExit):
        train_min.parse_args(['cifar10', '--help'])
    out = capsys.readouterr().out
    assert '--r1-gamma' in out and '(default: 0.0001)' in out and '--backbone-weights' in out
    with pytest.raises(SystemExit, match='unknown preset'):
        train_min.parse_args(['cifar11'])


def test_toy_images_are_deterministic():
    a, la = toy.draw_toy_images(12, seed=5)
    b, lb = toy.draw_toy_images(12, seed=5)
    c, _ = toy.draw_toy_images(12, seed=6)
    assert a.shape == (12, 3, 32, 32) and a.dtype == np.uint8 and np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c) and set(la) <= set(range(10))


def _toy_teacher(path):
    torch.manual_seed(0)
    cfg = train_min.parse_args(['toy'])
    net = edm_nets.EDMPrecond(img_resolution=32, img_channels=3, label_dim=10, **train_min.arch_kwargs(cfg))
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(net)}, path)


def test_toy_end_to_end(tmp_path, capsys):
    images, labels = toy.draw_toy_images(40, seed=0)
    dataset_min.save_dataset(str(tmp_path / 'data.zip'), images, labels)
    _toy_teacher(tmp_path / 'teacher.pt')
    common = ['--outdir', str(tmp_path / 'runs'), '--data', str(tmp_path / 'data.zip')]
    # The toy teacher recipe runs (EDM loss) and writes a loadable checkpoint.
    toy.main(['teacher', *common, '--kimg', '0.016', '--batch', '8', '--tick', '0.008', '--export', str(tmp_path / 't.pt')])
    with pytest.raises(SystemExit, match=r'^error: `train_min.py toy-teacher` moved; run: python toy.py teacher --kimg 1$'):
        train_min.main(['toy-teacher', '--kimg', '1'])      # the old spelling names the new one
    assert type(safe_files.load_network(str(tmp_path / 't.pt'))).__name__ == 'EDMPrecond'
    # GDD-I on the toy preset: 17 iterations, so one R1 step (index 16), then the small evaluation.
    train_min.main(['toy', *common, '--teacher', str(tmp_path / 'teacher.pt'), '--kimg', '0.068', '--batch', '4',
                    '--tick', '0.032', '--fd-images', '30', '--export', str(tmp_path / 'g.pt')])
    out = capsys.readouterr().out
    assert '58,131 trainable, 259,744 frozen' in out and 'R1 ' in out and 'Training done: 17 iterations' in out
    run = tmp_path / 'runs' / '00001-toy'
    metrics = json.load(open(run / 'metrics.json'))     # the three metrics, with the shipped toy classifier
    for key in ('toy_fid', 'accuracy', 'fd_8x8', 'speckle'):
        assert set(metrics[key]) == {'data_floor', 'teacher_1step', 'teacher_heun35', 'gdd_1step'}
        assert all(np.isfinite(v) for v in metrics[key].values())
    assert metrics['accuracy']['data_floor'] >= 0.9 and set(metrics['targets']) == {
        'gdd_toy_fid_le_quarter_teacher_1step', 'gdd_toy_fid_le_teacher_heun35', 'gdd_accuracy_ge_teacher_heun35_minus_5_points',
        'gdd_speckle_le_teacher_heun35'}
    assert 'toy FID  accuracy    FD 8x8   speckle' in out and 'data_floor' in out
    # Four columns (3 samplers + data) of 5 x 32 pixels at 2x with 8-pixel gaps.
    assert PIL.Image.open(run / 'compare.png').size[0] == 4 * 5 * 32 * 2 + 3 * 8
    assert (run / 'samples-000000.068.png').exists() and (run / 'log.txt').read_text().count('kimg') >= 3   # ticks < 1 kimg: KKKKKK.III
    G = sample_min.load_generator(str(tmp_path / 'g.pt'))
    assert isinstance(G, gdd.GDDPrecond) and G.label_dim == 10


def test_training_refuses_mismatched_data_and_teacher(tmp_path):
    _toy_teacher(tmp_path / 'teacher.pt')
    images16 = np.random.RandomState(0).randint(0, 256, size=[4, 3, 16, 16], dtype=np.uint8)
    dataset_min.save_dataset(str(tmp_path / 'd16'), images16, [0, 1, 2, 3])
    with pytest.raises(SystemExit, match=r'needs \(32, 3, 10\)'):
        train_min.main(['toy', '--outdir', str(tmp_path / 'runs'), '--teacher', str(tmp_path / 'teacher.pt'), '--data', str(tmp_path / 'd16')])
    with pytest.raises(SystemExit, match='preset cifar10 is unconditional, the teacher .* is class-conditional'):
        train_min.main(['cifar10', '--outdir', str(tmp_path / 'runs'), '--teacher', str(tmp_path / 'teacher.pt'), '--data', str(tmp_path / 'd16')])
    with pytest.raises(SystemExit, match='no such file'):
        train_min.main(['toy', '--outdir', str(tmp_path / 'runs'), '--teacher', str(tmp_path / 'missing.pt')])


def test_diverged_toy_teacher_stops_with_one_line(tmp_path):
    images, labels = toy.draw_toy_images(40, seed=0)
    dataset_min.save_dataset(str(tmp_path / 'data.zip'), images, labels)
    with pytest.raises(SystemExit, match=r'^error: training stopped at kimg .*NaN/inf \(lower --lr\?\)$'):
        toy.main(['teacher', '--outdir', str(tmp_path / 'runs'), '--data', str(tmp_path / 'data.zip'),
                        '--kimg', '0.04', '--batch', '8', '--tick', '0.008', '--lr', '1e36', '--export', str(tmp_path / 't.pt')])
    assert not (tmp_path / 't.pt').exists()
