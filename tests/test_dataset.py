"""Tests for dataset_min.py: the reader (ImageDataset), the writer (save_dataset) and the converter."""

import io
import json
import os
import pickle
import struct
import sys
import tarfile
import warnings
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


def test_reader_refuses_bombs_truncated_files_and_bad_labels(tmp_path, monkeypatch):
    dataset_min.save_dataset(str(tmp_path / 'd'), _images(2, r=16), [0, 1])
    # Decompression bombs: pillow's warning level (> MAX_IMAGE_PIXELS) is an error too, like its error level.
    for limit in (200, 100):                    # 256 pixels: warning at 200 (256 <= 2 * 200), error at 100
        monkeypatch.setattr(PIL.Image, 'MAX_IMAGE_PIXELS', limit)
        with pytest.raises(ValueError, match=r'00000/img00000000.png: refused, too many pixels'):
            dataset_min.ImageDataset(str(tmp_path / 'd'))
    monkeypatch.undo()
    png = tmp_path / 'd' / '00000' / 'img00000001.png'
    png.write_bytes(png.read_bytes()[:300])
    ds = dataset_min.ImageDataset(str(tmp_path / 'd'))
    with pytest.raises(ValueError, match=r'^cannot read image 00000/img00000001.png: [^\n]*$'):
        ds[1]
    meta = tmp_path / 'd' / 'dataset.json'
    for text, message in [
            ('{"labels": [["00000/img00000000.png", 10000000], ["00000/img00000001.png", 0]]}', r'class labels must be in 0\.\.99999'),
            ('{"labels": {"00000/img00000000.png": 1}}', 'list of \\[filename, label\\] pairs'),
            ('{"labels": [["00000/img00000000.png"]]}', 'list of \\[filename, label\\] pairs'),
            ('{"labels": "x"}', 'list of \\[filename, label\\] pairs'),
            ('[["00000/img00000000.png", 1]]', 'expected an object'),
            ('[' * 100000, 'not valid JSON')]:
        meta.write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            dataset_min.ImageDataset(str(tmp_path / 'd'))
        assert '\n' not in str(e.value)


def test_reader_one_hot_is_built_per_image(tmp_path):
    # 1000 classes over 3 images: label_dim 1000, no [N, 1000] table is kept (EDM's reader does the same).
    dataset_min.save_dataset(str(tmp_path / 'd.zip'), _images(3), [999, 0, 5])
    ds = dataset_min.ImageDataset(str(tmp_path / 'd.zip'))
    assert ds.label_dim == 1000 and ds._classes.tolist() == [999, 0, 5]
    np.testing.assert_array_equal(ds[0][1], np.eye(1000, dtype=np.float32)[999])

#----------------------------------------------------------------------------
# Converter (EDM's dataset_tool.py). Expected outputs are computed here from the stated rules.

LANCZOS = PIL.Image.Resampling.LANCZOS


def edm_png(img):
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue()


def expected(img, transform, W, H):
    """EDM's dataset_tool transforms, written out from its documented behaviour."""
    if transform is None:
        return img if img.shape[:2] == (H, W) else np.array(PIL.Image.fromarray(img).resize((W, H), LANCZOS))
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=2)
    h, w = img.shape[:2]
    if transform == 'center-crop':
        c = min(h, w)
        crop = img[(h - c) // 2:(h + c) // 2, (w - c) // 2:(w + c) // 2].copy()
        return np.array(PIL.Image.fromarray(crop).resize((W, H), LANCZOS))
    ch = int(np.round(W * h / w))
    if w < W or ch < H:
        return None
    band = np.array(PIL.Image.fromarray(img[(h - ch) // 2:(h + ch) // 2].copy()).resize((W, H), LANCZOS))
    out = np.zeros([W, W, 3], np.uint8)
    out[(W - H) // 2:(W + H) // 2] = band
    return out


def name(idx):
    return f'{idx:08d}'[:5] + f'/img{idx:08d}.png'


def read_zip(path):
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos) and infos[-1].filename == 'dataset.json'
        pngs = {i.filename: z.read(i) for i in infos[:-1]}
        return pngs, json.loads(z.read('dataset.json'))['labels']


def check_zip(path, want, labels):
    """want: {archive name: HWC uint8 array}; labels: {archive name: label} or None. Same PNG bytes as EDM's."""
    pngs, meta = read_zip(path)
    assert list(pngs) == list(want)
    for n, img in want.items():
        assert pngs[n] == edm_png(img), n
        np.testing.assert_array_equal(np.array(PIL.Image.open(io.BytesIO(pngs[n]))), img)
    assert meta == (None if labels is None else [[n, labels[n]] for n in want])


def convert(tmp_path, source, *args):
    dest = tmp_path / 'out.zip'
    dataset_min.main(['--source', str(source), '--dest', str(dest), *args])
    assert [p.name for p in tmp_path.iterdir() if '.tmp' in p.name] == []
    return dest


def cifar_batches(n=3, seed=0):
    rng = np.random.RandomState(seed)
    return [(rng.randint(0, 256, [n, 3072], dtype=np.uint8), rng.randint(0, 10, n).tolist()) for _ in range(5)]


def py2_pickle(data, labels):
    """A pickle as Python 2's cPickle (protocol 2) wrote CIFAR's batches: the array bytes a py2 str
    (BINSTRING), numpy 1.x globals. Built opcode by opcode."""
    def s(b):
        return b'U' + bytes([len(b)]) + b if len(b) < 256 else b'T' + struct.pack('<i', len(b)) + b
    def i(v):
        return b'J' + struct.pack('<i', v)
    array = (b'cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n' + i(0) + b'\x85' + s(b'b') + b'\x87R'
             + b'(' + i(1) + b'(' + i(data.shape[0]) + i(data.shape[1]) + b't'
             + b'cnumpy\ndtype\n' + s(b'u1') + i(0) + i(1) + b'\x87R'
             + b'(' + i(3) + s(b'|') + b'NNN' + i(-1) + i(-1) + i(0) + b'tb'
             + b'\x89' + s(data.tobytes()) + b'tb')
    return (b'\x80\x02}(' + s(b'batch_label') + s(b'training batch') + s(b'labels') + b']('
            + b''.join(i(c) for c in labels) + b'e' + s(b'data') + array + b'u.')


def write_tar(path, members):
    with tarfile.open(path, 'w:gz') as tar:
        for n, data in members:
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cifar_expected(batches):
    images = np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = sum((y for _, y in batches), [])
    return {name(i): img for i, img in enumerate(images)}, {name(i): c for i, c in enumerate(labels)}


@pytest.mark.parametrize('kind', ['python3', 'python2', 'binary'])
def test_cifar10_tarballs(tmp_path, kind):
    batches = cifar_batches()
    if kind == 'binary':
        members = [(f'cifar-10-batches-bin/data_batch_{k + 1}.bin',
                    np.concatenate([np.array(y, np.uint8)[:, None], d], axis=1).tobytes()) for k, (d, y) in enumerate(batches)]
    else:
        dump = (lambda d, y: pickle.dumps({'batch_label': 'x', 'labels': y, 'data': d, 'filenames': ['a'] * len(y)},
                                          protocol=2)) if kind == 'python3' else py2_pickle
        members = [(f'cifar-10-batches-py/data_batch_{k + 1}', dump(d, y)) for k, (d, y) in enumerate(batches)]
        members.append(('cifar-10-batches-py/test_batch', b'not read'))
    if kind == 'python2':   # the hand-made stream is what numpy itself reads as this batch
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)     # numpy 2: numpy.core is numpy._core
            np.testing.assert_array_equal(pickle.loads(members[0][1], encoding='latin1')['data'], batches[0][0])
    tar = tmp_path / 'src' / 'cifar10.tar.gz'
    tar.parent.mkdir()
    write_tar(tar, [members[k] for k in (3, 5, 0, 4, 1, 2) if k < len(members)])   # any member order
    check_zip(convert(tmp_path, tar), *cifar_expected(batches))
    # --resolution resizes (LANCZOS), --max-images keeps the first N.
    want, labels = cifar_expected(batches)
    want = {n: expected(img, None, 16, 16) for n, img in list(want.items())[:4]}
    check_zip(convert(tmp_path, tar, '--resolution', '16x16', '--max-images', '4'), want, labels)


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f'touch {self.path}',)


def test_cifar10_hostile_pickles_are_refused(tmp_path):
    pwned = tmp_path / 'pwned'
    batches = cifar_batches()
    ok = [pickle.dumps({'labels': y, 'data': d}, protocol=2) for d, y in batches]
    hostile = {
        'refused global posix.system': pickle.dumps({'labels': [0], 'data': Evil(pwned)}, protocol=2),
        'refused global __builtin__.eval': pickle.dumps({'labels': [0], 'data': eval}, protocol=2),
        "refused dtype 'O": pickle.dumps({'labels': [0], 'data': np.array([None], dtype=object)}, protocol=2),
        'does not hold': pickle.dumps({'labels': [0], 'data': np.zeros([1, 3072], np.uint8)}, protocol=2)
                         .replace(b'K\x01M\x00\x0c\x86', b'K\x02M\x00\x0c\x86'),
        'not a CIFAR-10 batch': pickle.dumps({'labels': [0], 'data': np.zeros([1, 7], np.uint8)}, protocol=2),
    }
    for message, bad in hostile.items():
        tar = tmp_path / 'cifar-10-python.tar.gz'
        write_tar(tar, [(f'cifar-10-batches-py/data_batch_{k + 1}', bad if k == 2 else ok[k]) for k in range(5)])
        with pytest.raises(SystemExit) as e:
            dataset_min.main(['--source', str(tar), '--dest', str(tmp_path / 'out.zip')])
        assert str(e.value).startswith('error: ') and message in str(e.value) and 'data_batch_3' in str(e.value)
        assert '\n' not in str(e.value)
        assert not pwned.exists() and not (tmp_path / 'out.zip').exists()


def odd_images(rng):
    # (name, PIL mode, width, height): odd sizes, a grayscale one, an exact 16x16 one, a narrow and a flat one.
    return [(n, mode, w, h, PIL.Image.fromarray(rng.randint(0, 256, [h, w, 3] if mode == 'RGB' else [h, w], dtype=np.uint8)))
            for n, mode, w, h in [('b.png', 'RGB', 37, 23), ('a.png', 'RGB', 16, 16), ('c.png', 'L', 50, 64),
                                  ('d.PNG', 'RGB', 64, 41), ('e.png', 'RGB', 9, 30), ('f.png', 'RGB', 40, 4)]]


@pytest.mark.parametrize('transform', [None, 'center-crop', 'center-crop-wide'])
def test_folder_of_odd_sized_images(tmp_path, transform):
    src = tmp_path / 'src'
    src.mkdir()
    items = odd_images(np.random.RandomState(1))
    if transform is None:
        items = [it for it in items if it[1] == 'RGB']         # resizing keeps the channels: one kind only
    for n, _, _, _, im in items:
        im.save(src / n)
    (src / 'notes.txt').write_text('not an image')
    W, H = (16, 8) if transform == 'center-crop-wide' else (16, 16)
    want = {}
    for idx, (n, *_ ) in enumerate(sorted(items, key=lambda it: it[0])):
        out = expected(np.array(PIL.Image.open(src / n)), transform, W, H)
        if out is not None:                 # center-crop-wide drops e.png (narrow) and f.png (flat): gaps in names
            want[name(idx)] = out
    args = ['--resolution', f'{W}x{H}'] + (['--transform', transform] if transform else [])
    check_zip(convert(tmp_path, src, *args), want, None)   # one top-level name ('') -> no labels
    if transform == 'center-crop-wide':
        assert list(want) == [name(i) for i in (0, 1, 2, 3)] and len(items) == 6
        assert all(len(want[n]) == 16 for n in want)    # letterboxed into 16x16


def test_class_folders_and_dataset_json(tmp_path):
    rng = np.random.RandomState(2)
    src = tmp_path / 'src'
    files = ['a-b/x.png', 'a/y.jpeg', 'a/sub/z.png', 'top.png', 'b/w.JPEG']
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rng.randint(0, 256, [8, 8, 3], dtype=np.uint8)).save(src / f, format='PNG' if f.endswith('png') else 'JPEG')
    # EDM's order is sorted(Path.rglob): by path components, so a/... comes before a-b/... (a string sort says otherwise).
    order = ['a/sub/z.png', 'a/y.jpeg', 'a-b/x.png', 'b/w.JPEG', 'top.png']
    classes = {'': 0, 'a': 1, 'a-b': 2, 'b': 3}             # sorted top-level names; '' = images in src itself
    want = {name(i): np.array(PIL.Image.open(src / f)) for i, f in enumerate(order)}
    labels = {name(i): classes[f.split('/')[0] if '/' in f else ''] for i, f in enumerate(order)}
    check_zip(convert(tmp_path, src), want, labels)
    ds = dataset_min.ImageDataset(str(tmp_path / 'out.zip'))
    assert (len(ds), ds.label_dim, ds.resolution) == (5, 4, 8)
    # A dataset.json with labels wins over the folders; any image it does not list -> no labels at all.
    meta = {'labels': [[f, [0.5, i]] for i, f in enumerate(files)]}
    (src / 'dataset.json').write_text(json.dumps(meta))
    check_zip(convert(tmp_path, src), want, {name(i): [0.5, files.index(f)] for i, f in enumerate(order)})
    (src / 'dataset.json').write_text(json.dumps({'labels': meta['labels'][1:]}))
    check_zip(convert(tmp_path, src), want, None)
    # "labels": null (or an empty list) falls back to the folders, as in EDM.
    (src / 'dataset.json').write_text(json.dumps({'labels': None}))
    check_zip(convert(tmp_path, src), want, labels)
    (src / 'dataset.json').write_text('{"labels": [["top.png", 100000]]}')
    with pytest.raises(SystemExit, match='class labels must be in'):
        convert(tmp_path, src)


def test_image_modes(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    rgb = np.random.RandomState(3).randint(0, 256, [12, 20, 3], dtype=np.uint8)
    PIL.Image.fromarray(rgb).convert('CMYK').save(src / 'cmyk.jpg', quality=95)
    # CMYK without a transform: an error naming the image, as EDM's channel check; with center-crop: pillow's RGB.
    with pytest.raises(SystemExit, match=r'^error: cmyk.jpg: image mode CMYK; input images must be stored as RGB or grayscale'):
        convert(tmp_path, src, '--resolution', '8x8')
    want = expected(np.array(PIL.Image.open(src / 'cmyk.jpg').convert('RGB')), 'center-crop', 8, 8)
    check_zip(convert(tmp_path, src, '--resolution', '8x8', '--transform', 'center-crop'), {name(0): want}, None)
    (src / 'cmyk.jpg').unlink()
    gray = rgb[:8, :8, 0]                                   # grayscale stays one channel: an 'L' PNG
    PIL.Image.fromarray(gray).save(src / 'gray.png')
    check_zip(convert(tmp_path, src), {name(0): gray}, None)
    assert PIL.Image.open(io.BytesIO(read_zip(tmp_path / 'out.zip')[0][name(0)])).mode == 'L'
    (src / 'gray.png').unlink()
    PIL.Image.fromarray(rgb[:8, :8]).convert('RGBA').save(src / 'rgba.png')
    with pytest.raises(SystemExit, match='rgba.png: image mode RGBA'):
        convert(tmp_path, src)


def test_converter_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys):
    src = tmp_path / 'src'
    src.mkdir()
    PIL.Image.new('RGB', (8, 8)).save(src / 'a.png')
    PIL.Image.new('RGB', (12, 12)).save(src / 'b.png')
    dest = tmp_path / 'out.zip'
    dest.write_bytes(b'previous')
    cases = [
        ([], 'b.png: width/height/channels (12, 12, 3) differ'),
        (['--resolution', '12x12'], 'a.png: width/height 12 must be a power of two'),
        (['--resolution', '16x8'], 'a.png: images must be square'),
        (['--transform', 'center-crop'], '--transform center-crop needs --resolution'),
        (['--transform', 'center-crop-wide', '--resolution', '64x64'], 'no image was written'),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            dataset_min.main(['--source', str(src), '--dest', str(dest), *args])
        assert str(e.value).startswith('error: ') and message in str(e.value) and '\n' not in str(e.value), str(e.value)
        assert dest.read_bytes() == b'previous' and sorted(p.name for p in tmp_path.iterdir()) == ['out.zip', 'src']
    PIL.Image.new('RGB', (8, 8)).save(src / 'b.png')
    (src / 'c.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    with pytest.raises(SystemExit, match='^error: cannot read image c.png'):
        dataset_min.main(['--source', str(src), '--dest', str(dest)])
    (src / 'c.png').unlink()
    monkeypatch.setattr(PIL.Image, 'MAX_IMAGE_PIXELS', 40)
    with pytest.raises(SystemExit, match='^error: a.png: refused, too many pixels'):
        dataset_min.main(['--source', str(src), '--dest', str(dest)])
    monkeypatch.undo()
    dataset_min.save_dataset(str(tmp_path / 'x.zip'), _images(1))
    for source, message in [(tmp_path / 'missing', 'no such file or folder'), (tmp_path / 'x.zip', 'extract zip archives first'),
                            (tmp_path / 'empty', 'no images found')]:
        (tmp_path / 'empty').mkdir(exist_ok=True)
        with pytest.raises(SystemExit, match=f'^error: .*{message}'):
            dataset_min.main(['--source', str(source), '--dest', str(dest)])
    for bad in (['--resolution', '64'], ['--max-images', '0'], ['--transform', 'zoom']):
        with pytest.raises(SystemExit) as e:
            dataset_min.main(['--source', str(src), '--dest', str(dest), *bad])
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        dataset_min.main(['--help'])
    assert e.value.code == 0 and '--transform' in capsys.readouterr().out
    dataset_min.main(['--source', str(src), '--dest', str(dest)])
    assert '2/2 images' in capsys.readouterr().out and len(read_zip(dest)[0]) == 2
