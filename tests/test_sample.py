import copy
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import edm_nets  # noqa: E402
import fid_min  # noqa: E402
import gdd  # noqa: E402
import sample_min  # noqa: E402
from edm_pickle import dump_edm_pickle  # noqa: E402
from test_fid import StandInDetector  # noqa: E402
from dataset_min import save_dataset  # noqa: E402
import cli  # noqa: E402
import safe_files  # noqa: E402

TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[4], dropout=0, embedding_type='fourier', channel_mult_noise=2,
            encoder_type='residual', resample_filter=[1, 3, 3, 1])


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    """A tiny conditional NCSN++ teacher, the generator made from it (weights perturbed so images vary), saved
    as project checkpoints and the generator also as an official-format pickle of class D2OPrecond."""
    d = tmp_path_factory.mktemp('nets')
    torch.manual_seed(0)
    teacher = edm_nets.EDMPrecond(**TINY).eval()
    G = gdd.generator_from_teacher(teacher).eval()
    with torch.no_grad():
        for net in (teacher, G):
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(G)}, d / 'G.pt')
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(teacher)}, d / 'teacher.pt')
    # In EDM's files every persistent module records its own constructor kwargs, the U-Net's included.
    official = copy.deepcopy(G)
    unet_kwargs = {k: v for k, v in G.init_kwargs.items() if k not in ('img_channels', 'use_fp16', 'sigma_data', 'eps', 'model_type')}
    official.model.init_kwargs = dict(unet_kwargs, in_channels=3, out_channels=3)
    dump_edm_pickle({'ema': official, 'loss_fn': None, 'augment_pipe': None, 'dataset_kwargs': {}}, str(d / 'd2o.pkl'),
                    class_name='D2OPrecond')
    return d, G, teacher


def sample(*argv):
    sample_min.main([str(a) for a in argv])


def read_png(path):
    return np.asarray(PIL.Image.open(path)).transpose(2, 0, 1)


def test_one_step_sampling_follows_edm_seeds_and_is_deterministic(nets, tmp_path, capsys):
    d, G, _ = nets
    seeds = [0, 1, 2, 3, 4, 1000]
    for run in ('a', 'b'):
        sample('--net', d / 'G.pt', '--seeds', '0-4,1000', '--batch', 4, '--outdir', tmp_path / run,
               '--npz', tmp_path / f'{run}.npz', '--grid', tmp_path / f'{run}.png')
    assert 'images/s' in capsys.readouterr().out
    # EDM's layout: {seed:06d}.png inside folders of 1000.
    assert sorted(p.relative_to(tmp_path / 'a').as_posix() for p in (tmp_path / 'a').rglob('*.png')) == \
        ['000000/000000.png', '000000/000001.png', '000000/000002.png', '000000/000003.png', '000000/000004.png',
         '001000/001000.png']
    a = np.stack([read_png(tmp_path / 'a' / f'{s - s % 1000:06d}' / f'{s:06d}.png') for s in seeds])
    b = np.stack([read_png(tmp_path / 'b' / f'{s - s % 1000:06d}' / f'{s:06d}.png') for s in seeds])
    assert np.array_equal(a, b) and a.std() > 5                           # same seeds, same images; not constant
    with np.load(tmp_path / 'a.npz') as f:
        assert np.array_equal(f['seeds'], seeds) and np.array_equal(f['images'], a.transpose(0, 2, 3, 1))
    assert PIL.Image.open(tmp_path / 'a.png').size == (3 * 8, 2 * 8)     # 6 images: 3 per row
    # Each image is x = G(80 z; 80, c) with z, then c, drawn from torch.Generator().manual_seed(seed), and is
    # quantised as uint8(clip(127.5 x + 128, 0, 255)).
    g = torch.Generator().manual_seed(1000)
    z = torch.randn([3, 8, 8], generator=g)
    c = torch.eye(4)[torch.randint(4, [], generator=g)]
    with torch.no_grad():
        x = gdd.generate(G, z[None], c[None])
    expected = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)[0].numpy()
    assert np.array_equal(a[-1], expected)
    # --class fixes the label and keeps the latents.
    sample('--net', d / 'G.pt', '--seeds', '1000', '--class', 2, '--npz', tmp_path / 'c.npz')
    with torch.no_grad():
        x = gdd.generate(G, z[None], torch.eye(4)[2:3])
    with np.load(tmp_path / 'c.npz') as f:
        assert np.array_equal(f['images'][0].transpose(2, 0, 1), (x * 127.5 + 128).clip(0, 255).to(torch.uint8)[0].numpy())


def test_official_d2o_pickle_gives_the_same_images(nets, tmp_path):
    d, _, _ = nets
    sample('--net', d / 'G.pt', '--seeds', '0-5', '--npz', tmp_path / 'ours.npz')
    sample('--net', d / 'd2o.pkl', '--seeds', '0-5', '--npz', tmp_path / 'official.npz')
    with np.load(tmp_path / 'ours.npz') as a, np.load(tmp_path / 'official.npz') as b:
        assert np.array_equal(a['images'], b['images'])


def test_teacher_uses_edm_sampler(nets, tmp_path, capsys):
    d, _, teacher = nets
    sample('--net', d / 'teacher.pt', '--seeds', '7,8', '--steps', 3, '--npz', tmp_path / 't.npz')
    assert '5 network evaluations per image' in capsys.readouterr().out    # 2 N - 1
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    z = torch.stack([torch.randn([3, 8, 8], generator=g) for g in gens])
    c = torch.eye(4)[torch.stack([torch.randint(4, [], generator=g) for g in gens])]
    x = edm_nets.edm_sampler(teacher, z, c, num_steps=3)
    with np.load(tmp_path / 't.npz') as f:
        assert np.array_equal(f['images'], (x * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy().transpose(0, 2, 3, 1))


def test_fid_of_net_in_memory_equals_fid_of_saved_pngs(nets, tmp_path):
    d, _, _ = nets
    torch.jit.script(StandInDetector()).save(str(tmp_path / 'det.pt'))
    save_dataset(str(tmp_path / 'data'), np.random.default_rng(0).integers(0, 256, (30, 3, 8, 8), dtype=np.uint8))
    det = ('--detector', tmp_path / 'det.pt')
    fid_min.main(['ref', '--data', str(tmp_path / 'data'), '--dest', str(tmp_path / 'ref.npz'), *map(str, det)])
    for net, steps in (('G.pt', '18'), ('teacher.pt', '2')):
        sample('--net', d / net, '--seeds', '100-111', '--steps', steps, '--batch', 5, '--outdir', tmp_path / net)
        args = ['--ref', str(tmp_path / 'ref.npz'), *map(str, det)]
        fid_png = fid_min.main(['calc', '--images', str(tmp_path / net), '--num', '12', *args])['fid']
        fid_mem = fid_min.main(['calc', '--net', str(d / net), '--seeds', '100-111', '--steps', steps, *args])['fid']
        assert fid_png > 0 and fid_png == fid_mem


def test_bad_inputs(nets, tmp_path, monkeypatch):
    d, _, _ = nets
    for argv, text in [(['--net', tmp_path / 'missing.pt'], 'no such file'),
                       (['--net', d / 'G.pt', '--class', 4, '--seeds', '0'], 'out of range'),
                       (['--net', d / 'ref-is-not-a-net.npz'], 'no such file')]:
        with pytest.raises(SystemExit) as e:
            sample(*argv)
        assert str(e.value.code).startswith('error: ') and text in str(e.value.code) and '\n' not in str(e.value.code)
    # A clone whose toy generator is missing (deleted, or not made yet): the error says how to make it.
    monkeypatch.setattr(sample_min, 'DEFAULT_NET', str(tmp_path / 'assets' / 'toy-gdd.pt'))
    with pytest.raises(SystemExit) as e:
        sample()
    assert 'python train_min.py toy' in str(e.value.code)


def test_no_arguments_samples_the_shipped_toy_generator(tmp_path, monkeypatch, capsys):
    """`python sample_min.py` on a fresh clone, from any working directory: the shipped toy generator, one step,
    a grid of 64 images in ./runs/samples.png."""
    monkeypatch.chdir(tmp_path)
    sample_min.main([])
    out = capsys.readouterr().out
    assert 'one-step generator, 64 images' in out and 'images/s' in out
    grid = np.asarray(PIL.Image.open(tmp_path / 'runs' / 'samples.png'))
    assert grid.shape[2] == 3 and grid.shape[0] >= 8 * 32 and grid.std() > 10   # 8x8 tiles of 32x32, not blank


def test_seed_lists_are_bounded():
    import argparse
    assert cli.parse_seeds('0-2,7') == [0, 1, 2, 7]
    with pytest.raises(argparse.ArgumentTypeError, match='more than 10,000,000 seeds'):
        cli.parse_seeds('0-999999999999')        # would otherwise build a list of 10^12 ints
    with pytest.raises(argparse.ArgumentTypeError, match='bad seed list'):
        cli.parse_seeds('5-1')


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    # Every writer of gdd-min (PNGs, npz, metrics.json, stats.jsonl, reference statistics) goes through it.
    path = tmp_path / 'out.png'
    path.write_bytes(b'old')

    def fail(f):
        f.write(b'half')
        raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'):
        cli.atomic_write(str(path), fail)
    assert path.read_bytes() == b'old' and sorted(p.name for p in tmp_path.iterdir()) == ['out.png']
    cli.atomic_write(str(path), lambda f: f.write(b'new'))
    assert path.read_bytes() == b'new' and sorted(p.name for p in tmp_path.iterdir()) == ['out.png']
