"""Tests for dataset_min.py: the reader (ImageDataset), the writer (save_dataset) and the converter."""

import json
import os
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset_min  # noqa: E402

#----------------------------------------------------------------------------
# Dataset reader.

def _images(n=5, c=3, r=8, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=[n, c, r, r], dtype=np.uint8)

@pytest.mark.parametrize('kind', ['zip', 'folder'])
@pytest.mark.parametrize('labelled', [True, False])
def test_dataset_roundtrip(tmp_path, kind, labelled):
    images, classes = _images(), np.array([3, 0, 1, 3, 2])
    path = str(tmp_path / ('data.zip' if kind == 'zip' else 'data'))
    dataset_min.save_dataset(path, images, classes if labelled else None)
    if kind == 'zip':
        with zipfile.ZipFile(path) as z:   # EDM's layout: stored PNGs named 00000/img00000000.png
            assert z.getinfo('00000/img00000003.png').compress_type == zipfile.ZIP_STORED
    ds = dataset_min.ImageDataset(path)
    assert (len(ds), ds.resolution, ds.num_channels, ds.name) == (5, 8, 3, 'data')
    assert ds.has_labels == labelled and ds.label_dim == (4 if labelled else 0)
    for i in range(5):
        x, c = ds[i]
        assert x.dtype == np.uint8 and c.dtype == np.float32
        np.testing.assert_array_equal(x, images[i])
        np.testing.assert_array_equal(c, np.eye(4, dtype=np.float32)[classes[i]] if labelled else np.zeros([0]))
    assert dataset_min.ImageDataset(path, use_labels=False).label_dim == 0

def test_dataset_xflip_grayscale_and_float_labels(tmp_path):
    images = _images(3, c=1)
    dataset_min.save_dataset(str(tmp_path / 'g'), images, None)
    with open(tmp_path / 'g' / 'dataset.json', 'w') as f:
        json.dump({'labels': [[f'00000/img{i:08d}.png', [0.5, i]] for i in range(3)]}, f)
    ds = dataset_min.ImageDataset(str(tmp_path / 'g'), xflip=True, resolution=8)
    assert len(ds) == 6 and ds.num_channels == 1 and ds.label_dim == 2
    np.testing.assert_array_equal(ds[4][0], images[1][:, :, ::-1])
    np.testing.assert_array_equal(ds[4][1], [0.5, 1.0])

def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'):
        dataset_min.ImageDataset(str(tmp_path / 'missing.zip'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no images'):
        dataset_min.ImageDataset(str(tmp_path / 'empty'))
    (tmp_path / 'notzip.zip').write_bytes(b'hello')
    with pytest.raises(ValueError, match='folder or a zip'):
        dataset_min.ImageDataset(str(tmp_path / 'notzip.zip'))
    dataset_min.save_dataset(str(tmp_path / 'd'), _images(2), [0, 1])
    with pytest.raises(ValueError, match='expected 16x16'):
        dataset_min.ImageDataset(str(tmp_path / 'd'), resolution=16)
    PIL.Image.new('RGB', (8, 4)).save(tmp_path / 'd' / '00000' / 'img00000000.png')
    with pytest.raises(ValueError, match='square'):
        dataset_min.ImageDataset(str(tmp_path / 'd'))
    PIL.Image.new('RGB', (4, 4)).save(tmp_path / 'd' / '00000' / 'img00000000.png')
    ds = dataset_min.ImageDataset(str(tmp_path / 'd'))
    with pytest.raises(ValueError, match='expected'):   # mixed sizes are reported when read
        ds[1]
    (tmp_path / 'd' / 'dataset.json').write_text('{"labels": [')
    with pytest.raises(ValueError, match='not valid JSON'):
        dataset_min.ImageDataset(str(tmp_path / 'd'))
    (tmp_path / 'd' / 'dataset.json').write_text('{"labels": [["00000/img00000000.png", 1]]}')
    with pytest.raises(ValueError, match='no label for 00000/img00000001.png'):
        dataset_min.ImageDataset(str(tmp_path / 'd'))
