import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fid_min  # noqa: E402
from edm_pickle import dump_edm_pickle  # noqa: E402
from dataset_min import save_dataset  # noqa: E402


def test_feature_stats_match_numpy_and_batching():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((257, 6)).astype(np.float32) * 3 + 1
    mu, sigma = fid_min.feature_stats(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=0, atol=1e-10)  # N-1
    mu_b, sigma_b = fid_min.feature_stats(torch.from_numpy(f[i:i + 50]) for i in range(0, 257, 50))
    np.testing.assert_allclose(mu_b, mu, atol=1e-12)
    np.testing.assert_allclose(sigma_b, sigma, atol=1e-10)


def test_fid_identical_stats_is_zero():
    rng = np.random.default_rng(1)
    mu, sigma = fid_min.feature_stats(rng.standard_normal((500, 32)))
    assert abs(fid_min.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_closed_form_diagonal_gaussians():
    # For diagonal covariances sqrtm(S1 S2) = diag(sqrt(s1 s2)), so FID = |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(s1) - np.sqrt(s2)).sum()
    fid = fid_min.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert abs(fid - expected) < 1e-8 * max(1.0, expected)


#----------------------------------------------------------------------------
# The command line pipeline with a stand-in detector (the real Inception file is not available offline).


class StandInDetector(torch.nn.Module):
    """Same call signature as the Inception TorchScript file: uint8 [N, 3, H, W] -> float [N, D]."""
    def __init__(self):
        super().__init__()
        self.register_buffer('w', torch.randn(48, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, 4).flatten(1)
        return torch.tanh(x @ self.w)


class DetectorRecord(torch.nn.Module):
    """A persistent object whose state holds a TorchScript archive, as the .pkl detector is described."""
    def __init__(self, archive):
        super().__init__()
        self.archive = archive


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('fid')
    torch.jit.script(StandInDetector()).save(str(d / 'det.pt'))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 3, 16, 16), dtype=np.uint8)
    save_dataset(str(d / 'data'), images)
    save_dataset(str(d / 'data.zip'), images)
    np.savez(d / 'images.npz', images=images.transpose(0, 2, 3, 1))
    return d, images


def run(*argv):
    return fid_min.main([str(a) for a in argv])


def ref_stats(path):
    with np.load(path) as f:
        return f['mu'], f['sigma']


def test_ref_stats_independent_of_batch_size_and_format(files):
    d, images = files
    run('ref', '--data', d / 'data', '--dest', d / 'ref7.npz', '--detector', d / 'det.pt', '--batch', 7)
    run('ref', '--data', d / 'data.zip', '--dest', d / 'ref64.npz', '--detector', d / 'det.pt')
    mu7, sigma7 = ref_stats(d / 'ref7.npz')
    mu64, sigma64 = ref_stats(d / 'ref64.npz')
    assert mu7.dtype == np.float64 and mu7.shape == (8,) and sigma7.shape == (8, 8)
    np.testing.assert_allclose(mu7, mu64, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sigma7, sigma64, rtol=0, atol=1e-6)
    # Same numbers as the detector applied directly to the images.
    feats = StandInDetector()(torch.from_numpy(images)).double().numpy()
    np.testing.assert_allclose(mu7, feats.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma7, np.cov(feats, rowvar=False), atol=1e-6)


def test_calc_images_folder_npz_and_edm_subset(files):
    d, images = files
    run('ref', '--data', d / 'data', '--dest', d / 'ref.npz', '--detector', d / 'det.pt')
    fid_folder = run('calc', '--images', d / 'data', '--num', 40, '--ref', d / 'ref.npz', '--detector', d / 'det.pt')['fid']
    fid_npz = run('calc', '--images', d / 'images.npz', '--num', 40, '--ref', d / 'ref.npz', '--detector', d / 'det.pt', '--batch', 9)['fid']
    assert abs(fid_folder) < 1e-6 and abs(fid_npz - fid_folder) < 1e-6
    # With more images than --num, EDM's rule: RandomState(0) shuffles the indices, the first num are kept.
    fid_sub = run('calc', '--images', d / 'data', '--num', 25, '--ref', d / 'ref.npz', '--detector', d / 'det.pt')['fid']
    idx = np.arange(40)
    np.random.RandomState(0).shuffle(idx)
    feats = StandInDetector()(torch.from_numpy(images[np.sort(idx[:25])])).double().numpy()
    expected = fid_min.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), *ref_stats(d / 'ref.npz'))
    assert fid_sub > 1e-3 and abs(fid_sub - expected) < 1e-6


def test_detector_inside_edm_pickle(files, tmp_path):
    d, images = files
    dump_edm_pickle(DetectorRecord((d / 'det.pt').read_bytes()), str(tmp_path / 'det.pkl'), class_name='InceptionV3')
    x = torch.from_numpy(images[:5])
    a = fid_min.load_detector(str(d / 'det.pt'))(x, return_features=True)
    b = fid_min.load_detector(str(tmp_path / 'det.pkl'))(x, return_features=True)
    assert torch.equal(a, b)


class Hostile:
    def __reduce__(self):
        return os.system, ('echo pwned',)


def error_of(*argv):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg, msg
    return msg


def test_bad_inputs_give_one_line_errors(files, tmp_path):
    d, images = files
    det = d / 'det.pt'
    run('ref', '--data', d / 'data', '--dest', tmp_path / 'ref.npz', '--detector', det)
    ok = ('--ref', tmp_path / 'ref.npz', '--detector', det)
    assert 'no such file' in error_of('calc', '--images', tmp_path / 'missing', '--num', 10, *ok)
    assert 'no such file' in error_of('calc', '--images', d / 'data', '--num', 10, '--ref', tmp_path / 'missing.npz', '--detector', det)
    assert 'no such file' in error_of('ref', '--data', d / 'data', '--dest', tmp_path / 'x.npz', '--detector', tmp_path / 'missing.pt')
    (tmp_path / 'empty').mkdir()
    assert 'no images' in error_of('calc', '--images', tmp_path / 'empty', '--num', 10, *ok)
    save_dataset(str(tmp_path / 'mixed'), images[:3])
    save_dataset(str(tmp_path / 'big'), np.zeros([1, 3, 32, 32], np.uint8))
    os.replace(tmp_path / 'big' / '00000' / 'img00000000.png', tmp_path / 'mixed' / '00000' / 'img00000003.png')
    assert 'expected [3, 16, 16]' in error_of('calc', '--images', tmp_path / 'mixed', '--num', 4, *ok)
    assert 'has 40 images, fewer than --num 50' in error_of('calc', '--images', d / 'data', '--num', 50, *ok)
    np.savez(tmp_path / 'nostats.npz', mean=np.zeros(8))
    assert 'mu and sigma' in error_of('calc', '--images', d / 'data', '--num', 10, '--ref', tmp_path / 'nostats.npz', '--detector', det)
    np.savez(tmp_path / 'wrongkey.npz', pictures=images)
    assert 'no "images"' in error_of('calc', '--images', tmp_path / 'wrongkey.npz', '--num', 10, *ok)
    np.savez(tmp_path / 'nchw.npz', images=images)                    # channels-first: not [N, H, W, C]
    assert 'uint8 [N, H, W, C]' in error_of('calc', '--images', tmp_path / 'nchw.npz', '--num', 10, *ok)
    # Detectors: a foreign global is refused by name before anything runs; a weights file is no TorchScript.
    (tmp_path / 'hostile.pkl').write_bytes(pickle.dumps(Hostile()))
    assert 'system' in error_of('calc', '--images', d / 'data', '--num', 10, '--ref', tmp_path / 'ref.npz', '--detector', tmp_path / 'hostile.pkl')
    torch.save({'w': torch.zeros(3)}, tmp_path / 'weights.pt')
    assert 'not a TorchScript module' in error_of('calc', '--images', d / 'data', '--num', 10, '--ref', tmp_path / 'ref.npz', '--detector', tmp_path / 'weights.pt')
    dump_edm_pickle(DetectorRecord(b'no archive'), str(tmp_path / 'python.pkl'))
    assert 'TorchScript archive' in error_of('calc', '--images', d / 'data', '--num', 10, '--ref', tmp_path / 'ref.npz', '--detector', tmp_path / 'python.pkl')


def _ref_worker(rank, port, data, dest, det):
    os.environ.update(WORLD_SIZE='2', RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fid_min.main(['ref', '--data', data, '--dest', dest, '--detector', det, '--batch', '6'])


def test_two_process_gloo_stats_equal_single_process(files, tmp_path):
    # torchrun's environment, two CPU processes: each takes every second image, sums are all-reduced.
    import socket
    d, _ = files
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ref_worker, args=(port, str(d / 'data'), str(tmp_path / 'ref2.npz'), str(d / 'det.pt')), nprocs=2)
    run('ref', '--data', d / 'data', '--dest', tmp_path / 'ref1.npz', '--detector', d / 'det.pt')
    (mu2, sigma2), (mu1, sigma1) = ref_stats(tmp_path / 'ref2.npz'), ref_stats(tmp_path / 'ref1.npz')
    np.testing.assert_allclose(mu2, mu1, atol=1e-9)
    np.testing.assert_allclose(sigma2, sigma1, atol=1e-9)
