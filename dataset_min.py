"""EDM's dataset format in one place: the reader (ImageDataset) and the writer (save_dataset).

A dataset is a zip archive or a folder of PNGs plus an optional dataset.json
{"labels": [[filename, class_int or [floats]], ...]} (or null), as EDM's training and fid.py read it.
Imports only the standard library, numpy and pillow: no other file of this project.
"""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image

#----------------------------------------------------------------------------
# Dataset: EDM's format (edm-formats.md (b)), a zip or a folder of PNGs plus an optional dataset.json
# {"labels": [[filename, class_int or [floats]], ...]} (or null). Shared by train_min.py and fid_min.py.

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

        # Labels: integer classes become one-hot rows (label_dim = max class + 1), lists stay float vectors.
        self._labels = np.zeros([len(self._names), 0], dtype=np.float32)
        raw = self._read_labels() if use_labels else None
        if raw is not None:
            try:
                values = [raw[n] for n in self._names]
            except KeyError as e:
                raise ValueError(f'dataset.json has no label for {e.args[0]}') from None
            if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                classes = np.asarray(values, dtype=np.int64)
                if classes.min() < 0:
                    raise ValueError('dataset.json: class labels must be >= 0')
                self._labels = np.eye(int(classes.max()) + 1, dtype=np.float32)[classes]
            else:
                try:
                    self._labels = np.asarray(values, dtype=np.float32).reshape(len(values), -1)
                except (TypeError, ValueError):
                    raise ValueError('dataset.json: labels must be all integers or equal-length float lists') from None
        self.label_dim = self._labels.shape[1]
        self.has_labels = self.label_dim > 0

    def _zip(self):
        # One handle per process, so a forked DataLoader worker never shares a file position.
        if getattr(self, '_zip_pid', None) != os.getpid():
            self._zip_file, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip_file

    def _open(self, name):
        return self._zip().open(name) if self._kind == 'zip' else open(os.path.join(self.path, name), 'rb')

    def _read_labels(self):
        if self._kind == 'zip':
            if 'dataset.json' not in self._zip().namelist():
                return None
        elif not os.path.isfile(os.path.join(self.path, 'dataset.json')):
            return None
        with self._open('dataset.json') as f:
            try:
                meta = json.load(f)
            except ValueError as e:
                raise ValueError(f'dataset.json is not valid JSON: {e}') from None
        labels = meta.get('labels') if isinstance(meta, dict) else None
        if labels is None:
            return None
        try:
            return {str(name).replace('\\', '/'): value for name, value in labels}
        except (TypeError, ValueError):
            raise ValueError('dataset.json: "labels" must be a list of [filename, label] pairs') from None

    def _load(self, i):
        name = self._names[i]
        with self._open(name) as f:
            try:
                image = PIL.Image.open(io.BytesIO(f.read()))
                image.load()
            except (OSError, SyntaxError) as e:
                raise ValueError(f'cannot read image {name}: {e}') from None
        if image.mode not in ('L', 'RGB'):
            raise ValueError(f'{name}: image mode {image.mode} is not supported (use L or RGB)')
        x = np.asarray(image, dtype=np.uint8)
        x = x[:, :, None] if x.ndim == 2 else x
        x = x.transpose(2, 0, 1)                                    # HWC -> CHW
        if hasattr(self, 'resolution') and x.shape != (self.num_channels, self.resolution, self.resolution):
            raise ValueError(f'{name} has shape {list(x.shape)}, expected '
                             f'{[self.num_channels, self.resolution, self.resolution]} like the first image')
        return x

    def __len__(self):
        return len(self._names) * (2 if self.xflip else 1)

    def __getitem__(self, idx):
        i = int(idx) % len(self._names)
        image = self._load(i)
        if idx >= len(self._names):                                 # mirrored copy
            image = image[:, :, ::-1]
        return np.ascontiguousarray(image), self._labels[i].copy()

    def __getstate__(self):                                         # picklable for DataLoader workers
        return {k: v for k, v in self.__dict__.items() if k not in ('_zip_file', '_zip_pid')}

def save_dataset(path, images, labels=None):
    """Write uint8 images [N, C, H, W] (and integer class labels [N]) in EDM's format: a zip when
    `path` ends in .zip (stored, uncompressed PNGs), else a folder. Written atomically."""
    names = [f'{i:08d}'[:5] + f'/img{i:08d}.png' for i in range(len(images))]
    meta = {'labels': None if labels is None else [[n, int(c)] for n, c in zip(names, labels)]}
    def png(x):
        buf = io.BytesIO()
        PIL.Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)).save(buf, format='png', compress_level=0)
        return buf.getvalue()
    tmp = f'{path}.tmp{os.getpid()}'
    if str(path).endswith('.zip'):
        with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as z:
            for n, x in zip(names, images):
                z.writestr(n, png(x))
            z.writestr('dataset.json', json.dumps(meta))
        os.replace(tmp, path)
    else:
        for n, x in zip(names, images):
            os.makedirs(os.path.join(tmp, os.path.dirname(n)), exist_ok=True)
            with open(os.path.join(tmp, n), 'wb') as f:
                f.write(png(x))
        with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
            json.dump(meta, f)
        os.replace(tmp, path)
