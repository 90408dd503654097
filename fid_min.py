"""The metrics of the papers' tables in plain PyTorch, each as its reference implementation computes it:

    fid        Frechet distance of Inception-v3 pool features (Heusel et al. 2017), EDM's fid.py
    is         Inception Score (Salimans et al. 2016), StyleGAN2-ADA's is50k / guided-diffusion's evaluator
    pr         precision and recall (Kynkaanniemi et al. 2019), k = 3 on Inception pool features (guided-diffusion)
    fd_clip    Frechet distance of CLIP ViT-B/32 embeddings, clean-fid's clip_vit_b_32 ("CLIP-FID")
    fd_dinov2  Frechet distance of DINOv2 ViT-L/14 class tokens, EDM2's calculate_metrics.py (FD_DINOv2)

    python fid_min.py calc --images samples/ --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    python fid_min.py calc --net ckpt.pt --num 50000 --ref cifar10-32x32.npz     # generate in memory, no files
    python fid_min.py ref --data cifar10-32x32.zip --dest my-ref.npz --metrics all # one reference for every metric
    python fid_min.py calc --net ckpt.pt --ref my-ref.npz --metrics all --json results.json
    torchrun --nproc_per_node=8 fid_min.py calc ...                             # each rank a share of the images
    python fid_min.py bench --num 1000                                           # CPU time: networks vs the rest

Reference files are npz. EDM's format (mu float64 [2048], sigma float64 [2048, 2048]) is the fid entry, so EDM's
published statistics work unchanged; `fid_min.py ref` writes beside it pr_features (the Inception features of up to
--pr-num images: P/R compares sets of points, not statistics), fd_clip_mu / fd_clip_sigma and fd_dinov2_mu /
fd_dinov2_sigma. The Inception detector is called as detector(uint8 [N, 3, H, W], return_features=True) -> float
[N, 2048] at the dataset resolution (it resizes internally), exactly as EDM's fid.py calls it, and as
detector(images, no_output_bias=True) -> the 1008 class probabilities of the Inception Score.

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
network's forward pass is; only the pickle layer is reduced to plain data. CLIP and DINOv2 are our own networks
(backbones.py); their released files are read as tensors only (--clip-weights, --dinov2-weights).
"""

import argparse
import json
import os
import time
import warnings

import numpy as np
import PIL.Image
import scipy.linalg
import torch
import torch.nn.functional as F

import backbones
import cli
import dataset_min
import safe_files
import sample_min
from cli import parse_seeds

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
    # Covariances of fewer images than features are singular, and sqrtm then warns although its result is the
    # one EDM's formula takes: the warning would read as an error to a newcomer.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))

#----------------------------------------------------------------------------
# Inception Score (Salimans et al. 2016) as StyleGAN2-ADA's metrics/inception_score.py and guided-diffusion's
# evaluations/evaluator.py compute it: from the 1008-way softmax of the Inception graph without its output bias.

def inception_score(probs, num_splits=10):
    """(mean, std, split scores) of the Inception Score of class probabilities [N, C]. Split i is rows
    [i N // S, (i + 1) N // S) (StyleGAN2-ADA's rule; guided-diffusion's chunks of 5,000 rows are the same splits
    for N = 50,000), its score exp(mean_x KL(p(y|x) || p(y))) with p(y) the split's mean, and std the population
    standard deviation over the splits. In float32 NumPy arithmetic, as both references compute it, so the values
    are theirs (float64 moves them by up to 3e-6 relative). An exact zero probability gives NaN (0 log 0), as there."""
    p = np.asarray(torch.as_tensor(probs).cpu(), dtype=np.float32)
    if p.ndim != 2 or len(p) < num_splits:
        raise ValueError(f'the Inception Score needs probabilities [N, C] with N >= {num_splits}, got {list(p.shape)}')
    n, scores = len(p), []
    with np.errstate(divide='ignore', invalid='ignore'):
        for i in range(num_splits):
            part = p[i * n // num_splits:(i + 1) * n // num_splits]
            kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
            scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores)), [float(s) for s in scores]

#----------------------------------------------------------------------------
# Improved precision and recall (Kynkaanniemi et al. 2019), k = 3 as in guided-diffusion's evaluator and
# StyleGAN2-ADA's pr50k3. Each point's neighbourhood is the ball whose radius is its distance to its k-th nearest
# neighbour in its own set, the point itself being neighbour 0; precision is the fraction of generated points in
# the union of the real balls, recall the fraction of real points in the union of the generated balls; a distance
# equal to a radius is inside. Squared distances |u|^2 - 2 u.v + |v|^2 as guided-diffusion computes them, in
# float32 (StyleGAN2-ADA's float16 overflows for large features), a block of PR_BATCH x PR_BATCH at a time, so the
# memory stays bounded: 50,000 x 50,000 on a GPU, small sets on a CPU.

PR_BATCH = 5000


def squared_distances(a, b, a_sq, b_sq):
    """max(|a_i|^2 - 2 a_i . b_j + |b_j|^2, 0) [n, m] of rows a [n, D], b [m, D] and their squared norms."""
    return torch.mm(a, b.T).mul_(-2).add_(a_sq[:, None]).add_(b_sq[None, :]).clamp_min_(0)


def knn_radii(x, k=3, batch=PR_BATCH):
    """Squared distance of each row of x [N, D] to its k-th nearest neighbour in x, the row itself (distance 0) being
    neighbour 0: the (k+1)-th smallest value of its distance row."""
    sq, radii = x.square().sum(dim=1), []
    for i in range(0, len(x), batch):
        nearest = [squared_distances(x[i:i + batch], x[j:j + batch], sq[i:i + batch], sq[j:j + batch])
                   .topk(min(k + 1, len(x) - j, batch), dim=1, largest=False).values for j in range(0, len(x), batch)]
        radii.append(torch.cat(nearest, dim=1).topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def manifold_membership(real, fake, k=3, batch=PR_BATCH):
    """(fake rows inside the real manifold bool [M], real rows inside the generated manifold bool [N]) of float32
    features real [N, D] and fake [M, D] on the device the work runs on."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or min(len(real), len(fake)) <= k:
        raise ValueError(f'precision/recall needs two feature sets [N, D] of the same D with more than k = {k} rows, '
                         f'got {list(real.shape)} and {list(fake.shape)}')
    r_real, r_fake = knn_radii(real, k, batch), knn_radii(fake, k, batch)
    sq_real, sq_fake = real.square().sum(dim=1), fake.square().sum(dim=1)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for i in range(0, len(fake), batch):            # one pass over the fake x real blocks serves both directions
        for j in range(0, len(real), batch):
            d = squared_distances(fake[i:i + batch], real[j:j + batch], sq_fake[i:i + batch], sq_real[j:j + batch])
            fake_in[i:i + batch] |= (d <= r_real[None, j:j + batch]).any(dim=1)
            real_in[j:j + batch] |= (d <= r_fake[i:i + batch, None]).any(dim=0)
    return fake_in, real_in


def precision_recall(real, fake, k=3, batch=PR_BATCH, device='cpu'):
    """(precision, recall) of generated features fake [M, D] against real features real [N, D], in float32."""
    real, fake = (torch.as_tensor(x).to(device, torch.float32) for x in (real, fake))
    fake_in, real_in = manifold_membership(real, fake, k, batch)
    return fake_in.double().mean().item(), real_in.double().mean().item()

#----------------------------------------------------------------------------
# The feature networks ("detectors"), each uint8 images [N, C, H, W] in, float features out, resizing inside.

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


def class_probabilities(detector, images):
    """The Inception detector's 1008 class probabilities without its output bias, [N, 1008] float32: StyleGAN2-ADA
    calls it so for the Inception Score (guided-diffusion multiplies the pool features by the same weights)."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return detector(images, no_output_bias=True).to(torch.float32)


def pil_bicubic(images, size):
    """uint8 [N, C, H, W] -> uint8 [N, 3, size, size], each image resized by Pillow's BICUBIC filter, which rounds
    and clamps to uint8 between its horizontal and vertical passes (clean-fid's torchvision Resize on a PIL image
    is this call for square images)."""
    resized = [cli.to_pil(x).convert('RGB').resize((size, size), PIL.Image.BICUBIC) for x in images.cpu().numpy()]
    return torch.from_numpy(np.stack([np.asarray(x) for x in resized]).transpose(0, 3, 1, 2))


def normalize(x, mean, std):
    """(x / 255 - mean) / std per channel, in float32 (torchvision's Normalize after ToTensor)."""
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x.to(torch.float32) / 255 - mean) / std


class CLIPFeatures:
    """FD_CLIP's detector, clean-fid's clip_vit_b_32: Pillow bicubic resize to 224, x / 255, CLIP's mean and std,
    then the 512-d embedding of backbones.CLIPImageEncoder, in float32 (clean-fid on a CPU; on a GPU it runs in
    float16)."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, net):
        self.net = net

    def preprocess(self, images):
        return normalize(pil_bicubic(images, self.net.resolution), self.mean, self.std)

    def __call__(self, images):
        with torch.no_grad():
            return self.net(self.preprocess(images).to(self.net.proj.device))


class DINOv2Features:
    """FD_DINOv2's detector, EDM2's DINOv2Detector (calculate_metrics.py, its default 'torch' resize): float bicubic
    resize with antialiasing to 224, neither rounded nor clamped, x / 255, ImageNet's mean and std, then the
    final-normed class token of backbones.DINOv2."""
    def __init__(self, net):
        self.net = net

    def preprocess(self, images):
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        x = images.to(self.net.norm.weight.device, torch.float32)
        x = F.interpolate(x, size=(224, 224), mode='bicubic', antialias=True)
        return normalize(x, backbones.IMAGENET_MEAN, backbones.IMAGENET_STD)

    def __call__(self, images):
        with torch.no_grad():
            return self.net(self.preprocess(images))

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


#----------------------------------------------------------------------------
# Image sources. Each rank takes every world-th image; statistics are summed across ranks afterwards.

def edm_subset(count, num=None):
    """Indices of the images used out of count: all (num=None), else num of them chosen as EDM's fid.py does
    (dataset max_size: shuffle the indices with RandomState(0), keep num, sort)."""
    indices = np.arange(count)
    if num is not None and count > num:
        np.random.RandomState(0).shuffle(indices)
        indices = np.sort(indices[:num])
    return indices


def open_images(source):
    """(count, read(i) -> uint8 [C, H, W]) of a folder / zip of PNGs (EDM's dataset format) or an npz."""
    if not os.path.exists(source):
        raise FileNotFoundError(f'no such file or folder: {source}')
    if str(source).endswith('.npz'):
        array = safe_files.NpzImages(source)
        return len(array), (lambda i: array[i])
    dataset = dataset_min.ImageDataset(source, use_labels=False)
    return len(dataset), (lambda i: dataset[i][0])


def image_batches(source, num=None, batch=64, rank=0, world=1, device='cpu'):
    """Yield uint8 [B, C, H, W] batches of this rank's share of the images of `source`: every image (num=None), else
    exactly num of them (edm_subset; an error when there are fewer)."""
    count, read = open_images(source)
    if num is not None and count < num:
        raise ValueError(f'{source} has {count} images, fewer than --num {num} (EDM\'s protocol measures 50,000); '
                         f'--num {count} measures all of them')
    mine = edm_subset(count, num)[rank::world]
    for i in range(0, len(mine), batch):
        yield torch.from_numpy(np.stack([read(j) for j in mine[i:i + batch]])).to(device)

#----------------------------------------------------------------------------
# The metrics: which network output each one needs, what it keeps of it (running statistics, or every row), and
# which arrays of the reference npz it compares with.

METRICS = {             # name: (network output, kept as, reference arrays)
    'fid':       ('inception', 'stats', ('mu', 'sigma')),
    'is':        ('inception_probs', 'rows', ()),
    'pr':        ('inception', 'rows', ('pr_features',)),
    'fd_clip':   ('clip', 'stats', ('fd_clip_mu', 'fd_clip_sigma')),
    'fd_dinov2': ('dinov2', 'stats', ('fd_dinov2_mu', 'fd_dinov2_sigma')),
}
NETWORK_OF = {'clip': 'clip_vit_b_32', 'dinov2': 'dinov2_vitl14'}    # output -> backbones.build_metric_network name


def parse_metrics(text):
    """'fid,pr' / 'all' -> list of metric names."""
    names = list(METRICS) if text.strip() == 'all' else [m.strip() for m in text.split(',') if m.strip()]
    if not names or len(set(names)) != len(names) or not set(names) <= set(METRICS):
        raise argparse.ArgumentTypeError(f'--metrics takes distinct names from {", ".join(METRICS)} (comma separated) '
                                         f'or all, got {text!r}')
    return names


def load_networks(metrics, detector=DETECTOR_URL, clip_weights=backbones.WEIGHT_URLS['clip_vit_b_32'],
                  dinov2_weights=backbones.WEIGHT_URLS['dinov2_vitl14'], device='cpu'):
    """{network output: function uint8 images -> float features} for the metrics. Every weight file is found (or
    downloaded into the cache) before any is loaded; each missing one is a line of the error, naming what to
    download and which option takes it."""
    outputs = {METRICS[m][0] for m in metrics}
    sources = {'inception': detector} if outputs & {'inception', 'inception_probs'} else {}
    sources.update({o: w for o, w in (('clip', clip_weights), ('dinov2', dinov2_weights)) if o in outputs})
    paths, missing = {}, []
    for output, source in sources.items():
        try:
            if output in NETWORK_OF:        # its message names the file to download and the option
                paths[output] = backbones.resolve_weights(NETWORK_OF[output], source)
            else:
                paths[output] = safe_files.open_url(source)
        except FileNotFoundError as e:
            missing.append(cli.error_line(e) if output in NETWORK_OF else f'no such file: {source} (the Inception '
                           f'detector: download {DETECTOR_URL} and pass its local path, --detector PATH)')
        except OSError as e:
            missing.append(cli.error_line(e) + ('' if output in NETWORK_OF else ' (--detector PATH)'))
    if missing:
        raise SystemExit('\n'.join(f'error: {line}' for line in missing))
    nets = {}
    if 'inception' in paths:
        inception = load_detector(paths['inception'], device)
        if 'inception_probs' in outputs and isinstance(inception, ToyClassifier):
            raise ValueError('--metrics is needs the Inception detector (the toy classifier gives no class probabilities)')
        nets.update(inception=lambda x: detect(inception, x), inception_probs=lambda x: class_probabilities(inception, x))
    if 'clip' in paths:
        nets['clip'] = CLIPFeatures(backbones.build_metric_network('clip_vit_b_32', paths['clip']).to(device))
    if 'dinov2' in paths:
        nets['dinov2'] = DINOv2Features(backbones.build_metric_network('dinov2_vitl14', paths['dinov2']).to(device))
    return {o: nets[o] for o in outputs}


def measure(batches, networks, metrics, total=None, rank=0, world=1, select=None, progress=True):
    """One pass over the images, each network once per batch. Returns ({output: FeatureStats} summed over ranks,
    {output: float32 rows [N, D] in image order}, gathered on rank 0 and None elsewhere) for the metrics' outputs.
    select: which of this rank's images give rows (bool per image; fid_min.py ref: the P/R subset)."""
    stats = {METRICS[m][0]: FeatureStats() for m in metrics if METRICS[m][1] == 'stats'}
    rows = {METRICS[m][0]: [] for m in metrics if METRICS[m][1] == 'rows'}
    positions, n = [], 0
    with torch.no_grad():
        for images in batches:
            chosen = np.arange(len(images)) if select is None else np.flatnonzero(select[n:n + len(images)])
            for output, network in networks.items():
                y = network(images)
                if output in stats:
                    stats[output].add(y)
                if output in rows:
                    rows[output].append(y[torch.from_numpy(chosen).to(y.device)].float().cpu())
            positions.append((n + chosen) * world + rank)      # the image's place in the list all ranks share
            n += len(images)
            if progress and rank == 0:
                share = '' if total is None else f'/{-(-total // world)}'
                print(f'\r{n}{share} images (rank 0 of {world})', end='', flush=True)
    if progress and rank == 0:
        print()
    for s in stats.values():
        s.reduce()
    positions = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    for output, parts in rows.items():
        got = cli.gather_to_rank0([(positions, torch.cat(parts))] if parts else [])
        if got is not None:                 # rank 0: every rank's rows, back in image order
            rows[output] = torch.cat([y for _, y in got])[np.argsort(np.concatenate([p for p, _ in got]), kind='stable')]
        else:
            rows[output] = None
    return stats, rows


def load_reference(source, metrics):
    """{array name: array} of reference npz `source` for the metrics; a reference without what a metric needs is
    one line naming the arrays and how to make them."""
    wanted = [m for m in metrics if METRICS[m][2]]
    if not wanted:
        return {}
    with safe_files.NpzFile(safe_files.open_url(source)) as f:
        have = set(f.files)
    lacking = [m for m in wanted if not set(METRICS[m][2]) <= have]
    if lacking:
        what = '; '.join(f'{m} needs {" and ".join(METRICS[m][2])}' for m in lacking)
        raise ValueError(f'{source} holds no reference for --metrics {",".join(lacking)} ({what}); make one with: '
                         f'python fid_min.py ref --metrics {",".join(wanted)} --data DATASET --dest REF.npz')
    ref = {}
    for m in wanted:
        keys = METRICS[m][2]
        if len(keys) == 2:
            ref[keys[0]], ref[keys[1]] = safe_files.load_ref(source, *keys)
        else:
            ref[keys[0]] = safe_files.load_ref_features(source, keys[0])
    return ref


def compute_metrics(metrics, stats, rows, ref, device='cpu'):
    """{result: value} from measure()'s outputs and load_reference()'s arrays: fid, is_mean, is_std, precision,
    recall, fd_clip, fd_dinov2."""
    out = {}
    for m in metrics:
        output, _, keys = METRICS[m]
        if m == 'is':
            out['is_mean'], out['is_std'], _ = inception_score(rows[output])
        elif m == 'pr':
            out['precision'], out['recall'] = precision_recall(ref[keys[0]], rows[output], device=device)
        else:
            mu, sigma = stats[output].mu_sigma()
            if mu.shape != ref[keys[0]].shape:
                raise ValueError(f'{m}: the features have {mu.size} dimensions, the reference {ref[keys[0]].size}')
            out[m] = frechet_distance(mu, sigma, ref[keys[0]], ref[keys[1]])
    return out


LABELS = {'fid': 'FID', 'is_mean': 'IS', 'is_std': 'IS std', 'precision': 'precision', 'recall': 'recall',
          'fd_clip': 'FD_CLIP', 'fd_dinov2': 'FD_DINOv2'}


def format_results(results):
    return ', '.join(f'{LABELS[k]} {v:.4f}' for k, v in results.items() if k in LABELS)

#----------------------------------------------------------------------------
# During training (train_min.py --metrics fid --ref REF): the EMA generator at every snapshot.

TRAINING_METRICS = ('fid', 'is', 'pr')     # the Inception's metrics: one detector pass per snapshot


def min_images(metrics):
    """The fewest images the metrics are defined for: a covariance needs 2, P/R more than k = 3, IS 10 splits."""
    return 10 if 'is' in metrics else 4 if 'pr' in metrics else 2


def check_training_metrics(metrics, ref, num):
    """train_min.py's --metrics, --ref and --metric-images: the problem in one line, or None."""
    if not metrics:
        return None
    try:
        names = parse_metrics(metrics)
    except argparse.ArgumentTypeError as e:
        return str(e)
    if 'fid' not in names or not set(names) <= set(TRAINING_METRICS):
        return f'--metrics during training takes fid and optionally is, pr (the best snapshot: lowest FID), got {metrics!r}'
    if not ref:
        return '--metrics needs --ref, a reference npz (fid_min.py ref, or EDM\'s published statistics)'
    if not safe_files.is_url(ref) and not os.path.isfile(ref):
        return f'--ref {ref}: no such file'
    if num < min_images(names):
        return f'--metric-images must be >= {min_images(names)} for --metrics {metrics}, got {num}'
    return None


class SnapshotMetrics:
    """The metrics of cfg.metrics for the EMA generator at every snapshot, on seeds 0..cfg.metric_images-1 (the same
    images every time; each rank generates and measures its share), one JSON line per snapshot in
    RUN_DIR/metrics.jsonl (on --resume the lines after the resumed state are dropped, with stats.jsonl's) and
    RUN_DIR/best-snapshot.json naming the snapshot of the lowest FID so far. The reference and the detector are
    loaded when this is made: a bad file fails before training."""
    def __init__(self, cfg, run_dir, device, rank=0, world=1, batch=64):
        self.metrics, self.num, self.run_dir = parse_metrics(cfg.metrics), cfg.metric_images, run_dir
        self.ref = load_reference(cfg.ref, self.metrics)
        self.networks = load_networks(self.metrics, cfg.detector, device=device)
        self.seeds, self.batch, self.device = list(range(self.num))[rank::world], batch, device
        self.rank, self.world = rank, world
        self.best = None
        if self.num < world:    # every rank measures a share: an empty one would leave the others waiting
            raise ValueError(f'--metric-images {self.num} is fewer than the {world} processes of this run')
        path = os.path.join(run_dir, 'metrics.jsonl')
        if rank == 0 and os.path.isfile(path):      # a resumed run: its record so far
            with open(path) as f:
                for line in f:
                    try:
                        self.note(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        pass                        # a line cut off by a kill

    def note(self, line):
        """Keep the lowest-FID line so far and name its snapshot in best-snapshot.json."""
        if line['fid'] is not None and (self.best is None or line['fid'] < self.best['fid']):
            self.best = {k: line[k] for k in ('snapshot', 'kimg', 'fid')}
            text = json.dumps(self.best).encode() + b'\n'
            cli.atomic_write(os.path.join(self.run_dir, 'best-snapshot.json'), lambda f: f.write(text))

    def __call__(self, net, kimg, snapshot):
        """Measure `net` (the EMA generator, on every rank), record it as snapshot `snapshot`; the line on rank 0."""
        t0 = time.time()
        with cli.torch_flags(tf32=False):      # float32 features and distances, whatever the training loop uses
            batches = (x for _, x in sample_min.generate_images(net, self.seeds, self.batch, device=self.device))
            stats, rows = measure(batches, self.networks, self.metrics, self.num, self.rank, self.world, progress=False)
        if self.rank != 0:
            return None
        line = dict(kimg=kimg, snapshot=snapshot, **compute_metrics(self.metrics, stats, rows, self.ref, self.device),
                    images=self.num, seconds=time.time() - t0)
        line = {k: None if v != v else v for k, v in line.items()}             # NaN (0 log 0 in IS) -> null
        with open(os.path.join(self.run_dir, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(line) + '\n')
        self.note(line)
        print(f'{snapshot}: {format_results(line)} ({self.num} images, {line["seconds"]:.0f}s); '
              f'best so far {self.best["snapshot"] if self.best else "none"}', flush=True)
        return line

#----------------------------------------------------------------------------
# python fid_min.py bench: where the time of the metrics goes on this machine, and the memory P/R takes.

class _Timed:
    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, x):
        t0 = time.perf_counter()
        y = self.fn(x)
        self.seconds += time.perf_counter() - t0
        return y


def bench(num=1000, metrics=tuple(METRICS), pr_num=0, detector=None, batch=64, resolution=32):
    """Seconds of each feature network (with its resizing) and of the rest (statistics, Frechet distances, IS, P/R)
    for num random resolution^2 images on the CPU, with random-filled CLIP and DINOv2 (build_metric_network without
    weights). The Inception network needs its file (detector); without one its outputs are random stand-ins of the
    right sizes, so that the rest is still timed. pr_num > 0: instead, the time and peak memory of precision_recall
    on pr_num x pr_num random 2048-d features."""
    g = torch.Generator().manual_seed(0)
    peak_gb = lambda: cli.peak_memory_gb(torch.device('cpu'))
    if pr_num:
        real, fake = torch.randn(pr_num, 2048, generator=g), torch.randn(pr_num, 2048, generator=g)
        before, t0 = peak_gb(), time.perf_counter()
        precision_recall(real, fake)
        result = dict(pr_num=pr_num, seconds=time.perf_counter() - t0, peak_gb=peak_gb(), peak_before_gb=before)
        print(f'P/R of {pr_num:,} x {pr_num:,} random 2048-d features on the CPU ({torch.get_num_threads()} threads): '
              f'{result["seconds"]:.1f} s, peak resident memory {result["peak_gb"]:.2f} GB, '
              f'{result["peak_gb"] - before:.2f} GB '
              f'above the process before it (which held the features)')
        print('BENCH ' + json.dumps(result))
        return result
    outputs, networks = {METRICS[m][0] for m in metrics}, {}
    if 'clip' in outputs:
        networks['clip'] = _Timed(CLIPFeatures(backbones.build_metric_network('clip_vit_b_32')))
    if 'dinov2' in outputs:
        networks['dinov2'] = _Timed(DINOv2Features(backbones.build_metric_network('dinov2_vitl14')))
    inception = load_detector(detector) if detector and outputs & {'inception', 'inception_probs'} else None
    real = {'inception': lambda x: detect(inception, x), 'inception_probs': lambda x: class_probabilities(inception, x)}
    stand_in = {'inception': lambda x: torch.randn(len(x), 2048, dtype=torch.float64),
                'inception_probs': lambda x: torch.randn(len(x), 1008).softmax(dim=1)}
    networks.update({o: _Timed((real if inception else stand_in)[o]) for o in sorted(outputs & set(real))})
    images = torch.randint(0, 256, (num, 3, resolution, resolution), generator=g, dtype=torch.uint8)
    t0 = time.perf_counter()
    stats, rows = measure((images[i:i + batch] for i in range(0, num, batch)), networks, metrics, num)
    seconds = {o: n.seconds for o, n in networks.items() if o in NETWORK_OF or inception}
    rest = {'statistics': time.perf_counter() - t0 - sum(n.seconds for n in networks.values())}
    ref = {k: v for m in metrics if METRICS[m][1] == 'stats'
           for k, v in zip(METRICS[m][2], stats[METRICS[m][0]].mu_sigma())}      # the set itself: sqrtm costs the same
    ref.update({'pr_features': torch.randn(num, 2048, generator=g)} if 'pr' in metrics else {})
    for m in metrics:
        t1 = time.perf_counter()
        compute_metrics([m], stats, rows, ref)
        rest[m] = time.perf_counter() - t1
    print(f'bench: {", ".join(metrics)} of {num} random {resolution}x{resolution} images on the CPU '
          f'({torch.get_num_threads()} threads), batch {batch}, random-filled CLIP / DINOv2')
    for o in networks:
        print(f'  {o:16s} ' + (f'{seconds[o]:9.1f} s' if o in seconds else 'not timed (no --detector file: random stand-ins)'))
    parts = ', '.join(f'{k} {v:.1f} s' for k, v in rest.items())
    print(f'  {"the rest":16s} {sum(rest.values()):9.1f} s   ({parts})')
    total = sum(seconds.values()) + sum(rest.values())
    print(f'  feature networks {sum(seconds.values()):9.1f} s = {sum(seconds.values()) / total:.1%} of {total:.1f} s')
    result = dict(num=num, metrics=metrics, seconds=seconds, rest_seconds=rest, total_seconds=total)
    print('BENCH ' + json.dumps(result))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    calc = sub.add_parser('calc', help='metrics of generated images against a reference npz')
    src = calc.add_mutually_exclusive_group(required=True)
    src.add_argument('--images', help='folder or zip of PNGs, or npz (images uint8 [N, H, W, C]) from sample_min.py')
    src.add_argument('--net', help='generator checkpoint / GDD pickle / EDM teacher: generate in memory, write nothing')
    calc.add_argument('--ref', required=True, help='reference npz (EDM statistics, or fid_min.py ref), path or URL')
    calc.add_argument('--num', type=int, default=50000, help='number of images (default: %(default)s)')
    calc.add_argument('--seeds', type=parse_seeds, help='with --net: seeds to generate (default: 0 to num-1)')
    calc.add_argument('--steps', type=int, default=18, help='with a teacher --net: EDM sampler steps (default: %(default)s)')
    calc.add_argument('--json', help='also write the results to this JSON file')
    ref = sub.add_parser('ref', help='reference npz of a dataset (every image; P/R features of --pr-num of them)')
    ref.add_argument('--data', required=True, help='dataset: zip or folder in EDM format')
    ref.add_argument('--dest', required=True, help='output npz')
    ref.add_argument('--pr-num', type=int, default=50000, help="P/R: Inception features of this many images, EDM's "
                     'random subset (all when there are fewer) (default: %(default)s)')
    bench_p = sub.add_parser('bench', help='CPU time of the metrics, feature networks vs the rest (random-filled '
                             'networks, random images); or the peak memory of P/R')
    bench_p.add_argument('--num', type=int, default=1000, help='random 32x32 images (default: %(default)s)')
    bench_p.add_argument('--pr-num', type=int, default=0, help='> 0: only P/R, of this many x this many random features')
    bench_p.add_argument('--detector', help='Inception detector file to time (default: none, random stand-in outputs)')
    for q, default in ((calc, 'fid'), (ref, 'fid'), (bench_p, 'all')):
        q.add_argument('--metrics', type=parse_metrics, default=default,
                       help=f'comma separated from {", ".join(METRICS)}, or all (default: %(default)s)')
        q.add_argument('--batch', type=int, default=64, help='images per batch and rank (default: %(default)s)')
    for q in (calc, ref):
        q.add_argument('--detector', default=DETECTOR_URL,
                       help='Inception-v3 TorchScript file or pickle, path or URL (default: %(default)s)')
        q.add_argument('--clip-weights', default=backbones.WEIGHT_URLS['clip_vit_b_32'],
                       help="CLIP ViT-B/32: OpenAI's ViT-B-32.pt or open_clip's safetensors, path or URL (default: %(default)s)")
        q.add_argument('--dinov2-weights', default=backbones.WEIGHT_URLS['dinov2_vitl14'],
                       help='DINOv2 ViT-L/14: dinov2_vitl14_pretrain.pth, path or URL (default: %(default)s)')
    args = p.parse_args(argv)
    # One line for an expected error, a clean stop on Ctrl-C / SIGTERM; float32 features and distances (no TF32)
    with cli.cli_errors(), cli.torch_flags(tf32=False):
        if args.cmd == 'bench':
            check_bench_options(args)
            return bench(args.num, args.metrics, args.pr_num, args.detector, args.batch)
        with cli.distributed() as (rank, world, device):
            return run_command(args, rank, world, device)


def check_bench_options(args):
    least = min_images(args.metrics)
    if args.pr_num < 0 or 0 < args.pr_num < 4:
        raise ValueError(f'--pr-num must be 0 (time the metrics) or >= 4 (P/R needs more than k = 3 points), '
                         f'got {args.pr_num}')
    if not args.pr_num and args.num < least:
        raise ValueError(f'--num must be >= {least} for --metrics {",".join(args.metrics)}, got {args.num}')
    if args.batch < 1:
        raise ValueError(f'--batch must be >= 1, got {args.batch}')


def run_command(args, rank, world, device):
    """fid_min.py calc and ref: the options checked and the files loaded before any work, then the work."""
    sample_min.check_sampling_options(args.batch, getattr(args, 'steps', 18))
    if args.cmd == 'calc':
        if args.images and args.seeds:
            raise ValueError('--seeds chooses the seeds of --net; with --images use --num')
        count = len(args.seeds) if args.net and args.seeds else args.num
        least = min_images(args.metrics)
        if count < least:
            raise ValueError(f'--num must be >= {least} for --metrics {",".join(args.metrics)}, got {count}')
        if count < world:       # every rank measures a share: an empty one would leave the others waiting
            raise ValueError(f'{count} images are fewer than the {world} processes of this run')
        if args.json:
            cli.check_output(args.json, '--json')
        ref_arrays = load_reference(args.ref, args.metrics)       # fail on a bad reference before any work
    else:
        cli.check_output(args.dest, '--dest')
        args.metrics = [m for m in args.metrics if METRICS[m][2]]
        if not args.metrics:
            raise ValueError('--metrics is needs no reference (choose fid, pr, fd_clip or fd_dinov2)')
        if 'pr' in args.metrics and args.pr_num < 4:
            raise ValueError(f'--pr-num must be >= 4 (P/R needs more than k = 3 points), got {args.pr_num}')
        count = open_images(args.data)[0]
        if count < world:
            raise ValueError(f'{args.data} has {count} images, fewer than the {world} processes of this run')
    networks = load_networks(args.metrics, args.detector, args.clip_weights, args.dinov2_weights, device)
    if args.cmd == 'ref':
        return make_reference(args, networks, rank, world, device)
    if args.images:
        batches = image_batches(args.images, args.num, args.batch, rank, world, device)
    else:
        seeds = args.seeds or list(range(args.num))
        net = sample_min.load_net(args.net, device)
        batches = (images for _, images in sample_min.generate_images(
            net, seeds[rank::world], args.batch, None, args.steps, device))
    stats, rows = measure(batches, networks, args.metrics, count, rank, world)
    if rank == 0:
        results = dict(compute_metrics(args.metrics, stats, rows, ref_arrays, device), images=count)
        print(f'{format_results(results)} ({count} images)')
        if args.json:
            info = dict(results, source=args.images or args.net, ref=args.ref)
            cli.atomic_write(args.json, lambda f: f.write(json.dumps(info, indent=1).encode() + b'\n'))
        return results


def make_reference(args, networks, rank, world, device):
    """fid_min.py ref: the statistics of every image and, for P/R, the features of --pr-num of them, in one npz."""
    select = None
    if 'pr' in args.metrics:
        chosen = np.zeros(open_images(args.data)[0], dtype=bool)
        chosen[edm_subset(len(chosen), args.pr_num)] = True
        select = chosen[rank::world]
    stats, rows = measure(image_batches(args.data, None, args.batch, rank, world, device), networks, args.metrics,
                          None if select is None else len(chosen), rank, world, select)
    if rank == 0:
        arrays = {}
        for m in args.metrics:
            output, kept, keys = METRICS[m]
            values = stats[output].mu_sigma() if kept == 'stats' else [rows[output].numpy()]
            arrays.update(zip(keys, values))
        cli.atomic_write(args.dest, lambda f: np.savez(f, **arrays))
        print(f'reference of {next(iter(stats.values())).n if stats else len(chosen)} images ({", ".join(arrays)}): {args.dest}')


if __name__ == '__main__':
    main()
