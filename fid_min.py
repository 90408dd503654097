"""EDM-compatible FID (EDM's fid.py; the official validate_fid.sh: 50,000 images, seeds 0-49999, EMA weights):
Inception-v3 feature statistics and the Frechet distance.

    python fid_min.py calc --images samples/ --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    python fid_min.py calc --net ckpt.pt --num 50000 --ref cifar10-32x32.npz     # generate in memory, no files
    python fid_min.py ref --data cifar10-32x32.zip --dest my-cifar10-32x32.npz   # new reference statistics
    torchrun --nproc_per_node=8 fid_min.py calc ...                             # each rank a share of the images

Reference files are EDM's npz format (mu float64 [2048], sigma float64 [2048, 2048]), so EDM's published
statistics work unchanged. The detector is called as detector(uint8 [N, 3, H, W], return_features=True) ->
float [N, 2048] at the dataset resolution (it resizes internally), exactly as EDM's fid.py calls it.

Detector files (--detector, path or URL, cached like safe_files.load_network):
- default, DETECTOR_URL: StyleGAN2-ADA's inception-2015-12-05.pt, the TorchScript translation of TensorFlow's
  2015-12-05 Inception-v3 graph, loaded with torch.jit.load. It is the default because it needs no pickle at all.
- EDM_DETECTOR_URL: NVIDIA's inception-2015-12-05.pkl that EDM's fid.py downloads and unpickles. We read it with
  safe_files.read_pickle (allow-listed globals only; an unknown global fails naming it; embedded Python source is
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
import os

import numpy as np
import scipy.linalg
import torch

import cli
import dataset_min
import safe_files
import sample_min
from cli import init_distributed, parse_seeds

#----------------------------------------------------------------------------
# Feature statistics as EDM's fid.py computes them: mu = sum(f) / N,
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
    """FID = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), real part (Heusel et al. 2017)."""
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


def load_detector(source=DETECTOR_URL, device='cpu'):
    """Feature detector from a TorchScript file, a pickle holding one, or a toy classifier (module docstring)."""
    try:
        path = safe_files.open_url(source)
    except FileNotFoundError:
        raise
    except OSError as e:   # offline: say what to download and how to pass it
        raise OSError(f'{cli.error_line(e)} (fid_min.py: --detector PATH)') from None
    if safe_files.is_zip(path) and not safe_files.is_torchscript(path):    # plain weights: the toy detector
        return load_toy_classifier(path, device)
    archive = safe_files.torchscript_archive(path, name=str(source))
    try:
        detector = torch.jit.load(archive, map_location=device)
    except RuntimeError as e:
        raise ValueError(f'{source}: not a TorchScript module ({cli.error_line(e)})') from None
    return detector.eval()


def detect(detector, images):
    """uint8 [N, C, H, W] -> float64 features [N, D]; grayscale repeated to 3 channels as EDM does."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return detector(images, return_features=True).to(torch.float64)

#----------------------------------------------------------------------------
# Image sources. Each rank takes every world-th image; statistics are summed across ranks afterwards.

def image_batches(source, num=None, batch=64, rank=0, world=1, device='cpu'):
    """Yield uint8 [B, C, H, W] batches from a folder / zip of PNGs (EDM's dataset format) or an npz.
    num=None takes every image; otherwise exactly num, a random subset (seed 0) when there are more, as
    EDM's fid.py does (dataset max_size: shuffle the indices with RandomState(0), keep num, sort)."""
    if not os.path.exists(source):
        raise FileNotFoundError(f'no such file or folder: {source}')
    if str(source).endswith('.npz'):
        array = safe_files.NpzImages(source)
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


def save_ref(path, mu, sigma):
    cli.atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))

#----------------------------------------------------------------------------
# Toy detector: the toy demo's Inception. A small CNN classifier of the 10 toy classes of shapes, trained by
# `python toy.py classifier` (assets/toy-classifier.pt). Its penultimate features (the global average
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


def load_toy_classifier(path, device='cpu'):
    """A ToyClassifier in eval mode from a gdd-min toy-classifier file: plain weights, read and checked like every
    network file (safe_files.build_network: bounded init_kwargs, tensors against the meta-device network)."""
    ckpt = safe_files.load_torch_file(path)
    if not isinstance(ckpt, dict) or ckpt.get('format') != TOY_CLASSIFIER_FORMAT:
        raise ValueError(f'{path}: not a TorchScript module, nor a {TOY_CLASSIFIER_FORMAT} file (a torch.save archive of something else)')
    if not isinstance(ckpt.get('state_dict'), dict):
        raise ValueError(f'{path}: the toy classifier file holds no state_dict')
    try:
        net = safe_files.build_network('ToyClassifier', ckpt.get('init_kwargs'), ckpt.get('state_dict'), {'ToyClassifier': ToyClassifier})
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    return net.eval().requires_grad_(False).to(device)


@cli.clean_stop()      # Ctrl-C / SIGTERM: one line, exit status 130 / 143; quiet when another rank failed
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
            cli.check_output(args.dest, '--dest')
        if args.cmd == 'calc':
            mu_ref, sigma_ref = safe_files.load_ref(args.ref)       # fail on a bad reference before any work
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
    except cli.EXPECTED_ERRORS as e:           # cli.cli_errors(), as the except clause of this try
        raise SystemExit(f'error: {cli.error_line(e)}') from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
