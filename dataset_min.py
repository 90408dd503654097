"""EDM's dataset format in one place: the reader (ImageDataset), the writer (save_dataset) and the converter
from the raw downloads (EDM's dataset_tool.py: the same images, pixel for pixel, names and dataset.json labels).

    python dataset_min.py --source cifar-10-python.tar.gz --dest cifar10-32x32.zip
    python dataset_min.py --source images1024x1024/ --dest ffhq-64x64.zip --resolution 64x64
    python dataset_min.py --source afhq-v2/ --dest afhqv2-64x64.zip --resolution 64x64
    python dataset_min.py --source imagenet/train/ --dest imagenet-64x64.zip --resolution 64x64 --transform center-crop

A dataset is a zip archive (or a folder) of PNGs named 00000/img00000000.png, ... plus a dataset.json
{"labels": [[filename, class_int or [floats]], ...]} (or {"labels": null}), as EDM's training and fid.py read it.
Sources: a folder of images (any extension pillow knows; labels from its dataset.json, else from its top-level
sub-folders when there are several), cifar-10-python.tar.gz (pickles, read without running anything from the
file) or cifar-10-binary.tar.gz. Also the order in which training reads a dataset (InfiniteSampler). Imports
only the standard library, numpy, pillow and cli.py's torch-free plumbing.
"""

import argparse
import io
import json
import math
import os
import pickle
import re
import shutil
import tarfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import PIL.Image

import cli
from cli import error_line

MAX_FILE_BYTES = 1 << 30    # any one image file or dataset.json (a 1024x1024 RGB PNG is 3 MiB, ImageNet's dataset.json 60 MiB)
MAX_CLASSES = 100000        # class labels 0..MAX_CLASSES-1 (label_dim = max class + 1; ImageNet-21k has 21841)

#----------------------------------------------------------------------------
# Reading outside files: bounded in size, one clear line naming the file when it is bad.

def read_file(path, name=None):
    """The bytes of a file on disk, refused above MAX_FILE_BYTES."""
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise ValueError(f'{name or path}: {size} bytes, more than the {MAX_FILE_BYTES} an image or dataset.json may have')
    with open(path, 'rb') as f:
        return f.read()


def open_image(data, name):
    """The decoded PIL image of an image file's bytes. A decompression bomb (more pixels than pillow's
    MAX_IMAGE_PIXELS: its warning is made an error too) or a truncated / corrupt file -> ValueError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
            image.load()
        return image
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
        raise ValueError(f'{name}: refused, too many pixels ({error_line(e)})') from None
    except Exception as e:      # pillow's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f'cannot read image {name}: {error_line(e)}') from None


def parse_labels(data, name='dataset.json'):
    """The [filename, label] pairs of a dataset.json's bytes, or None when it says "labels": null (or has none)."""
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ValueError(f'{name} is not valid JSON: {error_line(e)}') from None
    if not isinstance(meta, dict):
        raise ValueError(f'{name}: expected an object {{"labels": [...]}}, got a JSON {type(meta).__name__}')
    labels = meta.get('labels')
    if labels is None:
        return None
    if not (isinstance(labels, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in labels)):
        raise ValueError(f'{name}: "labels" must be a list of [filename, label] pairs')
    return [tuple(p) for p in labels]


def check_classes(values, name='dataset.json'):
    """True when every label is an integer class (then each must lie in 0..MAX_CLASSES-1)."""
    if not all(type(v) is int for v in values):
        return False
    if values and not 0 <= min(values) <= max(values) < MAX_CLASSES:
        raise ValueError(f'{name}: class labels must be in 0..{MAX_CLASSES - 1}, found {min(values)}..{max(values)}')
    return True


#----------------------------------------------------------------------------
# Dataset: EDM's format (EDM training/dataset.py), a zip or a folder of PNGs plus an optional dataset.json.
# Shared by train_min.py and fid_min.py.

class ImageDataset:
    def __init__(self,
        path,               # Zip archive or folder of images.
        resolution  = None, # Expected side length; None = whatever the images have.
        use_labels  = True, # Read dataset.json labels (if any)?
        xflip       = False,# Append a mirrored copy of every image (doubles the length).
    ):
        self.path, self.xflip = str(path), bool(xflip)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f'dataset not found: {self.path}')
        if os.path.isdir(self.path):
            self._kind = 'dir'
            names = [os.path.relpath(os.path.join(root, f), self.path).replace('\\', '/')
                     for root, _, files in os.walk(self.path) for f in files]
        elif zipfile.is_zipfile(self.path):
            self._kind = 'zip'
            names = self._zip().namelist()
        else:
            raise ValueError(f'dataset must be a folder or a zip archive: {self.path}')
        PIL.Image.init()
        self._names = sorted(n for n in names if os.path.splitext(n)[1].lower() in PIL.Image.EXTENSION)
        if not self._names:
            raise ValueError(f'no images found in {self.path}')
        self.name = os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]

        # Geometry from the first image; every later image is checked against it when it is read.
        first = self._load(0)
        self.num_channels, h, w = first.shape
        if h != w:
            raise ValueError(f'images must be square, {self._names[0]} is {w}x{h}')
        self.resolution = h
        if resolution is not None and int(resolution) != h:
            raise ValueError(f'dataset resolution is {h}x{h}, expected {resolution}x{resolution}')

        # Labels: integer classes (one-hot when read, label_dim = max class + 1) or equal-length float vectors.
        self._classes, self._vectors, self.label_dim = None, None, 0
        pairs = self._read_labels()     # read even when unused: it tells whether the copy is complete
        if pairs is not None:
            table = {name.replace('\\', '/'): value for name, value in pairs}
            missing = sorted(set(table) - set(names))
            if missing:     # an incomplete copy: training or a reference would silently use what is there
                raise ValueError(f'dataset.json lists {len(missing)} file(s) that {self.path} does not hold, e.g. {missing[0]}')
        if pairs is not None and use_labels:
            try:
                values = [table[n] for n in self._names]
            except KeyError as e:
                raise ValueError(f'dataset.json has no label for {e.args[0]}') from None
            if check_classes(values):
                self._classes = np.asarray(values, dtype=np.int64)
                self.label_dim = int(self._classes.max()) + 1
            else:
                try:
                    self._vectors = np.asarray(values, dtype=np.float32).reshape(len(values), -1)
                except (TypeError, ValueError):
                    raise ValueError('dataset.json: labels must be all integers or equal-length float lists') from None
                self.label_dim = self._vectors.shape[1]
        self.has_labels = self.label_dim > 0

    def _zip(self):
        # One handle per process, so a forked DataLoader worker never shares a file position.
        if getattr(self, '_zip_pid', None) != os.getpid():
            self._zip_file, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip_file

    def _read(self, name):
        # Bounded by the size the zip's directory (or the file system) gives; zipfile stops there and checks the CRC.
        size = self._zip().getinfo(name).file_size if self._kind == 'zip' else os.path.getsize(os.path.join(self.path, name))
        if size > MAX_FILE_BYTES:
            raise ValueError(f'{name}: {size} bytes, more than the {MAX_FILE_BYTES} an image or dataset.json may have')
        try:
            if self._kind == 'zip':
                return self._zip().read(name)
            with open(os.path.join(self.path, name), 'rb') as f:
                return f.read()
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f'cannot read {name} from {self.path}: {error_line(e)}') from None

    def _read_labels(self):
        if self._kind == 'zip':
            if 'dataset.json' not in self._zip().namelist():
                return None
        elif not os.path.isfile(os.path.join(self.path, 'dataset.json')):
            return None
        return parse_labels(self._read('dataset.json'))

    def _load(self, i):
        name = self._names[i]
        image = open_image(self._read(name), name)
        if image.mode not in ('L', 'RGB'):
            raise ValueError(f'{name}: image mode {image.mode} is not supported (use L or RGB)')
        x = np.asarray(image, dtype=np.uint8)
        x = x[:, :, None] if x.ndim == 2 else x
        x = x.transpose(2, 0, 1)                                    # HWC -> CHW
        if hasattr(self, 'resolution') and x.shape != (self.num_channels, self.resolution, self.resolution):
            raise ValueError(f'{name} has shape {list(x.shape)}, expected '
                             f'{[self.num_channels, self.resolution, self.resolution]} like the first image')
        return x

    def get_label(self, i):
        if self._classes is not None:
            onehot = np.zeros([self.label_dim], dtype=np.float32)
            onehot[self._classes[i]] = 1
            return onehot
        return self._vectors[i].copy() if self._vectors is not None else np.zeros([0], dtype=np.float32)

    def __len__(self):
        return len(self._names) * (2 if self.xflip else 1)

    def __getitem__(self, idx):
        i = int(idx) % len(self._names)
        image = self._load(i)
        if idx >= len(self._names):                                 # mirrored copy
            image = image[:, :, ::-1]
        return np.ascontiguousarray(image), self.get_label(i)

    def __getstate__(self):                                         # picklable for DataLoader workers
        return {k: v for k, v in self.__dict__.items() if k not in ('_zip_file', '_zip_pid')}

def encode_png(img):
    """PNG bytes of a uint8 HW (grayscale) or HWC (RGB) array, as EDM's dataset_tool writes them: uncompressed."""
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f'expected uint8 [H, W] or [H, W, 3], got {img.dtype} {list(img.shape)}')
    buf = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(img)).save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue()


def save_dataset(path, images, labels=None):
    """Write uint8 images [N, C, H, W] (and integer class labels [N]) in EDM's format: a zip when
    `path` ends in .zip (stored, uncompressed PNGs), else a folder. Written atomically."""
    names = [f'{i:08d}'[:5] + f'/img{i:08d}.png' for i in range(len(images))]
    meta = {'labels': None if labels is None else [[n, int(c)] for n, c in zip(names, labels)]}
    def png(x):
        return encode_png(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0))
    def write_zip(f):
        with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as z:
            for n, x in zip(names, images):
                z.writestr(n, png(x))
            z.writestr('dataset.json', json.dumps(meta))
    if str(path).endswith('.zip'):
        cli.atomic_write(path, write_zip)
        return
    tmp = f'{path}.tmp{os.getpid()}'      # a folder: written beside, renamed when complete
    try:
        for n, x in zip(names, images):
            os.makedirs(os.path.join(tmp, os.path.dirname(n)), exist_ok=True)
            with open(os.path.join(tmp, n), 'wb') as f:
                f.write(png(x))
        with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
            json.dump(meta, f)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

#----------------------------------------------------------------------------
# The order in which training reads a dataset: the concatenation of per-epoch random permutations (epoch e seeded
# with [seed, e]). Iteration s uses stream positions [s B, (s+1) B); rank r of W takes the r-th of W equal slices
# of that window. So which images an iteration sees depends only on the seed, the batch B and the image counter,
# not on the number of processes, and a run resumed at image n restarts the stream exactly there.

class InfiniteSampler:
    """Endless dataset indices of one rank from global image `start` on (a sampler for torch's DataLoader)."""
    def __init__(self, size, batch, seed=0, rank=0, num_replicas=1, start=0):
        self.size, self.batch, self.seed, self.rank, self.num_replicas, self.start = size, batch, seed, rank, num_replicas, start

    def __iter__(self):
        per_rank, pos, epoch, order = self.batch // self.num_replicas, self.start, None, None
        while True:
            for i in range(pos + self.rank * per_rank, pos + (self.rank + 1) * per_rank):
                if i // self.size != epoch:
                    epoch = i // self.size
                    order = np.random.RandomState([self.seed, epoch]).permutation(self.size)
                yield int(order[i % self.size])
            pos += self.batch

#----------------------------------------------------------------------------
# CIFAR-10 sources. The python tarball holds pickles (Python 2, numpy arrays). They are read by a restricted
# unpickler that knows only the handful of globals a pickled plain integer ndarray needs, mapped to stand-ins
# that rebuild the array from validated bytes: nothing from the file is ever imported or called.

CIFAR_BATCHES = 5                       # data_batch_1..5 = the 50000 training images, in this order
CIFAR_MAX_MEMBER = 1 << 28              # a real batch is 30 MiB; refuse members above 256 MiB


class _NDArray:                         # stands for numpy.ndarray; only ever passed to _reconstruct
    pass


class _DType:
    """numpy.dtype(spec, align, copy) + BUILD(state) as pickled; plain integer and bool types only."""
    def __init__(self, spec, align=False, copy=True):
        if not (isinstance(spec, str) and spec in ('b1', 'u1', 'u2', 'u4', 'u8', 'i1', 'i2', 'i4', 'i8')):
            raise pickle.UnpicklingError(f'refused dtype {spec!r} (plain integer arrays only)')
        self.spec, self.order = spec, '|'

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ('<', '>', '|', '=')):
            raise pickle.UnpicklingError('malformed dtype state')
        self.order = state[1]


class _Array:
    """What numpy's _reconstruct(ndarray, (0,), b'b') returns; BUILD with (version, shape, dtype, fortran,
    data) fills it. The bytes must match shape x itemsize exactly."""
    array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DType)):
            raise pickle.UnpicklingError('malformed ndarray state')
        _, shape, dtype, fortran, data = state
        if isinstance(data, str):       # Python 2 str read with encoding='latin1': one char per byte
            data = data.encode('latin1')
        if not (isinstance(shape, tuple) and len(shape) <= 8 and all(type(n) is int and n >= 0 for n in shape)
                and isinstance(data, bytes)):
            raise pickle.UnpicklingError('malformed ndarray state')
        dtype = np.dtype(dtype.order + dtype.spec)
        if math.prod(shape) * dtype.itemsize != len(data):
            raise pickle.UnpicklingError(f'ndarray of shape {list(shape)} {dtype} does not hold {len(data)} bytes')
        self.array = np.frombuffer(data, dtype).reshape(shape, order='F' if fortran else 'C').copy()


def _reconstruct(cls, shape, typecode):
    if cls is not _NDArray:
        raise pickle.UnpicklingError('_reconstruct of something other than numpy.ndarray')
    return _Array()


def _latin1_bytes(text, encoding):      # _codecs.encode: how Python 3 pickles bytes at protocol 2
    if not (isinstance(text, str) and encoding == 'latin1'):
        raise pickle.UnpicklingError('_codecs.encode is allowed only as (str, "latin1") -> bytes')
    return text.encode('latin1')


class _NumpyUnpickler(pickle.Unpickler):
    SAFE = {
        ('numpy.core.multiarray', '_reconstruct'): _reconstruct,    # numpy 1.x pickles (the CIFAR release)
        ('numpy._core.multiarray', '_reconstruct'): _reconstruct,   # numpy 2.x pickles
        ('numpy', 'ndarray'): _NDArray,
        ('numpy', 'dtype'): _DType,
        ('_codecs', 'encode'): _latin1_bytes,
    }

    def find_class(self, module, name):
        if (module, name) not in self.SAFE:
            raise pickle.UnpicklingError(f'refused global {module}.{name} (only plain numpy arrays are allowed)')
        return self.SAFE[(module, name)]


def read_numpy_pickle(data):
    """A pickled dict of plain data and integer numpy arrays (CIFAR's batches) -> dict with real ndarrays."""
    try:
        obj = _NumpyUnpickler(io.BytesIO(data), encoding='latin1').load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:              # a malformed stream: any other error of the pickle machinery
        raise pickle.UnpicklingError(f'malformed pickle ({type(e).__name__}: {e})') from None
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f'expected a dict, got {type(obj).__name__}')
    out = {}
    for key, value in obj.items():
        if isinstance(value, _Array):
            if value.array is None:
                raise pickle.UnpicklingError(f'ndarray {key!r} has no data')
            value = value.array
        elif isinstance(value, (_NDArray, _DType)) or callable(value):   # a stand-in itself, not data
            raise pickle.UnpicklingError(f'unexpected {type(value).__name__} under {key!r}')
        out[key] = value
    return out


def _tar_members(path, names):
    """{name: bytes} of the wanted members of a tar(.gz) archive; reading stops once all are found."""
    found = {}
    with tarfile.open(path, 'r:*') as tar:
        for member in tar:
            if member.name in names and member.isfile():
                if member.size > CIFAR_MAX_MEMBER:
                    raise ValueError(f'{path}: {member.name} is {member.size} bytes, more than a CIFAR batch holds')
                found[member.name] = tar.extractfile(member).read()
                if len(found) == len(names):
                    break
    return found


def open_cifar10(path):
    """(images uint8 [N, 32, 32, 3], labels int [N]) of the training batches of cifar-10-python.tar.gz or
    cifar-10-binary.tar.gz. Python batches: dicts with 'data' uint8 [10000, 3072] (CHW rows) and 'labels';
    binary batches: records of 1 label byte + 3072 pixel bytes (CHW), per the CIFAR-10 page."""
    py = [f'cifar-10-batches-py/data_batch_{i}' for i in range(1, CIFAR_BATCHES + 1)]
    binary = [f'cifar-10-batches-bin/data_batch_{i}.bin' for i in range(1, CIFAR_BATCHES + 1)]
    try:
        members = _tar_members(path, set(py + binary))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f'{path}: cannot read the tarball ({e})') from None
    images, labels = [], []
    if all(n in members for n in py):
        for name in py:
            try:
                batch = read_numpy_pickle(members[name])
            except pickle.UnpicklingError as e:
                raise ValueError(f'{path}: {name}: {e}') from None
            data, y = batch.get('data'), batch.get('labels')
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
                    and isinstance(y, list) and len(y) == len(data) and all(type(c) is int for c in y)):
                raise ValueError(f'{path}: {name} is not a CIFAR-10 batch (data uint8 [N, 3072], labels [N] ints)')
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(y, dtype=np.int64))
    elif all(n in members for n in binary):
        for name in binary:
            if len(members[name]) % 3073:
                raise ValueError(f'{path}: {name} is not a whole number of 3073-byte CIFAR records')
            records = np.frombuffer(members[name], np.uint8).reshape(-1, 3073)
            images.append(records[:, 1:].reshape(-1, 3, 32, 32))
            labels.append(records[:, 0].astype(np.int64))
    else:
        layout = binary if any(n in members for n in binary) and not any(n in members for n in py) else py
        raise ValueError(f'{path}: not a CIFAR-10 tarball (no {next(n for n in layout if n not in members)})')
    labels = np.concatenate(labels)
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f'{path}: CIFAR-10 labels must be 0..9, found {labels.min()}..{labels.max()}')
    return np.concatenate(images).transpose(0, 2, 3, 1), labels        # NCHW -> NHWC

#----------------------------------------------------------------------------
# Folder sources, as EDM's dataset_tool lists them: every file below the folder whose extension pillow knows,
# in the order of sorted(Path(...).rglob('*')) (which compares path components, not whole strings).

def is_image_name(name):
    return '.' + str(name).split('.')[-1].lower() in PIL.Image.EXTENSION


def open_folder(source):
    """(files, names, labels): the image paths, their '/'-separated names relative to `source`, and their
    labels (a list, or None). Labels: dataset.json's {name: label} when it has labels; otherwise the top-level
    sub-folder as a class (index among the sorted folder names, '' for images directly in `source`) when there
    are at least two; otherwise none. An image that dataset.json does not list makes the whole set unlabelled."""
    PIL.Image.init()
    files = [str(f) for f in sorted(Path(source).rglob('*')) if is_image_name(f) and os.path.isfile(f)]
    names = [os.path.relpath(f, source).replace('\\', '/') for f in files]
    if not files:
        raise ValueError(f'{source}: no images found')
    meta_path = os.path.join(source, 'dataset.json')
    table = {}
    if os.path.isfile(meta_path):
        pairs = parse_labels(read_file(meta_path), meta_path)
        table = dict(pairs or [])
        for n, v in table.items():    # what ImageDataset can read: a class 0..MAX_CLASSES-1 or a list of numbers
            if not (v is None or type(v) is int or (isinstance(v, list) and all(type(x) in (int, float) for x in v))):
                raise ValueError(f'{meta_path}: label of {n} must be an integer class or a list of numbers, got {v!r:.40}')
        check_classes([v for v in table.values() if type(v) is int], meta_path)
    if not table:
        top = [n.split('/')[0] if '/' in n else '' for n in names]
        classes = {t: i for i, t in enumerate(sorted(set(top)))}
        if len(classes) > 1:
            table = {n: classes[t] for n, t in zip(names, top)}
    labels = [table.get(n) for n in names] if table else None
    return files, names, None if labels is None or any(c is None for c in labels) else labels

#----------------------------------------------------------------------------
# Transforms of EDM's dataset_tool, on HWC uint8 arrays (2-D for grayscale). Each resizes with pillow's
# LANCZOS filter; center-crop-wide may drop an image (None).

def make_transform(transform, width, height):
    def resize(img):
        return np.array(PIL.Image.fromarray(img).resize((width, height), PIL.Image.Resampling.LANCZOS))

    def to_rgb(img):
        return np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img

    def none(img):
        if width is None or (img.shape[1], img.shape[0]) == (width, height):
            return img
        return resize(img)

    def center_crop(img):                   # the largest centred square, then resize
        h, w = img.shape[:2]
        crop = min(h, w)
        img = img[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
        return resize(np.ascontiguousarray(to_rgb(img)))

    def center_crop_wide(img):              # keep the full width, crop rows to the W:H aspect, letterbox to WxW
        h, w = img.shape[:2]
        ch = int(np.round(width * h / w))
        if w < width or ch < height:
            return None
        img = resize(np.ascontiguousarray(to_rgb(img[(h - ch) // 2:(h + ch) // 2])))
        canvas = np.zeros([width, width, 3], dtype=np.uint8)
        canvas[(width - height) // 2:(width + height) // 2, :] = img
        return canvas

    if transform is not None and width is None:
        raise ValueError(f'--transform {transform} needs --resolution WxH')
    return {None: none, 'center-crop': center_crop, 'center-crop-wide': center_crop_wide}[transform]

#----------------------------------------------------------------------------
# The converter: EDM's dataset_tool.py output (the same PNG bytes per image, the same names and dataset.json).

# Modes EDM's dataset_tool would hand to PIL as if they were RGB (CMYK/RGBA: the 4 bytes of a pixel are
# reinterpreted, a scrambled image) or as grayscale (P: palette indices). With the center-crop transforms,
# whose output is RGB anyway, we convert them to RGB with pillow instead (ImageNet's train set has a few CMYK
# JPEGs; those images differ from EDM's zip). Without a transform they stay an error, as in EDM.
CONVERTIBLE_MODES = ('1', 'P', 'PA', 'LA', 'RGBA', 'RGBX', 'CMYK', 'YCbCr')


def convert(source, dest, resolution=None, transform=None, max_images=None, progress=True):
    """Write EDM's dataset zip `dest` from a folder of images or a CIFAR-10 tarball; returns the number of
    images written. resolution: (width, height) or None; transform: None, 'center-crop', 'center-crop-wide'."""
    if not str(dest).endswith('.zip'):
        raise ValueError(f'--dest must end in .zip: {dest}')
    width, height = resolution or (None, None)
    fn = make_transform(transform, width, height)
    if os.path.isdir(source):
        files, names, labels = open_folder(source)
        def read(i):
            image = open_image(read_file(files[i], names[i]), names[i])
            if image.mode not in ('L', 'RGB'):
                if transform in ('center-crop', 'center-crop-wide') and image.mode in CONVERTIBLE_MODES:
                    image = image.convert('RGB')
                else:
                    raise ValueError(f'{names[i]}: image mode {image.mode}; input images must be stored as RGB or '
                                     f'grayscale (L){" (or use a center-crop transform)" if image.mode in CONVERTIBLE_MODES else ""}')
            return np.array(image)
        count = len(files)
    elif os.path.isfile(source) and tarfile.is_tarfile(source):
        images, classes = open_cifar10(source)
        names, labels, count = None, [int(c) for c in classes], len(images)
        read = lambda i: images[i]
    elif os.path.exists(source):
        raise ValueError(f'{source}: not a folder of images or a CIFAR-10 tarball'
                         f'{" (extract zip archives first)" if zipfile.is_zipfile(source) else ""}')
    else:
        raise FileNotFoundError(f'{source}: no such file or folder')
    count = min(count, max_images) if max_images is not None else count

    written, out_labels, first, t0, shown = 0, [], None, time.time(), 0.0

    def write_zip(f):
        nonlocal written, out_labels, first, shown
        with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as z:
            for idx in range(count):
                # The archive name is the SOURCE index, as in EDM's dataset_tool: an image that
                # center-crop-wide drops leaves a gap in the names, not a shift.
                archive_name = f'{idx:08d}'[:5] + f'/img{idx:08d}.png'
                where = names[idx] if names else f'image {idx}'
                img = fn(read(idx))
                if img is None:
                    continue
                if img.ndim == 3 and img.shape[2] == 1:
                    img = img[:, :, 0]
                attrs = (img.shape[1], img.shape[0], img.shape[2] if img.ndim == 3 else 1)
                if first is None:
                    first = attrs
                    if attrs[0] != attrs[1]:
                        raise ValueError(f'{where}: images must be square after the transform, got {attrs[0]}x{attrs[1]} '
                                         f'(use --resolution WxH and/or --transform center-crop)')
                    if attrs[2] not in (1, 3):
                        raise ValueError(f'{where}: {attrs[2]} channels; input images must be stored as RGB or grayscale')
                    if attrs[0] & (attrs[0] - 1):
                        raise ValueError(f'{where}: width/height {attrs[0]} must be a power of two (use --resolution)')
                elif attrs != first:
                    raise ValueError(f'{where}: width/height/channels {attrs} differ from the first image\'s {first} '
                                     f'(use --resolution WxH)')
                z.writestr(archive_name, encode_png(img))
                out_labels.append(None if labels is None else [archive_name, labels[idx]])
                written += 1
                if progress and (time.time() - shown > 0.5 or idx == count - 1):
                    shown = time.time()
                    print(f'\r{idx + 1}/{count} images ({written} written, {shown - t0:.0f} s)', end='', flush=True)
            if written == 0:
                raise ValueError(f'{source}: no image was written (center-crop-wide drops images narrower than '
                                 f'{width} pixels or too short for {width}x{height})')
            out_labels = out_labels if all(out_labels) else None
            z.writestr('dataset.json', json.dumps({'labels': out_labels}))
    try:
        cli.atomic_write(dest, write_zip)
    finally:
        if progress and shown:
            print()
    if progress:
        kinds = 'no labels' if out_labels is None else \
                f'{len({c for _, c in out_labels if type(c) is int})} classes' if all(type(c) is int for _, c in out_labels) else 'label vectors'
        print(f'{written} images ({kinds}) -> {dest}')
    return written


def parse_resolution(text):
    m = re.fullmatch(r'(\d+)[x,](\d+)', text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f'bad resolution {text!r}: use WxH, e.g. 64x64')
    return int(m.group(1)), int(m.group(2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--source', required=True, help='folder of images, or cifar-10-python.tar.gz / cifar-10-binary.tar.gz')
    p.add_argument('--dest', required=True, help='output zip (written atomically)')
    p.add_argument('--resolution', type=parse_resolution, help='output WxH, e.g. 64x64 (default: the images\' own size)')
    p.add_argument('--transform', choices=['center-crop', 'center-crop-wide'],
                   help='center-crop: largest centred square; center-crop-wide: full width, centred rows, letterboxed '
                        '(default: resize only)')
    p.add_argument('--max-images', type=int, help='convert only the first N source images')
    args = p.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        p.error('--max-images must be >= 1')
    with cli.cli_errors():
        cli.check_output(args.dest, '--dest')      # a folder or an unwritable place fails before any image is read
        convert(args.source, args.dest, args.resolution, args.transform, args.max_images)


if __name__ == '__main__':
    main()
