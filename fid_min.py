"""EDM-compatible FID (recipe F.2): Inception-v3 feature statistics and the Frechet distance.

    python fid_min.py calc --images samples/ --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    python fid_min.py calc --net ckpt.pt --num 50000 --ref cifar10-32x32.npz     # generate in memory, no files
    python fid_min.py ref --data cifar10-32x32.zip --dest my-cifar10-32x32.npz   # new reference statistics
    torchrun --nproc_per_node=8 fid_min.py calc ...                             # each rank a share of the images

Reference files are EDM's npz format (mu float64 [2048], sigma float64 [2048, 2048]), so EDM's published
statistics work unchanged. The detector is called as detector(uint8 [N, 3, H, W], return_features=True) ->
float [N, 2048] at the dataset resolution (it resizes internally), exactly as EDM's fid.py calls it.

Detector files (--detector, path or URL, cached like edm_nets.load_network):
- default, DETECTOR_URL: StyleGAN2-ADA's inception-2015-12-05.pt, the TorchScript translation of TensorFlow's
  2015-12-05 Inception-v3 graph, loaded with torch.jit.load. It is the default because it needs no pickle at all.
- EDM_DETECTOR_URL: NVIDIA's inception-2015-12-05.pkl that EDM's fid.py downloads and unpickles. We read it with
  edm_nets.read_pickle (allow-listed globals only; an unknown global fails naming it; embedded Python source is
  never run) and torch.jit.load the TorchScript archive stored inside it. Both files are published as the same
  translation of the same TensorFlow graph; their features were not compared here (no network access).
- any TorchScript module with the same call signature (tests use a small stand-in).
- a gdd-min toy classifier (assets/toy-classifier.pt, format 'gdd-min-toy-classifier'): plain weights read with
  torch.load(weights_only=True) into ToyClassifier below, so no code from the file runs (the toy FID).
Trade-off, stated plainly: torch.jit.load runs the module's TorchScript graph (restricted to TorchScript's
operator set, no arbitrary Python, no imports), so a TorchScript detector is trusted code in the way a
network's forward pass is; only the pickle layer is reduced to plain data.
"""

import argparse
import io
import math
import os
import zipfile

import numpy as np
import scipy.linalg
import torch

import dataset_min
import edm_nets
import sample_min
from sample_min import init_distributed, parse_seeds

#----------------------------------------------------------------------------
# Feature statistics (edm-formats.md (c)): mu = sum(f) / N,
# sigma = (sum(f f^T) - N mu mu^T) / (N - 1), accumulated in float64.

class FeatureStats:
    """Running float64 sums of f and f f^T; `reduce()` sums them across torch.distributed ranks."""
    def __init__(self):
        self.n, self.sum, self.sum_sq = 0, None, None

    def add(self, features):
        f = torch.as_tensor(features).detach().to(torch.float64)    # stays on its device (fast float64 on GPUs)
        if f.ndim != 2:
            raise ValueError(f'features must have shape [N, D], got {list(f.shape)}')
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.sum_sq = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        self.n += f.shape[0]
        self.sum += f.sum(dim=0)
        self.sum_sq += f.T @ f

    def reduce(self):
        # Sum N, sum(f) and sum(f f^T) over ranks: the statistics of the union of every rank's images.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        if self.sum is None:
            raise ValueError('a rank got no images: use fewer processes than images')
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
        flat = torch.cat([n, self.sum, self.sum_sq.flatten()])
        torch.distributed.all_reduce(flat)
        d = self.sum.numel()
        self.n = int(round(flat[0].item()))
        self.sum, self.sum_sq = flat[1:1 + d].clone(), flat[1 + d:].reshape(d, d).clone()
        return self

    def mu_sigma(self):
        if self.n < 2:
            raise ValueError(f'need at least 2 feature vectors for a covariance, got {self.n}')
        mu = self.sum / self.n
        sigma = (self.sum_sq - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def feature_stats(features):
    """(mu [D], sigma [D, D]) in float64 from an [N, D] array or an iterable of [n, D] batches."""
    stats = FeatureStats()
    for batch in ([features] if isinstance(features, (np.ndarray, torch.Tensor)) else features):
        stats.add(batch)
    return stats.mu_sigma()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), real part (recipe F.2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f'statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}')
    m = np.square(mu1 - mu2).sum()
    # SciPy's matrix square root as EDM uses it; the product of two covariances can give a tiny imaginary part.
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))

#----------------------------------------------------------------------------
# Detector.

DETECTOR_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
EDM_DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'


def _torchscript_blobs(data):
    """Every bytes value inside read_pickle data that looks like a zip archive (a torch.jit.save stream); each
    object is visited once (edm_nets.pickle_values), so a pickle of shared children cannot make this hang."""
    return [bytes(v) for v in edm_nets.pickle_values(data) if isinstance(v, (bytes, bytearray)) and bytes(v[:4]) == b'PK\x03\x04']


TORCHSCRIPT_MAX_CODE = 64 * 2**20  # bytes of (deflated) TorchScript code a detector archive may declare


def load_detector(source=DETECTOR_URL, device='cpu'):
    """Feature detector from a TorchScript file or a pickle holding one (see the module docstring)."""
    try:
        path = edm_nets.open_url(source)
    except FileNotFoundError:
        raise
    except OSError as e:   # offline: say what to download and how to pass it
        raise OSError(f'{str(e).splitlines()[0]} (fid_min.py: --detector PATH)') from None
    with open(path, 'rb') as fh:
        is_zip = fh.read(4) == b'PK\x03\x04'     # not zipfile.is_zipfile: a pickle holding an archive passes that
    if is_zip and not _is_torchscript(path):      # a torch.save archive of plain weights (toy detector section)
        return load_toy_classifier(path, device)
    if is_zip:
        archive = path
    else:
        data = edm_nets.read_pickle(path)
        blobs = _torchscript_blobs(data)
        if len(blobs) != 1:
            raise ValueError(f'{source}: expected one TorchScript archive inside the pickle, found {len(blobs)} '
                             f'(its Python source is never executed); use the TorchScript file {DETECTOR_URL}')
        archive = io.BytesIO(blobs[0])
        archive.name = f'{source} (TorchScript archive inside)'
    edm_nets.check_torch_zip(archive, TORCHSCRIPT_MAX_CODE)   # member sizes within the file before torch reads it
    try:
        detector = torch.jit.load(archive, map_location=device)
    except RuntimeError as e:
        raise ValueError(f'{source}: not a TorchScript module ({str(e).strip().splitlines()[0]})') from None
    return detector.eval()


def detect(detector, images):
    """uint8 [N, C, H, W] -> float64 features [N, D]; grayscale repeated to 3 channels as EDM does."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return detector(images, return_features=True).to(torch.float64)

#----------------------------------------------------------------------------
# Image sources. Each rank takes every world-th image; statistics are summed across ranks afterwards.

NPZ_IMAGES_MAX_BYTES = 4 * 2**30  # declared size of an image npz (decompressed twice, one image in memory at a time)


class _NpzImages:
    """uint8 images [N, H, W, C] of an npz (key "images", or "arr_0"), header checked before anything is
    decompressed; image i comes out as [C, H, W]. The member is decompressed front to back as image_batches
    asks for increasing indices, so memory holds one image whatever the file declares (a 1 MB deflated npz can
    declare a 1 GB array); one full pass first verifies the CRC, so a corrupt file is never used."""
    def __init__(self, path):
        self.npz = edm_nets.NpzFile(path)
        self.key = next((k for k in ('images', 'arr_0') if k in self.npz.files), None)
        if self.key is None:
            raise ValueError(f'{path}: no "images" (or "arr_0") array; keys: {", ".join(self.npz.files) or "none"}')
        f, shape, dtype, fortran = self.npz.open(self.key)
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or shape[1] != shape[2] or not 1 <= shape[1] <= 4096 or fortran:
            raise ValueError(f'{path}: images must be uint8 [N, H, W, C] with H == W <= 4096 and C in (1, 3), '
                             f'got {dtype} {list(shape)}')
        if math.prod(shape) > NPZ_IMAGES_MAX_BYTES:
            raise ValueError(f'{path}: {list(shape)} images declare {math.prod(shape):,} bytes, more than the limit of '
                             f'{NPZ_IMAGES_MAX_BYTES:,} (fid_min.NPZ_IMAGES_MAX_BYTES)')
        self.shape, self.size = shape, math.prod(shape[1:])
        for done in range(0, math.prod(shape), 1 << 20):   # CRC check of the whole member, 1 MiB at a time
            self.npz.read(f, min(1 << 20, math.prod(shape) - done))
        f.close()
        self.file, self.next = None, 0

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        if self.file is None or i < self.next:     # (re)start at the first image
            if self.file is not None:
                self.file.close()
            self.file, self.next = self.npz.open(self.key)[0], 0
        while self.next < i:                       # skip, at most 1 MiB at a time
            skip = min(i - self.next, max(1, (1 << 20) // self.size))
            self.npz.read(self.file, skip * self.size)
            self.next += skip
        image = np.frombuffer(self.npz.read(self.file, self.size), np.uint8).reshape(self.shape[1:])
        self.next = i + 1
        return image.transpose(2, 0, 1)           # HWC -> CHW


def _load_npz_images(path):
    return _NpzImages(path)


def image_batches(source, num=None, batch=64, rank=0, world=1, device='cpu'):
    """Yield uint8 [B, C, H, W] batches from a folder / zip of PNGs (EDM's dataset format) or an npz.
    num=None takes every image; otherwise exactly num, a random subset (seed 0) when there are more, as
    EDM's fid.py does (dataset max_size: shuffle the indices with RandomState(0), keep num, sort)."""
    if not os.path.exists(source):
        raise FileNotFoundError(f'no such file or folder: {source}')
    if str(source).endswith('.npz'):
        array = _load_npz_images(source)
        count, read = len(array), (lambda i: array[i])
    else:
        dataset = dataset_min.ImageDataset(source, use_labels=False)
        count, read = len(dataset), (lambda i: dataset[i][0])
    if num is not None and count < num:
        raise ValueError(f'{source} has {count} images, expected at least {num}')
    indices = np.arange(count)
    if num is not None and count > num:
        np.random.RandomState(0).shuffle(indices)
        indices = np.sort(indices[:num])
    mine = indices[rank::world]
    for i in range(0, len(mine), batch):
        yield torch.from_numpy(np.stack([read(j) for j in mine[i:i + batch]])).to(device)


def compute_stats(batches, detector, device='cpu', total=None, rank=0):
    """FeatureStats of every batch, summed across ranks; prints progress on rank 0."""
    stats = FeatureStats()
    for images in batches:
        stats.add(detect(detector, images.to(device)))
        if rank == 0:
            print(f'\r{stats.n}{"" if total is None else f"/{total}"} images (rank 0)', end='', flush=True)
    if rank == 0:
        print()
    return stats.reduce()


REF_MAX_DIM = 4096  # feature dimension D of reference statistics (Inception-v3: 2048)


def load_ref(source):
    """(mu, sigma) of an EDM reference npz, path or URL: float arrays mu [D], sigma [D, D] with D <= REF_MAX_DIM,
    checked from their headers before anything is decompressed, and finite (FID of NaN statistics is no result)."""
    if not str(source).split('?')[0].lower().endswith('.npz'):
        raise ValueError(f'{source}: reference statistics must be an .npz file (arrays mu and sigma, as EDM publishes)')
    path = edm_nets.open_url(source)
    with edm_nets.NpzFile(path) as f:
        if 'mu' not in f.files or 'sigma' not in f.files:
            raise ValueError(f'{source}: reference statistics need arrays mu and sigma; keys: {", ".join(f.files) or "none"}')
        (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = (f.open(k)[1:3] for k in ('mu', 'sigma'))
        d = mu_shape[0] if len(mu_shape) == 1 else -1
        if not 1 <= d <= REF_MAX_DIM or tuple(sigma_shape) != (d, d) or mu_dtype.kind != 'f' or sigma_dtype.kind != 'f':
            raise ValueError(f'{source}: mu must be float [D] and sigma float [D, D] with D <= {REF_MAX_DIM}, '
                             f'got {mu_dtype} {list(mu_shape)} and {sigma_dtype} {list(sigma_shape)}')
        mu, sigma = f.array('mu', 8 * d).astype(np.float64), f.array('sigma', 8 * d * d).astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'{source}: mu or sigma contains NaN or inf')
    return mu, sigma


def save_ref(path, mu, sigma):
    sample_min.atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))

#----------------------------------------------------------------------------
# Toy detector: the toy demo's Inception. A small CNN classifier of the 10 toy classes of shapes, trained by
# `python train_min.py toy-classifier` (assets/toy-classifier.pt). Its penultimate features (the global average
# of the last convolution map) at the full 32x32 resolution give the "toy FID", with the statistics and the
# Frechet distance above; its argmax gives the class accuracy of conditional samples. Unlike a distance of
# images pooled to 8x8 it sees texture: a classifier that never saw speckle or blur responds to both (the test
# checks it). The file is plain weights (torch.save of a dict, read with weights_only=True), the network is
# this class: nothing from the file is executed.

TOY_CLASSIFIER_FORMAT = 'gdd-min-toy-classifier'

class ToyClassifier(torch.nn.Module):
    """forward(uint8 [N, C, R, R]) -> logits [N, num_classes]; return_features=True -> float features
    [N, channels[-1]], the call of the Inception detector. Per level: 2 x (3x3 conv, BatchNorm, ReLU), a 2x2
    average pool between levels, then the global average (the features) and one linear layer (the logits)."""
    def __init__(self, img_resolution=32, img_channels=3, num_classes=10,
                 channels=(16, 32, 64)):      # widths of the levels at R, R/2, R/4, ...
        super().__init__()
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, num_classes=num_classes,
                                channels=list(channels))
        layers, c = [], img_channels
        for i, w in enumerate(channels):
            layers += [torch.nn.AvgPool2d(2)] if i else []
            for _ in range(2):
                layers += [torch.nn.Conv2d(c, w, 3, padding=1), torch.nn.BatchNorm2d(w), torch.nn.ReLU()]
                c = w
        self.main = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(c, num_classes)

    def forward(self, images, return_features=False):
        R, C = self.init_kwargs['img_resolution'], self.init_kwargs['img_channels']
        if images.ndim != 4 or tuple(images.shape[1:]) != (C, R, R):
            raise ValueError(f'the toy classifier takes [N, {C}, {R}, {R}] images, got {list(images.shape)}')
        features = self.main(images.to(torch.float32) / 127.5 - 1).mean(dim=[2, 3])    # uint8 range -> [-1, 1]
        return features if return_features else self.fc(features)


def _is_torchscript(path):
    # Both torch.jit.save and torch.save write zip archives; only TorchScript's holds constants.pkl (and code/).
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith('/constants.pkl') for n in z.namelist())
    except zipfile.BadZipFile:
        return True         # let torch.jit.load report it


def load_toy_classifier(path, device='cpu'):
    """A ToyClassifier in eval mode from a gdd-min toy-classifier file. The architecture is checked against the
    stored weights on the meta device (no memory) before anything is allocated."""
    ckpt = edm_nets.load_torch_file(path)     # validated torch.load (weights_only), one-line errors
    if not isinstance(ckpt, dict) or ckpt.get('format') != TOY_CLASSIFIER_FORMAT:
        raise ValueError(f'{path}: not a TorchScript module, nor a {TOY_CLASSIFIER_FORMAT} file (a torch.save archive of something else)')
    kwargs, state = ckpt.get('init_kwargs'), ckpt.get('state_dict')
    ok = (isinstance(kwargs, dict) and set(kwargs) == {'img_resolution', 'img_channels', 'num_classes', 'channels'}
          and all(isinstance(kwargs[k], int) and 1 <= kwargs[k] <= 4096 for k in ('img_resolution', 'img_channels', 'num_classes'))
          and isinstance(kwargs['channels'], (list, tuple)) and 1 <= len(kwargs['channels']) <= 8
          and all(isinstance(w, int) and 1 <= w <= 4096 for w in kwargs['channels']) and isinstance(state, dict))
    if not ok:
        raise ValueError(f'{path}: bad init_kwargs or state_dict in the toy classifier file')
    with torch.device('meta'):
        want = {k: (v.shape, v.dtype) for k, v in ToyClassifier(**kwargs).state_dict().items()}
    have = {k: (v.shape, v.dtype) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    if have != want:
        bad = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
        raise ValueError(f'{path}: toy classifier weights do not match its init_kwargs ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})')
    net = ToyClassifier(**kwargs)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False).to(device)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    calc = sub.add_parser('calc', help='FID of generated images against reference statistics')
    src = calc.add_mutually_exclusive_group(required=True)
    src.add_argument('--images', help='folder or zip of PNGs, or npz (images uint8 [N, H, W, C]) from sample_min.py')
    src.add_argument('--net', help='generator checkpoint / GDD pickle / EDM teacher: generate in memory, write nothing')
    calc.add_argument('--ref', required=True, help='reference statistics npz (mu, sigma), path or URL')
    calc.add_argument('--num', type=int, default=50000, help='number of images (default: %(default)s)')
    calc.add_argument('--seeds', type=parse_seeds, help='with --net: seeds to generate (default: 0 to num-1)')
    calc.add_argument('--steps', type=int, default=18, help='with a teacher --net: EDM sampler steps (default: %(default)s)')
    ref = sub.add_parser('ref', help='reference statistics of a dataset (every image)')
    ref.add_argument('--data', required=True, help='dataset: zip or folder in EDM format')
    ref.add_argument('--dest', required=True, help='output npz (mu, sigma)')
    for q in (calc, ref):
        q.add_argument('--detector', default=DETECTOR_URL, help='Inception-v3 TorchScript file or pickle, path or URL (default: %(default)s)')
        q.add_argument('--batch', type=int, default=64, help='images per batch and rank (default: %(default)s)')
    args = p.parse_args(argv)

    rank, world, device = init_distributed()
    try:
        sample_min.check_sampling_options(args.batch, getattr(args, 'steps', 18))   # bad options fail before any work
        if args.cmd == 'calc' and args.num < 2:
            raise ValueError(f'--num must be >= 2 (a covariance needs two images), got {args.num}')
        if args.cmd == 'ref':
            sample_min.check_output(args.dest, '--dest')
        if args.cmd == 'calc':
            mu_ref, sigma_ref = load_ref(args.ref)                  # fail on a bad reference before any work
        detector = load_detector(args.detector, device)
        if args.cmd == 'ref':
            stats = compute_stats(image_batches(args.data, None, args.batch, rank, world, device), detector, device, rank=rank)
            if rank == 0:
                mu, sigma = stats.mu_sigma()
                save_ref(args.dest, mu, sigma)
                print(f'statistics of {stats.n} images: {args.dest}')
        elif args.images:
            stats = compute_stats(image_batches(args.images, args.num, args.batch, rank, world, device),
                                  detector, device, args.num, rank)
        else:
            seeds = args.seeds or list(range(args.num))
            net = sample_min.load_net(args.net, device)
            batches = (images for _, images in sample_min.generate_images(
                net, seeds[rank::world], args.batch, None, args.steps, device))
            stats = compute_stats(batches, detector, device, len(seeds), rank)
        if args.cmd == 'calc' and rank == 0:
            mu, sigma = stats.mu_sigma()
            if mu.shape != mu_ref.shape:
                raise ValueError(f'detector features have {mu.size} dimensions, the reference {mu_ref.size}')
            fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)
            print(f'FID {fid:.4f} ({stats.n} images)')
            return fid
    except sample_min.EXPECTED_ERRORS as e:           # sample_min.cli_errors(), as the except clause of this try
        raise SystemExit(f'error: {sample_min.error_line(e)}') from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
