"""Hostile and broken files: every one is refused in one line naming the file and the problem, runs
nothing, changes nothing in the process, and costs bounded time and memory. Each test crafts its own (KB-sized)
file. Classes: 1 tampering through the unpickler, 2 unbounded walks and sizes, 3 memory bombs, 4 wrong values,
5 checkpoint structure, 6 one-line errors of the command lines."""

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones  # noqa: E402
import edm_pickle  # noqa: E402
import fid_min  # noqa: E402
import safe_files  # noqa: E402
import sample_min  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'edm'


def tiny(name='tiny_songunet_ddpmpp_uncond.pt'):
    d = torch.load(FIXTURES / name, weights_only=True)
    return safe_files.build_network(d['precond'], d['kwargs'], d['state_dict']).eval(), d


def edm_pickle_bytes(net, **kwargs):
    buf = io.BytesIO()
    edm_pickle.dump_edm_pickle({'ema': net.requires_grad_(False), 'loss_fn': None, 'augment_pipe': None,
                                'dataset_kwargs': {}}, buf, **kwargs)
    return buf.getvalue()


def refused(fn, *args, match, exc=ValueError, seconds=5, **kwargs):
    """fn(*args) must raise exc with a one-line message matching `match`, within `seconds`."""
    t0 = time.perf_counter()
    with pytest.raises(exc, match=match) as e:
        fn(*args, **kwargs)
    assert time.perf_counter() - t0 < seconds
    assert '\n' not in str(e.value), str(e.value)
    return str(e.value)


# Hand-made pickles. inline(x): the opcodes that push x (protocol 2, without PROTO / STOP), to splice between
# raw opcodes; glob(m, n): a GLOBAL opcode. Record(f, *args, state=...) pickles as f(*args) [+ BUILD state], and
# module(...) as an EDM persistent object, so structures EDM never writes can be made without EDM's code.

def inline(obj):
    return pickle.dumps(obj, protocol=2)[2:-1]


def glob(module, name):
    return f'c{module}\n{name}\n'.encode()


def ema_pickle(body):
    """{'ema': <whatever the opcodes in body push>}"""
    return b'\x80\x02}' + inline('ema') + body + b's.'


class Record:
    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def module(class_name, params=None, children=None, init_kwargs=None):
    state = dict(training=False, _parameters=params or {}, _buffers={}, _non_persistent_buffers_set=set(),
                 _modules=children or {}, _init_args=(), _init_kwargs=init_kwargs or {})
    return Record(edm_pickle._reconstruct_persistent_obj, dict(type='class', version=6, module_src='',
                                                               class_name=class_name, state=state))


def dumps(obj):
    with edm_pickle._stand_in_persistence_module():
        return pickle.dumps(obj, protocol=4)


def checkpoint(path, class_name, init_kwargs, state_dict, **extra):
    torch.save({'format': 'gdd-min', 'ema': {'class_name': class_name, 'init_kwargs': init_kwargs,
                                             'state_dict': state_dict}, **extra}, path)
    return path

# ----------------------------------------------------------------------------------------------------------------
# 1. Tampering: the unpickler never hands a real object to BUILD / SETITEM / APPEND.

def process_state():
    """What a hostile pickle would change: the rebuild functions and classes the EDM format names."""
    watched = [torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch.storage._load_from_bytes]
    return ([(f.__defaults__, f.__kwdefaults__, dict(f.__dict__), f.__code__) for f in watched],
            {c.__name__: dict(vars(c)) for c in (torch.nn.ModuleDict, collections.OrderedDict, np.dtype)})


ATTACKS = {
    'defaults of _rebuild_tensor_v2': glob('torch._utils', '_rebuild_tensor_v2') + inline((None, {'__defaults__': ('pwned',)})) + b'b',
    'dict of _rebuild_parameter': glob('torch._utils', '_rebuild_parameter') + inline({'pwned': 1}) + b'b',
    'ModuleDict class attribute': glob('torch.nn.modules.container', 'ModuleDict') + inline((None, {'forward': None})) + b'b',
    'numpy dtype class': glob('numpy', 'dtype') + inline((None, {'pwned': 1})) + b'b',
    'SETITEM on a global': glob('collections', 'OrderedDict') + inline('pwned') + inline(1) + b's',
    'APPEND on a global': glob('torch.storage', '_load_from_bytes') + inline(1) + b'a',
    'REDUCE of a call result': glob('collections', 'OrderedDict') + b')R)R',
}


def test_writes_into_allowed_globals_are_refused_and_change_nothing(tmp_path):
    net, d = tiny()
    before = process_state()
    path = tmp_path / 'evil.pkl'
    for attack, body in ATTACKS.items():
        path.write_bytes(ema_pickle(body))
        for load in (safe_files.read_pickle, safe_files.load_network, sample_min.load_generator, fid_min.load_detector):
            assert str(path) in refused(load, path, exc=safe_files.UnsafePickleError, match='refusing'), attack
        path.write_bytes(ema_pickle(b'}' + inline('a') + b']' + body + b'as'))    # deeper: {'ema': {'a': [<attack>]}}
        refused(safe_files.read_pickle, path, exc=safe_files.UnsafePickleError, match='refusing')
    assert process_state() == before
    # torch.load and our loaders behave exactly as before, in this same process.
    buf = io.BytesIO()
    torch.save({'w': d['state_dict']['model.map_layer0.weight']}, buf)
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)['w'], d['state_dict']['model.map_layer0.weight'])
    good = tmp_path / 'good.pkl'
    good.write_bytes(edm_pickle_bytes(net))
    with torch.no_grad():
        # Bitwise against the same network in this process; EDM's stored outputs are checked in test_edm_nets.py
        # (other CPUs' kernels differ from them in the last bits).
        assert torch.equal(safe_files.load_network(good)(d['x'], d['sigma'], d['class_labels']), net(d['x'], d['sigma'], d['class_labels']))


def test_the_build_attack_is_real_for_an_ordinary_unpickler():
    # What the safe reader refuses really tampers with torch when unpickled normally (in a separate process).
    code = ('import pickle, sys, torch; pickle.loads(sys.stdin.buffer.read()); '
            'print(torch._utils._rebuild_tensor_v2.__defaults__)')
    out = subprocess.run([sys.executable, '-c', code], input=ema_pickle(ATTACKS['defaults of _rebuild_tensor_v2']),
                         capture_output=True, check=True).stdout
    assert b'pwned' in out and torch._utils._rebuild_tensor_v2.__defaults__ == (None,)


def test_build_in_a_storage_blob_and_in_torch_files_is_refused(tmp_path):
    before = process_state()
    blob = (b'\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.' + b'\x80\x02M\xe9\x03.' + b'\x80\x02' + inline({'little_endian': True})
            + b'.\x80\x02' + glob('torch', 'FloatStorage') + inline((None, {'__init__': None})) + b'b.')
    path = tmp_path / 'evil.pkl'
    path.write_bytes(dumps({'ema': tensor_of_blob(blob)}))
    refused(safe_files.read_pickle, path, exc=safe_files.UnsafePickleError, match='refusing BUILD .*torch.FloatStorage')
    # The same BUILD as data.pkl of a torch.save archive: our pre-scan refuses it before torch.load sees it.
    torch.save({'w': torch.zeros(2)}, tmp_path / 'ok.pt')
    with zipfile.ZipFile(tmp_path / 'ok.pt') as src, zipfile.ZipFile(tmp_path / 'evil.pt', 'w') as dst:
        for info in src.infolist():
            dst.writestr(info, ema_pickle(ATTACKS['defaults of _rebuild_tensor_v2']) if info.filename.endswith('data.pkl') else src.read(info))
    for load in (safe_files.load_torch_file, safe_files.load_network, safe_files.read_state_dict):
        refused(load, tmp_path / 'evil.pt', exc=safe_files.UnsafePickleError, match='evil.pt: refusing BUILD')
    assert process_state() == before


def test_torch_weights_only_refusal_is_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'w': Record(os.system, f'touch {marker}')}, tmp_path / 'evil.pt')
    for load in (safe_files.load_torch_file, safe_files.load_network, safe_files.read_state_dict):
        msg = refused(load, tmp_path / 'evil.pt', exc=safe_files.UnsafePickleError, match='torch.load.weights_only=True. refused it')
        assert 'system' in msg and 'evil.pt' in msg
    assert not marker.exists()

# ----------------------------------------------------------------------------------------------------------------
# 2. Walks visit each object once, nesting and init_kwargs are bounded.

def dag(levels):
    """An EDM module 'tree' whose every node has two children that are one object: 2^levels paths."""
    m = module('Leaf', params={'w': torch.zeros(3)})
    for _ in range(levels):
        m = module('Node', children={'a': m, 'b': m})
    return dumps({'ema': module('EDMPrecond', children={'model': m})})


@pytest.mark.parametrize('levels', [20, 40])
def test_dag_of_shared_modules_is_refused_fast(levels, tmp_path):
    path = tmp_path / 'dag.pkl'
    path.write_bytes(dag(levels))
    assert path.stat().st_size < 4000
    match = 'appears twice in the module tree' if levels == 20 else 'nested deeper than 100 levels'
    for load in (safe_files.load_network, sample_min.load_generator):
        refused(load, path, match=f'dag.pkl: .*{match}', seconds=2)
    if levels == 20:  # readable as data: every walk over it visits each object once
        data = safe_files.read_pickle(path)
        t0 = time.perf_counter()
        assert len(list(safe_files.pickle_values(data))) < 1000 and safe_files.torchscript_blobs(data) == []
        refused(fid_min.load_detector, path, match='found 0')
        assert time.perf_counter() - t0 < 2


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path):
    n = 100_000   # nested lists: EMPTY_LIST n times, then APPEND each onto the one below
    (tmp_path / 'deep.pkl').write_bytes(b'\x80\x02' + b']' * n + b'a' * (n - 1) + b'.')
    refused(safe_files.load_network, tmp_path / 'deep.pkl', match='deep.pkl: .*nested deeper than 100 levels')
    deep = []
    for _ in range(150):
        deep = [deep]
    torch.save({'format': 'gdd-min', 'ema': deep}, tmp_path / 'deep.pt')
    refused(safe_files.load_torch_file, tmp_path / 'deep.pt', match='deep.pt: data nested deeper than 100 levels')


def test_opcode_count_is_bounded(tmp_path, monkeypatch):
    net, _ = tiny()
    (tmp_path / 'net.pkl').write_bytes(edm_pickle_bytes(net))
    monkeypatch.setattr(safe_files, 'MAX_PICKLE_OPS', 1000)
    refused(safe_files.read_pickle, tmp_path / 'net.pkl', match='more than 1,000 pickle opcodes')


@pytest.mark.parametrize('change, match', [
    (dict(M=10 ** 9), 'M=1000000000 is not an int in .1, 10000.'),               # iDDPM: a loop of M steps
    (dict(M=1000.0), 'M=1000.0 is not an int'),
    (dict(model_channels=10 ** 6), 'model_channels=1000000 is not an int'),
    (dict(num_blocks=10 ** 5), 'num_blocks=100000 is not an int'),
    (dict(channel_mult=[1] * 1000), 'channel_mult=.* is not a list of at most 12 ints'),
    (dict(channel_mult='1,2'), 'channel_mult=.1,2. is not a list'),
    (dict(channel_mult=[1, 0]), r'channel_mult=\[1, 0\] is not a list of at most 12 ints in \[1, 64\]'),
    (dict(dropout=float('nan')), 'dropout=nan is not a number'),
    (dict(use_fp16='yes'), 'use_fp16=.yes. is not True or False'),
    (dict(frobnicate=1, zap=2), 'unknown init_kwargs for iDDPMPrecond with DhariwalUNet: frobnicate, zap'),
    (dict(in_channels=3), 'unknown init_kwargs .*: in_channels'),
    (dict(model_type='Evil'), "unknown model_type 'Evil'"),
    (dict(img_resolution=15), 'img_resolution=15 is not divisible by 2.1'),
    (dict(model_channels=512), r'state_dict of iDDPMPrecond.*model.map_layer0.weight is torch.float32 \[32, 8\] \(expected'),  # file holds less
])
def test_init_kwargs_are_bounded_before_construction(change, match, tmp_path):
    d = torch.load(FIXTURES / 'tiny_iddpm_dhariwal_cond.pt', weights_only=True)
    path = checkpoint(tmp_path / 'ckpt.pt', 'iDDPMPrecond', {**d['kwargs'], **change}, d['state_dict'])
    refused(safe_files.load_network, path, match=f'ckpt.pt: .*{match}', seconds=3)
    # The same kwargs in an EDM pickle.
    net, _ = tiny('tiny_iddpm_dhariwal_cond.pt')
    net.init_kwargs = {**net.init_kwargs, **change}
    (tmp_path / 'net.pkl').write_bytes(edm_pickle_bytes(net))
    refused(sample_min.load_generator, tmp_path / 'net.pkl', match=f'net.pkl: .*{match}', seconds=3)


def test_init_kwargs_values_must_be_plain(tmp_path):
    d = torch.load(FIXTURES / 'tiny_songunet_ddpmpp_uncond.pt', weights_only=True)
    for change, match in [({'model_channels': torch.tensor(8)}, 'model_channels=tensor.8. is not an int'),
                          ({'resample_filter': [0, 0]}, 'resample_filter=.* non-negative numbers with a positive sum'),
                          ({'embedding_type': 'evil'}, 'cannot build EDMPrecond from its init_kwargs .AssertionError')]:
        path = checkpoint(tmp_path / 'ckpt.pt', 'EDMPrecond', {**d['kwargs'], **change}, d['state_dict'])
        refused(safe_files.load_network, path, match=f'ckpt.pt: .*{match}')

# ----------------------------------------------------------------------------------------------------------------
# 3. Memory bombs: sizes are checked against the bytes the file holds before anything large is allocated.

def test_stride0_views_in_an_edm_pickle_are_refused(tmp_path):
    w = torch.zeros(1).expand(20000, 10000)                          # 200M parameters described by 4 bytes
    conv = module('Conv2d', params={'weight': Record(torch._utils._rebuild_parameter, w, False, collections.OrderedDict())})
    path = tmp_path / 'bomb.pkl'
    path.write_bytes(dumps({'ema': module('EDMPrecond', children={'conv': conv})}))
    assert path.stat().st_size < 2000
    refused(safe_files.read_pickle, path, match=r'bomb.pkl: .*size \[20000, 10000\] with stride \[0, 0\] overlaps itself')
    # Two tensors sharing one storage may not describe more bytes than it holds.
    s = torch.zeros(4)
    path.write_bytes(dumps({'ema': module('X', params={'a': s, 'b': s[:2]})}))
    assert safe_files.read_pickle(path)['ema'].state['_parameters']['b'].shape == (2,)     # distinct tensor records: fine
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')            # TypedStorage is deprecated; it is what the format pickles
        storage = torch.zeros(4).storage()
    view = lambda: Record(torch._utils._rebuild_tensor_v2, storage, 0, (4,), (1,), False, collections.OrderedDict())
    path.write_bytes(dumps({'ema': module('X', params={'a': view(), 'b': view()})}))   # one storage, twice its bytes
    refused(safe_files.read_pickle, path, match='tensors describe more data .* than the file holds')


def tensor_of_blob(blob, size=(4,)):
    return Record(torch._utils._rebuild_tensor_v2, Record(torch.storage._load_from_bytes, blob), 0, size, (1,), False,
                  collections.OrderedDict())


def test_storage_blob_sizes_must_match_its_data(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        blob = torch.zeros(4).storage().__reduce__()[1][0]     # a legacy torch.save stream of one float storage
    for name, bad, match in [('truncated', blob[:-4], 'data ends 4 bytes early'), ('trailing', blob + bytes(8), '8 unexpected bytes'),
                             ('count', blob.replace(struct.pack('<q', 4), struct.pack('<q', 10 ** 9), 1), 'declares 4 elements but')]:
        (tmp_path / f'{name}.pkl').write_bytes(dumps({'ema': tensor_of_blob(bad)}))
        refused(safe_files.read_pickle, tmp_path / f'{name}.pkl', match=f'{name}.pkl: not a readable EDM network pickle .*{match}')
    (tmp_path / 'ok.pkl').write_bytes(dumps({'ema': tensor_of_blob(blob)}))
    assert torch.equal(safe_files.read_pickle(tmp_path / 'ok.pkl')['ema'], torch.zeros(4))


def test_stride0_and_oversized_storages_in_torch_files_are_refused(tmp_path):
    torch.save({'x': torch.zeros(1).expand(20000, 10000)}, tmp_path / 'view.pt')
    refused(safe_files.load_torch_file, tmp_path / 'view.pt', match='view.pt: tensor view .* overlaps itself')
    # data.pkl declares a 10^10-element storage whose record holds 4 bytes.
    class Declares(pickle.Pickler):
        def persistent_id(self, obj):
            return ('storage', torch.FloatStorage, '0', 'cpu', 10 ** 10) if obj == 'STORAGE' else None
    buf = io.BytesIO()
    Declares(buf, protocol=2).dump({'x': Record(torch._utils._rebuild_tensor_v2, 'STORAGE', 0, (10 ** 10,), (1,), False,
                                                collections.OrderedDict())})
    with zipfile.ZipFile(tmp_path / 'huge.pt', 'w') as z:
        for name, data in [('data.pkl', buf.getvalue()), ('data/0', b'\0' * 4), ('version', b'3\n'), ('byteorder', b'little')]:
            z.writestr(f'huge/{name}', data)
    refused(safe_files.load_torch_file, tmp_path / 'huge.pt', match='huge.pt: .*declares 10000000000 x torch.float32, its record holds 4 bytes')
    # Compressed members (a zip bomb; torch.save stores them uncompressed) and legacy files that end early.
    with zipfile.ZipFile(tmp_path / 'view.pt') as src, zipfile.ZipFile(tmp_path / 'deflated.pt', 'w', zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    refused(safe_files.load_torch_file, tmp_path / 'deflated.pt', match='deflated.pt: .*is compressed')
    torch.save({'x': torch.zeros(100)}, tmp_path / 'legacy.pt', _use_new_zipfile_serialization=False)
    data = (tmp_path / 'legacy.pt').read_bytes()
    (tmp_path / 'legacy.pt').write_bytes(data[:-40])
    refused(safe_files.load_torch_file, tmp_path / 'legacy.pt', match='legacy.pt: .*data ends 40 bytes early')


def test_a_flipped_bit_in_a_torch_file_is_refused_not_loaded(tmp_path):
    # torch.load itself loads the damaged value without complaint; the zip CRC-32 catches it.
    torch.save({'w': torch.arange(1000.)}, tmp_path / 'good.pt')
    data = bytearray((tmp_path / 'good.pt').read_bytes())
    with zipfile.ZipFile(tmp_path / 'good.pt') as z:
        info = z.getinfo('good/data/0')
    name_len, extra_len = struct.unpack('<HH', data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len      # the member's data, after its local header
    data[start + 4 * 500 + 2] ^= 0x10                    # element 500: 500.0 -> another float
    (tmp_path / 'bad.pt').write_bytes(bytes(data))
    assert torch.load(tmp_path / 'bad.pt', weights_only=True)['w'][500] != 500
    refused(safe_files.load_torch_file, tmp_path / 'bad.pt', match=r"bad.pt: .*zip member 'good/data/0' fails its CRC-32 check")
    assert safe_files.load_torch_file(tmp_path / 'good.pt')['w'][500] == 500


def npz_bomb(path, arrays, level=9):
    """A valid npz of zero-filled arrays {key: (shape, descr)}, written without ever holding them: raw deflate
    segments that end in a full flush may be concatenated, so one compressed MiB of zeros (1 KB at level 9) is
    repeated."""
    def deflate(data):
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)
    local, central, mib = b'', b'', 1 << 20
    for key, (shape, descr) in arrays.items():
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {'descr': descr, 'fortran_order': False, 'shape': shape})
        head, name = head.getvalue(), f'{key}.npy'.encode()
        full, rest = divmod(int(np.prod(shape)) * np.dtype(descr).itemsize, mib)
        data = deflate(head) + deflate(bytes(mib)) * full + deflate(bytes(rest)) + b'\x03\x00'   # + empty final block
        crc = zlib.crc32(head)
        for _ in range(full):
            crc = zlib.crc32(bytes(mib), crc)
        crc, size = zlib.crc32(bytes(rest), crc), len(head) + full * mib + rest
        central += struct.pack('<4s6H3L5H2L', b'PK\x01\x02', 20, 20, 0, 8, 0, 0, crc, len(data), size, len(name),
                               0, 0, 0, 0, 0, len(local)) + name
        local += struct.pack('<4s5H3L2H', b'PK\x03\x04', 20, 0, 8, 0, 0, crc, len(data), size, len(name), 0) + name + data
    end = struct.pack('<4s4H2LH', b'PK\x05\x06', 0, 0, len(arrays), len(arrays), len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


@pytest.fixture(scope='module')
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp('bombs')
    # 400 MB of images in 2 MB (level 1: zlib inflates level-9 zeros 10x slower; they are read twice)
    npz_bomb(d / 'images.npz', {'images': ((32_768, 64, 64, 3), '|u1')}, level=1)
    npz_bomb(d / 'ref.npz', {'mu': ((12_000,), '<f8'), 'sigma': ((12_000, 12_000), '<f8')})  # a 1.15 GB covariance
    return d


def test_npz_bombs_are_refused_before_decompression(bombs):
    assert (bombs / 'images.npz').stat().st_size < 3 * 2**20 and (bombs / 'ref.npz').stat().st_size < 2 * 2**20
    refused(safe_files.load_ref, bombs / 'ref.npz', match=r'ref.npz: mu must be float \[D\] and sigma float \[D, D\] with D <= 4096')
    with safe_files.NpzFile(bombs / 'ref.npz') as f:
        assert f.files == ['mu', 'sigma']
        refused(f.array, 'sigma', 4096 ** 2 * 8, match=r'ref.npz: array .sigma. of \[12000, 12000\] float64 .* exceeds the limit')
    with safe_files.NpzFile(bombs / 'images.npz') as f:
        refused(f.array, 'images', 2**28, match=r'images.npz: array .images. of \[32768, 64, 64, 3\] uint8 .* exceeds the limit')


def test_bombs_do_not_allocate(bombs, tmp_path):
    # Peak memory of a fresh process, before and after each bomb (ru_maxrss: the high-water mark, KiB). Declared
    # images are streamed, one at a time in memory, whatever --num asks for.
    torch.save({'format': 'gdd-min', 'ema': {'class_name': 'EDMPrecond', 'init_kwargs': {}, 'state_dict': {
        'w': torch.zeros(1).expand(20000, 10000)}}}, tmp_path / 'view.pt')
    code = f'''
import json, resource, sys, time
sys.path.insert(0, {str(ROOT)!r})
import edm_nets, fid_min, safe_files
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {{}}
for name, load in [('view', lambda: safe_files.load_network({str(tmp_path / 'view.pt')!r})),
                   ('ref', lambda: safe_files.load_ref({str(bombs / 'ref.npz')!r})),
                   ('images', lambda: [b.shape for b in fid_min.image_batches({str(bombs / 'images.npz')!r}, num=64)])]:
    before, t0 = peak(), time.perf_counter()
    try:
        result = str(load())
    except ValueError as e:
        result = str(e)
    out[name] = (peak() - before, time.perf_counter() - t0, result)
print(json.dumps(out))
'''
    out = json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, check=True, text=True).stdout)
    assert 'overlaps itself' in out['view'][2] and 'D <= 4096' in out['ref'][2]
    assert out['images'][2] == '[torch.Size([64, 3, 64, 64])]'
    assert all(mb < 100 and s < 60 for mb, s, _ in out.values()), out   # MB, s; the bombs describe 0.4 to 1.2 GB

# ----------------------------------------------------------------------------------------------------------------
# 4. Wrong values: non-finite or wrongly typed tensors, non-finite statistics, bad safetensors.

@pytest.mark.parametrize('damage', ['nan', 'inf', 'float64', 'float16'])
def test_teacher_and_generator_weights_are_checked(damage, tmp_path):
    net, d = tiny()
    with torch.no_grad():
        w = net.model.enc['16x16_block0'].conv0.weight
        if damage in ('nan', 'inf'):
            w[0, 0, 0, 0] = float(damage)
        else:
            net.to(getattr(torch, damage))
    (tmp_path / 'teacher.pkl').write_bytes(edm_pickle_bytes(net))
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(net)}, tmp_path / 'generator.pt')
    match = ('model.enc.16x16_block0.conv0.weight holds NaN or inf' if damage in ('nan', 'inf')
             else f'is torch.{damage} .* \\(expected torch.float32')
    for load, name in [(safe_files.load_network, 'teacher.pkl'), (sample_min.load_generator, 'teacher.pkl'),
                       (safe_files.load_network, 'generator.pt'), (sample_min.load_generator, 'generator.pt')]:
        refused(load, tmp_path / name, match=f'{name}: .*{match}')


def test_edm_fixtures_still_load_exactly(tmp_path):
    # Official EDM files store fp32 parameters; the dtype check must not touch them.
    for name in ['tiny_iddpm_dhariwal_cond.pt']:   # (test_edm_nets loads the other fixtures the same way)
        net, d = tiny(name)
        (tmp_path / 'n.pkl').write_bytes(edm_pickle_bytes(net))
        with torch.no_grad():
            out = safe_files.load_network(tmp_path / 'n.pkl')(d['x'], d['sigma'], d['class_labels'])
            assert torch.equal(out, net(d['x'], d['sigma'], d['class_labels']))    # bitwise; EDM's outputs: test_edm_nets.py


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_reference_statistics_are_checked(tmp_path):
    mu, sigma = np.zeros(8), np.eye(8)
    bad = sigma.copy()
    bad[3, 3] = np.nan
    refused(safe_files.load_ref, write_npz(tmp_path / 'nan.npz', mu=mu, sigma=bad), match='nan.npz: mu or sigma contains NaN or inf')
    refused(safe_files.load_ref, write_npz(tmp_path / 'inf.npz', mu=mu + np.inf, sigma=sigma), match='inf.npz: mu or sigma contains NaN')
    refused(safe_files.load_ref, write_npz(tmp_path / 'int.npz', mu=mu.astype(int), sigma=sigma), match='int.npz: mu must be float')
    torch.save({'mu': mu, 'sigma': sigma}, tmp_path / 'ref.pt')
    refused(safe_files.load_ref, tmp_path / 'ref.pt', match=r'ref.pt: reference statistics must be an .npz file')
    (tmp_path / 'fake.npz').write_bytes(b'not a zip')
    refused(safe_files.load_ref, tmp_path / 'fake.npz', match='fake.npz: not an npz file')
    # Object arrays hold pickles: refused from the header, nothing unpickled.
    marker = tmp_path / 'pwned'
    np.savez(tmp_path / 'obj.npz', mu=np.array([Record(os.system, f'touch {marker}')], dtype=object), sigma=sigma)
    refused(safe_files.load_ref, tmp_path / 'obj.npz', match="obj.npz: array 'mu' has dtype object")
    assert not marker.exists()
    mu2, sigma2 = safe_files.load_ref(write_npz(tmp_path / 'ok.npz', mu=mu.astype(np.float32), sigma=sigma))
    assert mu2.dtype == np.float64 and np.array_equal(sigma2, sigma)


def test_backbone_weights_are_checked(tmp_path):
    net = backbones.build_backbone('tf_efficientnet_lite0')
    sd = net.state_dict()
    for damage, match in [('nan', 'bn1.weight holds NaN or inf'), ('float64', r'bn1.weight is torch.float64 \[32\] \(expected torch.float32 \[32\]\)')]:
        bad = dict(sd)
        bad['bn1.weight'] = sd['bn1.weight'].double() if damage == 'float64' else sd['bn1.weight'].clone().fill_(float('nan'))
        torch.save(bad, tmp_path / f'{damage}.pth')
        refused(backbones.build_backbone, 'tf_efficientnet_lite0', weights=tmp_path / f'{damage}.pth', match=match)


def write_safetensors(path, header, data=b''):
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    Path(path).write_bytes(struct.pack('<Q', len(text)) + text + data)
    return path


@pytest.mark.parametrize('header, data, match', [
    ({'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}, 'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}},
     bytes(12), "'b' starts at 4, expected 8 .overlaps"),
    ({'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4, 8]}}, bytes(8), "starts at 4, expected 0 .a gap"),
    ({'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]}}, bytes(8), 'data section has 8 bytes, the header describes 4'),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
     bytes(4), "duplicate name 'a'"),
    ({'a': {'dtype': 'F32', 'shape': [1.0], 'data_offsets': [0, 4]}}, bytes(4), "bad safetensors entry for 'a'"),
    ({'a': {'dtype': 'F32', 'shape': ['1'], 'data_offsets': [0, 4]}}, bytes(4), "bad safetensors entry for 'a'"),
    ({'a': {'dtype': 'F32', 'shape': [True], 'data_offsets': [0, 4]}}, bytes(4), "bad safetensors entry for 'a'"),
    ({'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4, 0]}}, bytes(4), "bad safetensors entry for 'a'"),
])
def test_safetensors_ranges_names_and_shapes_are_checked(header, data, match, tmp_path):
    refused(safe_files.read_safetensors, write_safetensors(tmp_path / 'w.safetensors', header, data), match=f'w.safetensors: .*{match}')


def test_safetensors_header_size_is_bounded(tmp_path):
    path = tmp_path / 'w.safetensors'
    path.write_bytes(struct.pack('<Q', 2**62) + b'{}')
    refused(safe_files.read_safetensors, path, match='header size 4611686018427387904 exceeds the file or the 100 MB limit')

# ----------------------------------------------------------------------------------------------------------------
# 5. gdd-min checkpoints: one validated loader (safe_files.load_torch_file), then the structure.

def test_checkpoint_structure_is_checked(tmp_path):
    d = torch.load(FIXTURES / 'tiny_songunet_ddpmpp_uncond.pt', weights_only=True)
    cases = [
        (dict(class_name='posix.system', init_kwargs=d['kwargs'], state_dict=d['state_dict']), "unsupported network class 'posix.system'"),
        (dict(class_name='EDMPrecond', init_kwargs=d['kwargs'], state_dict=list(d['state_dict'].values())), "entry 'ema' is not a network"),
        (dict(class_name='EDMPrecond', init_kwargs=[1], state_dict=d['state_dict']), "entry 'ema' is not a network"),
        (dict(class_name='EDMPrecond', init_kwargs=d['kwargs'], state_dict={**d['state_dict'], 7: torch.zeros(1)}), r'unexpected 7'),
        (dict(class_name='EDMPrecond', init_kwargs=d['kwargs'], state_dict={**d['state_dict'], 'model.map_layer0.weight': 1.5}),
         'model.map_layer0.weight is a float, not a CPU tensor'),
    ]
    for entry, match in cases:
        torch.save({'format': 'gdd-min', 'ema': entry}, tmp_path / 'ckpt.pt')
        refused(safe_files.load_network, tmp_path / 'ckpt.pt', match=f'ckpt.pt: .*{match}')
    good = checkpoint(tmp_path / 'good.pt', 'EDMPrecond', d['kwargs'], d['state_dict'], config={'lr': 1e-4})
    data = good.read_bytes()
    (tmp_path / 'cut.pt').write_bytes(data[:len(data) // 2])
    refused(safe_files.load_network, tmp_path / 'cut.pt', match='cut.pt: not a readable torch.save file')
    (tmp_path / 'tar.pt').write_bytes(b'x' * 512)   # not zip, not a legacy stream (torch.load would try tar)
    refused(safe_files.load_torch_file, tmp_path / 'tar.pt', match='tar.pt: not a readable torch.save file')


def test_load_torch_file_returns_what_torch_load_does(tmp_path, monkeypatch):
    state = {'step': 3, 'G': {'w': torch.randn(3, 4)}, 'rng': torch.get_rng_state(), 'opt': {'betas': (0.0, 0.99)},
             't': torch.arange(10)[2:7], 'legacy': [1.5, 'x', None]}
    torch.save(state, tmp_path / 'state.pt')
    loaded = safe_files.load_torch_file(tmp_path / 'state.pt')
    assert loaded.keys() == state.keys() and torch.equal(loaded['G']['w'], state['G']['w'])
    assert torch.equal(loaded['rng'], state['rng']) and torch.equal(loaded['t'], state['t']) and loaded['opt'] == state['opt']
    torch.save(state, tmp_path / 'legacy.pt', _use_new_zipfile_serialization=False)
    assert torch.equal(safe_files.load_torch_file(tmp_path / 'legacy.pt')['t'], state['t'])
    refused(safe_files.load_torch_file, tmp_path / 'missing.pt', exc=FileNotFoundError, match='no such file')
    monkeypatch.setattr(safe_files, 'MAX_ZIP_MEMBERS', 4)
    refused(safe_files.load_torch_file, tmp_path / 'state.pt', match='state.pt: .*zip archive with .* members, more than 4')

# ----------------------------------------------------------------------------------------------------------------
# 6. The command lines: one line, no traceback.

def fid_error(*argv):
    with pytest.raises(SystemExit) as e:
        fid_min.main([str(a) for a in argv])
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg, msg
    return msg


def test_fid_cli_one_line_errors(tmp_path, monkeypatch):
    net, _ = tiny()
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(net)}, tmp_path / 'teacher.pt')
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(8), sigma=np.full((8, 8), np.nan))
    # Like sample_min: the EDM sampler needs at least 2 steps.
    assert '--steps must be in 2..' in fid_error('calc', '--net', tmp_path / 'teacher.pt', '--steps', 1, '--ref', tmp_path / 'ref.npz')
    msg = fid_error('calc', '--net', tmp_path / 'teacher.pt', '--num', 4, '--ref', tmp_path / 'ref.npz')
    assert 'ref.npz: mu or sigma contains NaN or inf' in msg
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(8), sigma=np.eye(8))
    # Offline: the default detector cannot be downloaded -> what to download and how to pass it.
    monkeypatch.setenv('GDD_CACHE', str(tmp_path / 'cache'))
    msg = fid_error('calc', '--net', tmp_path / 'teacher.pt', '--num', 4, '--ref', tmp_path / 'ref.npz',
                    '--detector', 'http://127.0.0.1:1/inception-2015-12-05.pt')
    assert 'could not download http://127.0.0.1:1/inception-2015-12-05.pt' in msg and '--detector PATH' in msg
    msg = fid_error('calc', '--net', tmp_path / 'teacher.pt', '--num', 4, '--ref', tmp_path / 'ref.npz', '--detector', tmp_path / 'teacher.pt')
    assert 'teacher.pt: not a TorchScript module' in msg


def test_npz_header_length_and_directory_are_bounded(tmp_path, monkeypatch):
    # An .npy header may declare 4 GB of header text (version 2.0): refused before it is read.
    with zipfile.ZipFile(tmp_path / 'head.npz', 'w') as z:
        z.writestr('mu.npy', b'\x93NUMPY\x02\x00' + struct.pack('<L', 2**32 - 1) + b'{')
        z.writestr('sigma.npy', b'')
    refused(safe_files.load_ref, tmp_path / 'head.npz', match="head.npz: array 'mu' has a bad .npy header .header of 4294967295 bytes")
    np.savez(tmp_path / 'many.npz', **{f'a{i}': np.zeros(1) for i in range(10)})
    monkeypatch.setattr(safe_files, 'MAX_ZIP_MEMBERS', 5)
    refused(safe_files.load_ref, tmp_path / 'many.npz', match='many.npz: not an npz file .zip archive with 10 members, more than 5')


def test_module_records_must_be_well_formed(tmp_path):
    def record(**state):
        base = module('EDMPrecond', init_kwargs={'img_resolution': 16, 'img_channels': 3})
        base.args[0]['state'].update(state)
        return base
    cases = [(record(_init_args=(16, 3)), 'positional init_args'),
             (record(_parameters={'model.map_layer0.weight': torch.zeros(1)}), "entry 'model.map_layer0.weight' is not a tensor with a unique plain name"),
             (record(_modules={'model': 5}), "child 'model' is not a module record"),
             (record(_buffers=[1]), '_buffers is a list'),
             (Record(edm_pickle._reconstruct_persistent_obj, dict(type='class', version=5, class_name='X', state={})),
              'unsupported EDM persistent object record')]
    for obj, match in cases:
        (tmp_path / 'n.pkl').write_bytes(dumps({'ema': obj}))
        for load in (safe_files.load_network, sample_min.load_generator):
            refused(load, tmp_path / 'n.pkl', match=f'n.pkl: .*{match}')


def test_module_state_dicts_with_metadata_load(tmp_path):
    # torch.save of a module's state_dict (an OrderedDict carrying '_metadata', as torchvision's .pth releases and
    # our training states are): the inert pre-read accepts its one BUILD, and the result is what torch.load gives.
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(net.state_dict(), tmp_path / 'sd.pth')
    torch.save({'G': net.state_dict(), 'opt': torch.optim.Adam(net.parameters()).state_dict()}, tmp_path / 'state.pt')
    loaded = safe_files.load_torch_file(tmp_path / 'sd.pth')
    assert list(loaded) == list(net.state_dict()) and all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    assert set(safe_files.load_torch_file(tmp_path / 'state.pt')) == {'G', 'opt'}
