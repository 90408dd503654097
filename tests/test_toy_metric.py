"""The toy demo's metric (fid_min.ToyClassifier, assets/toy-classifier.pt): the toy FID sees texture, the shipped
classifier loads without running code from the file and classifies fresh toy images."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fid_min  # noqa: E402
import safe_files  # noqa: E402
import toy as toy_world  # noqa: E402

ASSET = os.path.join(ROOT, 'assets', 'toy-classifier.pt')


@pytest.fixture(scope='module')
def classifier():
    return fid_min.load_detector(ASSET)


@pytest.fixture(scope='module')
def toy():
    # Fresh draws (neither the training set, seed 0, nor the demo's floor, seed 1): a reference and a test set.
    ref_images, _ = toy_world.draw_toy_images(1000, seed=7)
    images, labels = toy_world.draw_toy_images(500, seed=8)
    return torch.from_numpy(ref_images), torch.from_numpy(images), labels


def test_shipped_classifier_loads_as_detector_and_classifies(classifier, toy):
    assert isinstance(classifier, fid_min.ToyClassifier) and not classifier.training
    _, images, labels = toy
    with torch.no_grad():
        logits = classifier(images)
        features = fid_min.detect(classifier, images)       # the Inception call: uint8 in, float64 features out
    assert features.shape == (500, classifier.init_kwargs['channels'][-1]) and features.dtype == torch.float64
    assert (logits.argmax(1).numpy() == labels).mean() >= 0.95
    with pytest.raises(ValueError, match=r'takes \[N, 3, 32, 32\] images'):
        classifier(images[:, :, :16, :16])


def test_toy_fid_sees_texture(classifier, toy):
    ref_images, images, labels = toy
    ref = toy_world.small_reference(ref_images, classifier)
    clean = toy_world.small_metrics(images, labels, ref, classifier)
    same = toy_world.small_reference(images, classifier)
    assert abs(fid_min.frechet_distance(*same['toy_fid'], *same['toy_fid'])) < 1e-6      # identical sets: 0
    x = images.to(torch.float32)
    blurred = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False).round().to(torch.uint8)     # 3x3 box blur
    noised = (x + 8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clip(0, 255).round().to(torch.uint8)
    # Clean: toy FID 0.35 (500 vs 1000 images); blurred 3.4, noised 9.0. The 8x8 distance is blind to both (about
    # 0.59 for all three): pooling 4x4 pixels averages the noise away and a 3x3 blur barely changes the means.
    for name, bad in (('blurred', blurred), ('noised', noised)):
        m = toy_world.small_metrics(bad, labels, ref, classifier)
        assert m['toy_fid'] > 5 * clean['toy_fid'], (name, m, clean)
        assert m['fd_8x8'] < 1.1 * clean['fd_8x8'], (name, m, clean)
    # Speckle (median |x - box3(x)|, uint8 levels) sees the noise (0.31 clean, 5.7 noised), not the blur (0.30).
    m = {name: toy_world.small_metrics(x, labels, ref)['speckle'] for name, x in (('noised', noised), ('blurred', blurred))}
    assert clean['speckle'] < 1 and m['noised'] > 3 and m['blurred'] <= clean['speckle'], (m, clean)


def test_fid_min_cli_with_toy_classifier(tmp_path, toy, capsys):
    ref_images, images, _ = toy
    np.savez(tmp_path / 'ref.npz', images=ref_images.permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / 'same.npz', images=ref_images.permute(0, 2, 3, 1).numpy())
    fid_min.main(['ref', '--data', str(tmp_path / 'ref.npz'), '--dest', str(tmp_path / 'stats.npz'), '--detector', ASSET])
    fid = fid_min.main(['calc', '--images', str(tmp_path / 'same.npz'), '--num', '1000', '--ref', str(tmp_path / 'stats.npz'),
                        '--detector', ASSET])['fid']
    assert abs(fid) < 1e-6 and 'FID' in capsys.readouterr().out


def test_bad_classifier_files_are_refused(tmp_path):
    good = torch.load(ASSET, map_location='cpu', weights_only=True)
    cases = {
        'format': {**good, 'format': 'something-else'},
        'kwargs': {**good, 'init_kwargs': {**good['init_kwargs'], 'channels': [10 ** 6]}},
        'shapes': {**good, 'init_kwargs': {**good['init_kwargs'], 'channels': [16, 32, 65]}},
        'missing': {**good, 'state_dict': {k: v for k, v in good['state_dict'].items() if k != 'fc.weight'}},
    }
    messages = {'format': 'nor a gdd-min-toy-classifier file', 'kwargs': r'init_kwargs channels=\[1000000\] is not a list',
                'shapes': r'state_dict of ToyClassifier.*expected torch.float32 \[65', 'missing': r'state_dict of ToyClassifier.*: missing fc\.weight'}
    for name, ckpt in cases.items():
        safe_files.save_torch(ckpt, tmp_path / f'{name}.pt')
        with pytest.raises(ValueError, match=messages[name]):
            fid_min.load_detector(str(tmp_path / f'{name}.pt'))
    np.savez(tmp_path / 'x.npz', images=np.zeros([4, 32, 32, 3], np.uint8))
    with pytest.raises(SystemExit, match='error: .*state_dict of ToyClassifier'):      # the CLI: one line
        fid_min.main(['ref', '--data', str(tmp_path / 'x.npz'), '--dest', str(tmp_path / 'o.npz'), '--detector', str(tmp_path / 'shapes.pt')])


def test_toy_classifier_command_writes_a_loadable_detector(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toy_world, 'TOY_IMAGES', 256)          # a small training set: this checks the command, not accuracy
    out = tmp_path / 'clf.pt'
    toy_world.main(['classifier', '--outdir', str(tmp_path / 'runs'), '--kimg', '0.512', '--tick', '0.256',
                    '--export', str(out)])
    log = capsys.readouterr().out
    assert log.count('test accuracy') == 2 and f'Saved {out}' in log
    net = fid_min.load_detector(str(out))
    assert isinstance(net, fid_min.ToyClassifier) and net.init_kwargs == fid_min.ToyClassifier().init_kwargs
    assert (tmp_path / 'runs' / '00000-toy-classifier' / 'toy-classifier.pt').is_file()
