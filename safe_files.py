"""Untrusted files: the one validation layer for every file that comes from outside (EDM and GDD / D2O pickles,
gdd-min checkpoints and training states, torch.save'd and safetensors backbone weights, TorchScript detector
archives, npz statistics and images), and the download cache. Infrastructure: a reader of the method may skip it.

The rules (README, "Security and failure behaviour"):
- Nothing from a file is executed, and no real object is handed to the pickle machine: a global becomes an
  inert stand-in holding its name, a call becomes a record, and tensors / networks are built afterwards from
  checked plain data. So a pickle can neither run code nor change anything in the process (it cannot BUILD
  new __defaults__ onto torch._utils._rebuild_tensor_v2, say).
- Every declared size is checked against the bytes the file really holds before anything large is allocated
  or decompressed; every walk visits each object once and has a depth bound; sizes in init_kwargs are bounded.
- A bad file raises ValueError('<file>: <problem>') in one line (UnsafePickleError, also a ValueError, for what
  a pickle may not contain), which the command lines print as their one-line error.

Entry points: load_network (EDM / D2O pickles and gdd-min checkpoints), load_torch_file, read_pickle,
read_state_dict (backbone and metric weights, read_torchscript_tensors for TorchScript archives),
torchscript_archive (detectors), NpzImages, load_ref and load_ref_features (npz files),
open_url (downloads), save_torch and net_to_dict (what we write and read back).
"""

import collections
import contextlib
import copy
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import pickletools
import re
import sys
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

import cli
import edm_nets
from cli import error_line

MAX_NESTING = 100            # containers inside containers (an EDM network pickle needs ~25)
MAX_PICKLE_OPS = 2_000_000   # opcodes per pickle (56k in an ImageNet ADM pickle): bounds time and memory
MAX_ZIP_MEMBERS = 100_000    # members of a torch / npz zip archive (torch.save writes ~one per tensor)


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The file holds something its format does not allow (a foreign global, BUILD on a global, ...); nothing
    it references was executed."""


class _BadFile(ValueError):
    """A failed check; the public readers prefix it with the file's name."""



# --- The inert pickle machine -----------------------------------------------------------------------------------

class _Global:
    """Stand-in for a global that a pickle names: only the name, never the object."""
    __slots__ = ('module', 'name')

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __repr__(self):
        return f'{self.module}.{self.name}'


class _Call:
    """Inert record of a call in a pickle (REDUCE / NEWOBJ): func(*args), the state of a following BUILD, and
    (permissive mode only) items written into it. Interpreted after unpickling, never called."""
    __slots__ = ('func', 'args', 'state', 'items')

    def __init__(self, func, args):
        self.func, self.args, self.state, self.items = func, args, None, []

    def key(self):
        return self.func.module, self.func.name


_PERSISTENT_ID = _Global('pickle', 'persistent_id')


def _describe(obj):
    if type(obj) is _Global:
        return f'global {obj}'
    return f'the result of {obj.func}(...)' if type(obj) is _Call else f'a {type(obj).__name__}'


class _BoundedReader:
    """The file up to `end`; a read longer than what is left fails before anything is allocated for it (a pickle
    can declare a 2^60-byte bytes object in 9 bytes)."""
    def __init__(self, f, end):
        self.f, self.end = f, end

    def read(self, n):
        left = self.end - self.f.tell()
        if n > left:
            raise _BadFile(f'truncated (an item declares {n} bytes, {max(left, 0)} are left)')
        return self.f.read(n)

    def readline(self):
        return self.f.readline(max(self.end - self.f.tell(), 0))


class _Unpickler(pickle._Unpickler):
    """Python's own pickle machine (the pure-Python one: the C one cannot be changed) with every opcode that could
    reach a real object replaced: GLOBAL -> a _Global stand-in (refused unless in `allowed`), REDUCE / NEWOBJ ->
    a _Call record, BUILD only on a record whose global is in `buildable`, SETITEM(S) / APPEND(S) / ADDITEMS only
    on the plain dict / list / set the pickle itself made. Persistent ids become records collected in
    `persistent_ids`. allowed=None accepts every name and buildable=None lets BUILD and item writes land on any
    record: the permissive pre-scan of torch files, which still runs nothing (torch's weights_only unpickler
    judges their globals afterwards)."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, end, allowed=frozenset(), buildable=frozenset(), persistent_ids=None, what='this format'):
        super().__init__(_BoundedReader(file, end))
        self.allowed, self.buildable, self.persistent_ids, self.what, self.ops = allowed, buildable, persistent_ids, what, 0
        self.ordered_dicts = {}     # id -> the plain dicts made for OrderedDict(): they take one BUILD, ignored

    def find_class(self, module, name):
        if self.allowed is not None and (module, name) not in self.allowed:
            allowed = ', '.join(sorted(f'{m}.{n}' for m, n in self.allowed)) or 'none'
            raise UnsafePickleError(f'refusing to load global {module}.{name} (not part of {self.what}; allowed: {allowed})')
        return _Global(module, name)

    def persistent_load(self, pid):
        if self.persistent_ids is None:
            raise UnsafePickleError(f'unexpected persistent id (not part of {self.what})')
        record = _Call(_PERSISTENT_ID, (pid,))
        self.persistent_ids.append(record)
        return record

    def _call(self, func, args, op):
        if type(func) is not _Global or type(args) is not tuple:
            raise UnsafePickleError(f'refusing {op} of {_describe(func)} (only named globals are called, as records)')
        if (func.module, func.name) == ('collections', 'OrderedDict') and not args:
            d = {}  # a plain dict (ordered); its items follow as SETITEMS
            self.ordered_dicts[id(d)] = d
            return d
        return _Call(func, args)

    def _reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, 'REDUCE')

    def _newobj(self):
        args = self.stack.pop()
        self.append(self._call(self.stack.pop(), args, 'NEWOBJ'))

    def _newobj_ex(self):
        kwargs, args = self.stack.pop(), self.stack.pop()
        if kwargs:
            raise UnsafePickleError('refusing NEWOBJ_EX with keyword arguments')
        self.append(self._call(self.stack.pop(), args, 'NEWOBJ_EX'))

    def _build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is dict and self.ordered_dicts.pop(id(inst), None) is inst and type(state) is dict:
            return      # a module state_dict's attributes (its '_metadata' versions): our own dict, nothing to set
        if type(inst) is not _Call or (self.buildable is not None and inst.key() not in self.buildable):
            names = ', '.join(sorted(f'{m}.{n}' for m, n in self.buildable or ()))
            allowed = 'call records' if self.buildable is None else f'records of {names}' if names else 'nothing in this format'
            raise UnsafePickleError(f'refusing BUILD (setting state) on {_describe(inst)} (accepted only on {allowed})')
        if inst.state is not None or state is None:
            raise UnsafePickleError(f'refusing a second or empty BUILD on {_describe(inst)}')
        inst.state = state

    def _write(self, kind, items, op):
        target = self.stack[-1]
        if type(target) is kind and kind is dict:
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        elif type(target) is kind:
            target.extend(items) if kind is list else target.update(items)
        elif type(target) is _Call and self.buildable is None:
            target.items.extend(items)
        else:
            raise UnsafePickleError(f'refusing {op} on {_describe(target)} (only on the plain {kind.__name__} the pickle made)')

    def _setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._write(dict, [key, value], 'SETITEM')

    def _setitems(self):
        self._write(dict, self.pop_mark(), 'SETITEMS')

    def _append(self):
        self._write(list, [self.stack.pop()], 'APPEND')

    def _appends(self):
        self._write(list, self.pop_mark(), 'APPENDS')

    def _additems(self):
        self._write(set, self.pop_mark(), 'ADDITEMS')

    for _op, _f in [(pickle.REDUCE, _reduce), (pickle.NEWOBJ, _newobj), (pickle.NEWOBJ_EX, _newobj_ex), (pickle.BUILD, _build),
                    (pickle.SETITEM, _setitem), (pickle.SETITEMS, _setitems), (pickle.APPEND, _append),
                    (pickle.APPENDS, _appends), (pickle.ADDITEMS, _additems)]:
        dispatch[_op[0]] = _f
    # Opcodes no format here uses: class instantiation of protocols 0/1, the copyreg extension registry (it
    # resolves globals behind find_class's back) and protocol 5's out-of-band buffers (BYTEARRAY8 allocates its
    # declared size before reading).
    for _op in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4, pickle.BYTEARRAY8,
                pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch[_op[0]] = lambda self, _name=pickletools.code2op[_op.decode('latin-1')].name: self._refuse(_name)
    del _op, _f

    def _refuse(self, name):
        raise UnsafePickleError(f'refusing pickle opcode {name} (not part of {self.what})')


def _counted(op):
    def run(self):
        self.ops += 1
        if self.ops > MAX_PICKLE_OPS:
            raise _BadFile(f'more than {MAX_PICKLE_OPS:,} pickle opcodes (no network file of this format has that many)')
        op(self)
    return run


_Unpickler.dispatch = {code: _counted(op) for code, op in _Unpickler.dispatch.items()}

# --- Storages and tensor views ----------------------------------------------------------------------------------

_STORAGE_DTYPES = {'DoubleStorage': torch.float64, 'FloatStorage': torch.float32, 'HalfStorage': torch.float16,
                   'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
                   'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
                   'BoolStorage': torch.bool, 'ComplexFloatStorage': torch.complex64,
                   'ComplexDoubleStorage': torch.complex128, 'UntypedStorage': torch.uint8}
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950a86a20f9469cfc6c, 1001


def _storages(pids):
    """{key: (dtype, numel)} of torch.save persistent ids ('storage', torch.<Type>Storage, key, location, numel[, None]);
    dtypes without a typed storage class (uint16, float8, ...) are saved as torch.storage.UntypedStorage of bytes."""
    out = {}
    for record in pids:
        pid = record.args[0]
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == 'storage' and type(pid[1]) is _Global
                and pid[1].module in ('torch', 'torch.storage') and type(pid[2]) is str and type(pid[3]) is str
                and type(pid[4]) is int and pid[4] >= 0 and (len(pid) == 5 or pid[5] is None)):
            raise _BadFile(f'unsupported storage record {pid!r:.100}')
        dtype = _STORAGE_DTYPES.get(pid[1].name)
        if dtype is None:
            raise _BadFile(f'unsupported storage type torch.{pid[1].name}')
        if out.setdefault(pid[2], (dtype, pid[4])) != (dtype, pid[4]):
            raise _BadFile(f'storage {pid[2]!r} declared twice with different types or sizes')
    return out


def _legacy_layout(f, end, allowed=None, what='a torch.save file'):
    """Check a legacy (non-zip) torch.save stream in f up to `end` (EDM's storage blobs, old .pth files): five
    pickles (magic number, protocol 1001, sys info, the object with storages as persistent ids, the list of
    storage keys), then per key an int64 element count and the raw data. Every count must equal the declared
    one and the data must end exactly at `end`, so whatever loads it allocates only what the file holds.
    Returns (object as records, its persistent-id records, {key: (dtype, numel, offset of the data)})."""
    def load(**kwargs):
        return _Unpickler(f, end, what=what, **kwargs).load()
    if load() != _LEGACY_MAGIC:
        raise _BadFile('not a torch.save file (no torch magic number)')
    if load() != _LEGACY_PROTOCOL:
        raise _BadFile('unsupported legacy torch.save protocol version')
    info = load()
    if type(info) is not dict or info.get('little_endian') is not True or sys.byteorder != 'little':
        raise _BadFile('big-endian torch.save data (or a malformed header)')
    pids = []
    obj = load(allowed=allowed, buildable=None if allowed is None else frozenset(), persistent_ids=pids)
    keys, storages = load(), _storages(pids)
    if type(keys) is not list or len(set(keys)) != len(keys) or set(keys) != set(storages):
        raise _BadFile('storage key list does not match the storages of the object')
    layout, pos = {}, f.tell()
    for key in keys:
        dtype, numel = storages[key]
        f.seek(pos)
        head = f.read(8)
        if len(head) != 8 or int.from_bytes(head, 'little', signed=True) != numel:
            raise _BadFile(f'storage {key!r} declares {numel} elements but its data says otherwise')
        layout[key] = (dtype, numel, pos + 8)
        pos += 8 + numel * dtype.itemsize
        if pos > end:
            raise _BadFile(f'storage {key!r} declares {numel} x {dtype} but the data ends {pos - end} bytes early')
    if pos != end:
        raise _BadFile(f'{end - pos} unexpected bytes after the storage data')
    return obj, pids, layout


def _check_view(numel, offset, size, stride):
    """A tensor view must lie inside its storage of `numel` elements without overlapping itself: with the dims
    sorted by stride, each stride is at least the extent of the smaller ones (no stride 0). So no view holds
    more elements than its storage (stride-0 views would let a 28 KB file describe a 200M-parameter network)."""
    if not (type(size) in (tuple, list) and type(stride) in (tuple, list) and len(size) == len(stride) <= 16
            and all(type(v) is int and v >= 0 for v in (*size, *stride)) and type(offset) is int and offset >= 0):
        raise _BadFile(f'malformed tensor view (offset {offset!r:.40}, size {size!r:.80}, stride {stride!r:.80})')
    if 0 in size:
        return
    extent = 1  # elements spanned by the dims so far
    for n, s in sorted(((n, s) for n, s in zip(size, stride) if n > 1), key=lambda d: d[1]):
        if s < extent:
            raise _BadFile(f'tensor view of size {list(size)} with stride {list(stride)} overlaps itself')
        extent += s * (n - 1)
    if offset + extent > numel:
        raise _BadFile(f'tensor view of size {list(size)} reaches past its storage of {numel} elements')

# --- EDM network pickles (written by EDM's torch_utils/persistence.py and training_loop.py) --------------------
#
# EDM pickles store every network layer as a call _reconstruct_persistent_obj(meta), where meta holds the class
# name, the source code of its module and the object's __dict__. EDM's loader executes that source; we never do.
# read_pickle runs the inert machine with exactly the format's globals, then interprets its records: a persistent
# object becomes a plain `Persistent` record, a ModuleDict a `ModuleDictRecord`, each tensor a fresh tensor copied
# from its checked storage blob, a NumPy scalar a Python number.

_EDM_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): 'persistent',
    ('torch.nn.modules.container', 'ModuleDict'): 'module_dict',
    ('collections', 'OrderedDict'): 'ordered_dict',       # only OrderedDict(), which the machine makes a plain dict
    ('torch._utils', '_rebuild_parameter'): 'parameter',
    ('torch._utils', '_rebuild_tensor_v2'): 'tensor',
    ('torch.storage', '_load_from_bytes'): 'storage',
    ('numpy._core.multiarray', 'scalar'): 'scalar',       # NumPy >= 2
    ('numpy.core.multiarray', 'scalar'): 'scalar',        # NumPy 1.x
    ('numpy', 'dtype'): 'dtype',
}
_EDM_BUILDABLE = frozenset({('torch.nn.modules.container', 'ModuleDict'), ('numpy', 'dtype')})
_STORAGE_GLOBALS = frozenset(('torch', name) for name in _STORAGE_DTYPES)
_PLAIN = (bool, int, float, complex, str, bytes)


class Persistent:
    """Data of one EDM persistent object: class_name, init_args, init_kwargs and state (its __dict__)."""
    def __init__(self, meta):
        if type(meta) is not dict or meta.get('type') != 'class' or meta.get('version') != 6:
            raise _BadFile('unsupported EDM persistent object record (expected type "class", version 6)')
        self.class_name, self.state = meta.get('class_name'), meta.get('state')
        if type(self.class_name) is not str or type(self.state) is not dict:
            raise _BadFile('EDM persistent object record without a class_name string and a state dict')
        init_args, init_kwargs = self.state.get('_init_args', ()), self.state.get('_init_kwargs', {})
        if type(init_args) not in (tuple, list) or type(init_kwargs) is not dict or not all(type(k) is str for k in init_kwargs):
            raise _BadFile(f'{self.class_name}: _init_args / _init_kwargs are not a tuple / a dict of names')
        self.init_args, self.init_kwargs = tuple(init_args), dict(init_kwargs)

    def __repr__(self):
        return f'Persistent({self.class_name}, init_kwargs={self.init_kwargs})'


class ModuleDictRecord:
    """Stand-in for a pickled torch.nn.ModuleDict: its BUILD state (its __dict__, with `_modules`)."""
    def __init__(self, state):
        self.state = state


class _EDMData:
    """Second stage of read_pickle: the machine's plain data and records -> plain data, Persistent /
    ModuleDictRecord records and tensors. Each object is interpreted once (memo: shared children stay shared,
    and cost once), nesting is bounded, and all tensors together may not hold more bytes than the storages."""
    def __init__(self):
        self.memo, self.storages, self.storage_bytes, self.tensor_bytes = {}, {}, 0, 0

    def value(self, obj, depth=0):
        if obj is None or type(obj) in _PLAIN:
            return obj
        if id(obj) in self.memo:
            return self.memo[id(obj)]
        if depth > MAX_NESTING:
            raise _BadFile(f'data nested deeper than {MAX_NESTING} levels')
        kind = type(obj)
        if kind is dict:
            out = self.memo[id(obj)] = {}
            for k, v in obj.items():
                out[self.key(k)] = self.value(v, depth + 1)
        elif kind is list:
            out = self.memo[id(obj)] = []
            for v in obj:
                out.append(self.value(v, depth + 1))
        elif kind is tuple:
            out = self.memo[id(obj)] = tuple([self.value(v, depth + 1) for v in obj])
        elif kind in (set, frozenset):
            for v in obj:
                self.key(v)
            out = self.memo[id(obj)] = obj
        elif kind is _Call:
            out = self.memo[id(obj)] = self.call(obj, depth)
        else:
            raise _BadFile(f'{_describe(obj)} used as a value')
        return out

    def key(self, k):
        if k is None or type(k) in _PLAIN or (type(k) is tuple and all(x is None or type(x) in _PLAIN for x in k)):
            return k
        raise _BadFile(f'{_describe(k)} used as a dict key or set element')

    def call(self, rec, depth):
        kind, args = _EDM_GLOBALS.get(rec.key()), rec.args
        if kind == 'persistent' and len(args) == 1 and rec.state is None:
            return Persistent(self.value(args[0], depth + 1))
        if kind == 'module_dict' and not args and type(rec.state) is dict:
            return ModuleDictRecord(self.value(rec.state, depth + 1))
        if kind == 'tensor':
            return self.tensor(rec)
        if kind == 'parameter' and len(args) == 3 and type(args[0]) is _Call and args[0].key() == ('torch._utils', '_rebuild_tensor_v2'):
            if type(args[1]) is not bool or not (type(args[2]) is dict and not args[2]) or rec.state is not None:
                raise _BadFile('torch Parameter record with hooks or state (not part of the EDM format)')
            return self.value(args[0], depth + 1)  # a plain tensor; build_network copies it into a parameter
        if kind == 'scalar' and len(args) == 2 and type(args[1]) is bytes:
            dtype = self.numpy_dtype(args[0])
            if len(args[1]) != dtype.itemsize:
                raise _BadFile('malformed NumPy scalar')
            return np.frombuffer(args[1], dtype=dtype)[0].item()  # plain Python float / int / bool
        raise _BadFile(f'malformed or misplaced record {rec.func}({len(args)} arguments)')

    def numpy_dtype(self, rec):
        # numpy.dtype('f8', False, True) + BUILD state (3, '<', None, None, None, -1, -1, 0): a numeric scalar type.
        if not (type(rec) is _Call and rec.key() == ('numpy', 'dtype') and len(rec.args) == 3 and type(rec.args[0]) is str
                and re.fullmatch(r'[biuf][1248]', rec.args[0]) and type(rec.state) is tuple and len(rec.state) == 8
                and rec.state[1] in ('<', '>', '|', '=')):
            raise _BadFile('malformed NumPy dtype record (only numeric scalar types are expected)')
        return np.dtype(rec.state[1] + rec.args[0])

    def storage(self, rec):
        if not (type(rec) is _Call and rec.key() == ('torch.storage', '_load_from_bytes') and len(rec.args) == 1
                and type(rec.args[0]) is bytes and rec.state is None):
            raise _BadFile('tensor record whose storage is not a torch.storage._load_from_bytes blob')
        if id(rec) not in self.storages:
            blob = rec.args[0]
            obj, pids, layout = _legacy_layout(io.BytesIO(blob), len(blob), _STORAGE_GLOBALS, 'a storage blob')
            if len(pids) != 1 or obj is not pids[0]:
                raise _BadFile('storage blob that is not exactly one storage')
            dtype, numel, start = next(iter(layout.values()))
            self.storages[id(rec)] = (dtype, numel, blob, start)
            self.storage_bytes += numel * dtype.itemsize
        return self.storages[id(rec)]

    def tensor(self, rec):
        # _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        args = rec.args
        if len(args) not in (6, 7) or rec.state is not None:
            raise _BadFile('malformed torch._utils._rebuild_tensor_v2 record')
        dtype, numel, blob, start = self.storage(args[0])
        offset, size, stride, requires_grad, hooks = args[1:6]
        if type(requires_grad) is not bool or not (type(hooks) is dict and not hooks) or (len(args) == 7 and args[6] not in (None, {})):
            raise _BadFile('tensor record with hooks or metadata (not part of the EDM format)')
        _check_view(numel, offset, size, stride)
        self.tensor_bytes += math.prod(size) * dtype.itemsize
        if self.tensor_bytes > self.storage_bytes:
            raise _BadFile(f'tensors describe more data ({self.tensor_bytes} bytes so far) than the file holds '
                           f'({self.storage_bytes} bytes of storages): views share a storage')
        return _copy_view(blob, start, dtype, numel, offset, size, stride)


def _copy_view(blob, start, dtype, numel, offset, size, stride):
    """A fresh tensor (sharing nothing with the blob or other tensors) of a checked view (_check_view) of the storage
    of numel x dtype at byte `start` of blob. Contiguous views (all of EDM's) are one bytearray copy, which is also
    much faster than a multi-threaded copy_ on a busy machine."""
    count = math.prod(size)
    if count and all(s == math.prod(size[i + 1:]) for i, (n, s) in enumerate(zip(size, stride)) if n > 1):
        first = start + offset * dtype.itemsize
        return torch.frombuffer(bytearray(memoryview(blob)[first:first + count * dtype.itemsize]), dtype=dtype).reshape(size)
    out = torch.empty(size, dtype=dtype)
    if count:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # frombuffer warns that bytes are read-only; they are only read
            flat = torch.frombuffer(blob, dtype=dtype, count=numel, offset=start)
        out.copy_(flat.as_strided(size, stride, offset))
    return out


def read_pickle(path_or_file):
    """Read an EDM-format pickle as plain data (dicts, lists, numbers, tensors, Persistent / ModuleDictRecord
    records). Never executes code from the file and never hands it a real object; raises UnsafePickleError for
    what the format does not allow (foreign globals, BUILD on anything but a ModuleDict / NumPy dtype record),
    ValueError for a corrupt or oversized file."""
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, 'rb') as f:
            return read_pickle(f)
    f = path_or_file
    name = getattr(f, 'name', 'input')
    try:
        start = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(start)
        records = _Unpickler(f, end, set(_EDM_GLOBALS), _EDM_BUILDABLE, what='the EDM pickle format').load()
        return _EDMData().value(records)
    except UnsafePickleError as e:
        raise UnsafePickleError(f'{name}: {e}') from None
    except Exception as e:  # truncated streams, wrong opcodes, failed checks: all are "not an EDM pickle"
        reason = str(e) if isinstance(e, _BadFile) else f'{type(e).__name__}: {error_line(e)}'
        raise ValueError(f'{name}: not a readable EDM network pickle ({reason})') from None


def pickle_values(data):
    """Every distinct object inside read_pickle data (containers, the states of records, leaves), each once:
    walking a DAG costs its distinct nodes, never its paths (2^40 of them fit in a few KB)."""
    seen, stack = set(), [data]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, (Persistent, ModuleDictRecord)):
            stack.append(x.state)


def persistent_state_dict(obj, prefix=''):
    """state_dict (name -> tensor, in nn.Module.state_dict order) of a Persistent module tree. Each module is
    visited once: one reached twice (a DAG, whose paths could number 2^40) is refused, as is a malformed state."""
    out, seen = collections.OrderedDict(), set()

    def field(state, key, kind, where):
        value = state.get(key, {})
        if not isinstance(value, kind):
            raise ValueError(f'module {where or "<root>"}: {key} is a {type(value).__name__}')
        return value

    def walk(module, prefix, depth):
        where = prefix[:-1]
        if id(module) in seen:
            raise ValueError(f'module {where} appears twice in the module tree (EDM networks are trees)')
        if depth > MAX_NESTING:
            raise ValueError(f'module tree deeper than {MAX_NESTING} levels')
        seen.add(id(module))
        state = module.state
        non_persistent = field(state, '_non_persistent_buffers_set', (set, frozenset, dict), where)
        tensors = [*field(state, '_parameters', dict, where).items(),
                   *((k, v) for k, v in field(state, '_buffers', dict, where).items() if k not in non_persistent)]
        for name, value in tensors:
            if type(name) is not str or not name or '.' in name or prefix + name in out or not (value is None or isinstance(value, torch.Tensor)):
                raise ValueError(f'module {where or "<root>"}: entry {name!r:.40} is not a tensor with a unique plain name')
            if value is not None:
                out[prefix + name] = value
        for name, child in field(state, '_modules', dict, where).items():
            if child is None:
                continue
            if type(name) is not str or not name or '.' in name or not isinstance(child, (Persistent, ModuleDictRecord)):
                raise ValueError(f'module {where or "<root>"}: child {name!r:.40} is not a module record')
            walk(child, prefix + name + '.', depth + 1)

    walk(obj, prefix, 0)
    return out

# --- torch.save files (gdd-min checkpoints and training states, backbone weights) -------------------------------

def _open_zip(f, size):
    """zipfile.ZipFile(f) once the end record says that the central directory is no larger than MAX_ZIP_MEMBERS
    entries need (zipfile makes an object per entry before anyone could count them)."""
    end = zipfile._EndRecData(f)
    if end is None:
        raise _BadFile('not a zip archive (no end-of-directory record)')
    if end[zipfile._ECD_SIZE] > min(size, MAX_ZIP_MEMBERS * 1024):
        raise _BadFile(f'zip directory of {end[zipfile._ECD_SIZE]} bytes, more than the file or {MAX_ZIP_MEMBERS:,} members need')
    zf = zipfile.ZipFile(f)
    if len(zf.infolist()) > MAX_ZIP_MEMBERS:
        raise _BadFile(f'zip archive with {len(zf.infolist())} members, more than {MAX_ZIP_MEMBERS:,}')
    return zf


def _torch_zip(f, size, deflated_limit=0):
    """Check the central directory of a torch zip archive (torch.save, torch.jit.save) before anything reads a
    member: a directory no larger than MAX_ZIP_MEMBERS entries need, unique names under one top folder, every
    member inside the file and stored uncompressed (torch.save) -- or deflated, up to deflated_limit declared
    bytes in total (the code files of torch.jit.save). Returns (ZipFile, top folder)."""
    zf = _open_zip(f, size)
    infos = zf.infolist()
    if not infos or len({i.filename for i in infos}) != len(infos):
        raise _BadFile(f'zip archive with {len(infos)} members or duplicate names')
    top = infos[0].filename.split('/', 1)[0]
    inflated = 0
    for i in infos:
        if not i.filename.startswith(top + '/'):
            raise _BadFile(f'zip member {i.filename!r:.80} outside the archive folder {top!r:.80}')
        if i.compress_type == zipfile.ZIP_DEFLATED and deflated_limit:
            inflated += i.file_size
        elif i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size:
            raise _BadFile(f'zip member {i.filename!r:.80} is compressed (torch archives store their data uncompressed)')
        if i.header_offset + 30 + len(i.filename) + i.compress_size > size:
            raise _BadFile(f'zip member {i.filename!r:.80} reaches past the end of the file')
    if inflated > deflated_limit:
        raise _BadFile(f'zip members declare {inflated} bytes of compressed data (at most {deflated_limit} accepted)')
    return zf, top


def check_torch_zip(source, deflated_limit=0):
    """_torch_zip for a path or a binary file (e.g. the TorchScript archive inside a detector pickle), before
    torch.jit.load reads it; raises ValueError('<name>: <problem>')."""
    name = getattr(source, 'name', None) or str(source)
    try:
        with (open(source, 'rb') if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source)) as f:
            _torch_zip(f, f.seek(0, os.SEEK_END), deflated_limit)
            f.seek(0)
    except (_BadFile, zipfile.BadZipFile) as e:
        raise ValueError(f'{name}: {e}') from None


def _check_loaded(obj):
    """Walk torch.load's result once (each container once, nesting bounded): every tensor a plain CPU view that
    lies in its storage without overlapping itself, and all of them together no more bytes than their storages
    (torch accepts stride-0 views, which can describe gigabytes with a 4-byte storage)."""
    seen, storages, tensor_bytes, stack = set(), {}, 0, [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        if x is None or type(x) in _PLAIN or id(x) in seen:
            continue
        seen.add(id(x))
        if depth > MAX_NESTING:
            raise _BadFile(f'data nested deeper than {MAX_NESTING} levels')
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided or x.device.type != 'cpu' or x.is_quantized:
                raise _BadFile(f'a {x.layout} / {x.device} tensor (only plain CPU tensors are expected)')
            s = x.untyped_storage()
            _check_view(s.nbytes() // x.element_size(), x.storage_offset(), tuple(x.shape), x.stride())
            storages[s.data_ptr(), s.nbytes()] = s.nbytes()
            tensor_bytes += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend((v, depth + 1) for v in x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in x)
    if tensor_bytes > sum(storages.values()):
        raise _BadFile(f'tensors describe {tensor_bytes} bytes but the file holds {sum(storages.values())} (shared views)')


def _check_crcs(zf):
    # torch.load does not verify the zip CRC-32s, so a flipped bit in a weight would load as a silently wrong
    # value. Reading each member once (streamed) lets zipfile check it; CRC 0 marks a writer that skipped it
    # (torch.serialization.config.save.compute_crc32 = False).
    for info in zf.infolist():
        if info.CRC == 0 and info.file_size:
            continue
        with zf.open(info) as member:
            try:
                while member.read(1 << 22):
                    pass
            except zipfile.BadZipFile:
                raise _BadFile(f'zip member {info.filename!r:.80} fails its CRC-32 check (the file is corrupted)') from None


def _zip_records(f, size, what, deflated_limit=0):
    """(zip, data.pkl read by the inert machine as records, {storage key: (dtype, numel, member)}) of a torch zip
    archive (torch.save, torch.jit.save) whose directory passes _torch_zip and whose every storage member holds
    exactly the bytes its record declares. Nothing is decompressed or allocated beyond what the file holds."""
    zf, top = _torch_zip(f, size, deflated_limit)
    pids, data = [], zf.read(f'{top}/data.pkl')
    records = _Unpickler(io.BytesIO(data), len(data), None, None, pids, what).load()
    storages = {}
    for key, (dtype, numel) in _storages(pids).items():
        info = zf.NameToInfo.get(f'{top}/data/{key}')
        if info is None or info.file_size != numel * dtype.itemsize:
            raise _BadFile(f'storage {key!r} declares {numel} x {dtype}, its record holds '
                           f'{"nothing" if info is None else f"{info.file_size} bytes"}')
        storages[key] = (dtype, numel, info)
    return zf, records, storages


@contextlib.contextmanager
def _refusals(path, what):
    """Any failure while `path` is read as `what` becomes one line: FileNotFoundError, UnsafePickleError, or
    ValueError('<path>: not a readable <what> (<reason>)')."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f'no such file: {path}') from None
    except UnsafePickleError as e:
        raise UnsafePickleError(f'{path}: {e}') from None
    except Exception as e:
        reason = str(e) if isinstance(e, _BadFile) else f'{type(e).__name__}: {error_line(e)}'
        raise ValueError(f'{path}: not a readable {what} ({reason})') from None


def load_torch_file(path):
    """Validated torch.load(path, map_location='cpu', weights_only=True) for any torch.save file that comes from
    outside (gdd-min checkpoints and training states, backbone weights): a hostile or broken file costs no more
    time and memory than the bytes it really holds, and is refused in one line.
    - Before torch reads anything: a zip archive must pass _torch_zip (members stored, inside the file, bounded
      count) and its data.pkl is pre-read by the inert machine, so every storage it declares has exactly the
      bytes of its record, and every member's CRC-32 is checked; a legacy (non-zip) file must pass
      _legacy_layout. Anything else (a tar file, a bare pickle) is refused.
    - torch's weights_only unpickler then loads it; its refusals become one line.
    - The result is walked once (_check_loaded): plain CPU tensors, non-overlapping views inside their storages.
    Returns the loaded object. Raises FileNotFoundError, or ValueError('<path>: <problem>') (UnsafePickleError,
    a ValueError, when a global or opcode is refused)."""
    name = str(path)
    with _refusals(path, 'torch.save file'), open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(4) == b'PK\x03\x04':
            _check_crcs(_zip_records(f, size, 'a torch.save file')[0])
        else:
            f.seek(0)
            _legacy_layout(f, size)
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f'{name}: {error_line(e)}') from None
    except Exception as e:
        raise ValueError(f'{name}: torch.load failed ({type(e).__name__}: {error_line(e)})') from None
    try:
        _check_loaded(obj)
    except _BadFile as e:
        raise ValueError(f'{name}: {e}') from None
    return obj

# --- npz files (reference statistics, generated images) ---------------------------------------------------------

class NpzFile:
    """An .npz (np.savez / np.savez_compressed) read member by member, each checked before its data is
    decompressed: at most MAX_ZIP_MEMBERS members, stored or deflated; a member's .npy header must declare a
    plain numeric dtype and a shape whose byte size is exactly the member's declared size, and array() reads
    only up to the caller's bound. So a 1 MB file cannot inflate to gigabytes unasked. Errors:
    ValueError('<path>: <problem>')."""
    def __init__(self, path):
        self.path, self.file = str(path), open(path, 'rb')
        try:
            self.zip = _open_zip(self.file, os.fstat(self.file.fileno()).st_size)
            infos = self.zip.infolist()
            if any(i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) for i in infos):
                raise _BadFile('a member uses a compression other than deflate')
        except (_BadFile, zipfile.BadZipFile, OSError, EOFError) as e:
            self.file.close()
            raise ValueError(f'{self.path}: not an npz file ({error_line(e)})') from None
        self.members = {i.filename[:-4]: i for i in infos if i.filename.endswith('.npy')}
        self.files = list(self.members)

    def open(self, key):
        """(binary file positioned at the data, shape, dtype, fortran_order) of member `key`, header checked."""
        info = self.members[key]
        try:
            f = self.zip.open(info)
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f'unsupported .npy version {version}')
            size = f.read(2 if version == (1, 0) else 4)   # header length: bounded before the header is read
            if len(size) not in (2, 4) or int.from_bytes(size, 'little') > 10000:
                raise ValueError(f'header of {int.from_bytes(size, "little")} bytes')
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(io.BytesIO(size + f.read(int.from_bytes(size, 'little'))), max_header_size=10000)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f'{self.path}: array {key!r} has a bad .npy header ({error_line(e)})') from None
        if dtype.kind not in 'biuf' or dtype.fields is not None or dtype.subdtype is not None:
            raise ValueError(f'{self.path}: array {key!r} has dtype {dtype} (only plain numbers are accepted)')
        nbytes = math.prod(shape) * dtype.itemsize
        if info.file_size != f.tell() + nbytes:
            raise ValueError(f'{self.path}: array {key!r} declares {list(shape)} {dtype} but its member holds '
                             f'{info.file_size - f.tell()} bytes of data')
        return f, shape, dtype, fortran

    def array(self, key, max_bytes):
        """Member `key` as an array, refused when it would take more than max_bytes."""
        f, shape, dtype, fortran = self.open(key)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > max_bytes:
            raise ValueError(f'{self.path}: array {key!r} of {list(shape)} {dtype} ({nbytes:,} bytes) exceeds the limit '
                             f'of {max_bytes:,} bytes for it')
        return np.frombuffer(self.read(f, nbytes), dtype).reshape(shape, order='F' if fortran else 'C')

    def read(self, f, n):
        """Exactly n bytes of an open member, read in pieces of 1 MiB; corrupt or truncated data (CRC checked at the
        member's end) is a ValueError."""
        out = []
        try:
            while n > 0 and (chunk := f.read(min(n, 1 << 20))):
                n -= len(chunk)
                out.append(chunk)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f'{self.path}: corrupt data ({error_line(e)})') from None
        if n > 0:
            raise ValueError(f'{self.path}: truncated data')
        return b''.join(out)

    def close(self):
        self.zip.close()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

# --- init_kwargs and building networks -------------------------------------------------------------------------
#
# A file's init_kwargs are checked before anything is built: plain values of the right type, within bounds
# (construction must not loop or allocate without end: iDDPMPrecond computes its M noise levels one at a time,
# and model_channels / channel_mult / num_blocks decide the network's size), and only names the constructor
# takes. The network is then built on the meta device and its state_dict names, shapes and dtypes compared with
# the file's before any memory is allocated for it, so its size is what the file really holds.

_KWARG_RULES = {  # name: (kind, lo, hi[, max list length])
    'img_resolution': ('int', 1, 4096), 'img_channels': ('int', 1, 64), 'label_dim': ('int', 0, 100_000),
    'augment_dim': ('int', 0, 1024), 'model_channels': ('int', 1, 4096), 'channel_mult_emb': ('int', 1, 64),
    'channel_mult_noise': ('int', 1, 64), 'num_blocks': ('int', 0, 32), 'M': ('int', 1, 10_000),
    'channel_mult': ('ints', 1, 64, 12), 'attn_resolutions': ('ints', 1, 4096, 16), 'resample_filter': ('taps', 0, 1e6, 16),
    'dropout': ('float', 0, 1), 'label_dropout': ('float', 0, 1), 'use_fp16': ('bool',),
    'model_type': ('str',), 'embedding_type': ('str',), 'encoder_type': ('str',), 'decoder_type': ('str',),
    'sigma_min': ('float', 0, math.inf), 'sigma_max': ('float', 0, math.inf), 'sigma_data': ('float', 1e-12, 1e6),
    'beta_d': ('float', -1e6, 1e6), 'beta_min': ('float', -1e6, 1e6), 'epsilon_t': ('float', 0, 1),
    'C_1': ('float', 0, 1e6), 'C_2': ('float', 0, 1e6), 'eps': ('float', 0, 1e6),
    'num_classes': ('int', 1, 100_000), 'channels': ('ints', 1, 4096, 8),
}


def _check_kwarg(name, v, rule):
    kind, lo, hi, length = (*rule, None, None, None)[:4]
    number = lambda x: type(x) in (int, float) and lo <= x <= hi  # not bool; NaN fails both comparisons
    ok = {'int': lambda: type(v) is int and lo <= v <= hi, 'float': lambda: number(v), 'bool': lambda: type(v) is bool,
          'str': lambda: type(v) is str and len(v) <= 100,
          'ints': lambda: type(v) in (list, tuple) and len(v) <= length and all(type(x) is int and lo <= x <= hi for x in v),
          'taps': lambda: type(v) in (list, tuple) and len(v) <= length and all(map(number, v)) and sum(v) > 0}[kind]()
    if not ok:
        expected = {'int': f'an int in [{lo}, {hi}]', 'float': f'a number in [{lo}, {hi}]', 'bool': 'True or False',
                    'str': 'a string of at most 100 characters', 'ints': f'a list of at most {length} ints in [{lo}, {hi}]',
                    'taps': f'a list of at most {length} non-negative numbers with a positive sum'}[kind]
        raise ValueError(f'init_kwargs {name}={v!r:.60} is not {expected}')


def check_init_kwargs(cls, kwargs):
    """Refuse init_kwargs that cls could not be built from safely (see the comment above). An edm_nets wrapper
    takes its own arguments (those of its class and bases up to edm_nets._Precond) and passes the rest on to
    its U-Net; any other class takes the arguments of its constructor."""
    if type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
        raise ValueError('init_kwargs is not a dict of names')
    def named(params, drop=()):
        return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ('self', *drop)}
    wrapper = issubclass(cls, edm_nets._Precond)
    mro = cls.__mro__[:cls.__mro__.index(edm_nets._Precond)] if wrapper else cls.__mro__[:1]
    own = [inspect.signature(c.__init__).parameters for c in mro if '__init__' in c.__dict__]
    accepted = set().union(*map(named, own))
    if wrapper:
        model_type = kwargs.get('model_type', next((p['model_type'].default for p in own if 'model_type' in p), None))
        if model_type not in edm_nets.UNETS:
            raise ValueError(f'unknown model_type {model_type!r}; supported: {", ".join(edm_nets.UNETS)}')
        unet = inspect.signature(edm_nets.UNETS[model_type].__init__).parameters
        accepted |= named(unet, ('img_resolution', 'in_channels', 'out_channels', 'label_dim'))
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f'unknown init_kwargs for {cls.__name__}{f" with {model_type}" if wrapper else ""}: {", ".join(unknown)}')
    for name, v in kwargs.items():
        if name in _KWARG_RULES:
            _check_kwarg(name, v, _KWARG_RULES[name])
        elif not (v is None or type(v) in (bool, int, float, str) or
                  (type(v) in (list, tuple) and len(v) <= 64 and all(x is None or type(x) in (bool, int, float, str) for x in v))):
            raise ValueError(f'init_kwargs {name} is a {type(v).__name__} (only plain numbers, strings and lists are accepted)')
    if wrapper:
        levels, resolution = len(kwargs.get('channel_mult', unet['channel_mult'].default)), kwargs.get('img_resolution')
        if resolution is not None and resolution % (1 << (levels - 1)):
            raise ValueError(f'init_kwargs img_resolution={resolution} is not divisible by 2^{levels - 1} ({levels} resolution levels)')


def few_names(names, n=3):
    """The first n names, and how many more."""
    return ', '.join(map(str, names[:n])) + (f' (+{len(names) - n} more)' if len(names) > n else '')


def check_tensors(tensors, expected, what):
    """The one check of a dict of tensors from a file against what the code expects (a module's state_dict,
    possibly built on the meta device): the same names, each a plain CPU tensor of the same shape and dtype
    (never cast silently: EDM files store fp32 parameters), and finite values. ValueError('<what>: <problem>')."""
    if not isinstance(tensors, dict):
        raise ValueError(f'{what} is not a dict of tensors')
    missing, unexpected, wrong = [k for k in expected if k not in tensors], [k for k in tensors if k not in expected], []
    for k, v in expected.items():
        t = tensors.get(k)
        if k not in tensors:
            continue
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type != 'cpu':
            wrong.append(f'{k} is a {type(t).__name__}, not a CPU tensor')
        elif t.shape != v.shape or t.dtype != v.dtype:
            wrong.append(f'{k} is {t.dtype} {list(t.shape)} (expected {v.dtype} {list(v.shape)})')
    if missing or unexpected or wrong:
        problems = [f'missing {few_names(missing)}'] * bool(missing) + [f'unexpected {few_names(unexpected)}'] * bool(unexpected)
        raise ValueError(f'{what}: ' + '; '.join(problems + wrong[:3] + [f'(+{len(wrong) - 3} more)'] * (len(wrong) > 3)))
    for k, t in tensors.items():
        if not all_finite(t):
            raise ValueError(f'{what}: {k} holds NaN or inf')


def all_finite(t):
    """No NaN / inf in t. A non-finite value makes the sum non-finite (inf - inf is NaN), and finite weights do not
    sum to 1e38, so the sum decides (many times faster than isfinite(t).all() on a busy machine); only a sum that
    overflows is checked element by element."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32 if t.element_size() < 4 else None))) or bool(torch.isfinite(t).all())


def build_network(class_name, init_kwargs, state_dict=None, classes=None):
    """Construct a network by class name (edm_nets.NETWORKS, extended by `classes`) and strictly load state_dict,
    after check_init_kwargs and, on the meta device, check_tensors. Errors: ValueError (the caller names the file)."""
    known = {**edm_nets.NETWORKS, **(classes or {})}
    if class_name not in known:
        raise ValueError(f'unsupported network class {class_name!r}; supported: {", ".join(sorted(known))}')
    cls = known[class_name]
    check_init_kwargs(cls, init_kwargs)
    if state_dict is None:
        return cls(**init_kwargs)
    try:
        with torch.device('meta'):  # nothing allocated yet; every tensor is then copied from state_dict
            net = cls(**init_kwargs)
    except (TypeError, ValueError, AssertionError, ArithmeticError, LookupError, RuntimeError) as e:
        raise ValueError(f'cannot build {class_name} from its init_kwargs ({type(e).__name__}: {error_line(e)})') from None
    check_tensors(state_dict, net.state_dict(), f'state_dict of {class_name}(**init_kwargs)')
    net = net.to_empty(device='cpu')
    net.load_state_dict(state_dict, strict=True)  # copies, so two networks built from one state_dict never share memory
    return net

# --- safetensors (backbone weights from the Hugging Face hub) ---------------------------------------------------

SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                      'U8': torch.uint8, 'BOOL': torch.bool}
SAFETENSORS_MAX_HEADER = 100 * 2**20   # the format's own limit on the JSON header


def read_safetensors(path):
    """Read a .safetensors file: u64 little-endian header size N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (plus optional __metadata__), then the raw little-endian C-order bytes.
    Checked as the format requires: header within the file and at most 100 MB, no duplicate names, int shapes,
    and the data ranges, sorted, must tile the data section exactly (no overlap, no gap, nothing after)."""
    if sys.byteorder != 'little':
        raise ValueError('reading safetensors needs a little-endian machine')
    with open(path, 'rb') as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(data)
    if len(data) < 8:
        raise ValueError(f'{path}: not a safetensors file (too short)')
    n = int.from_bytes(data[:8], 'little')
    if n > min(len(data) - 8, SAFETENSORS_MAX_HEADER):
        raise ValueError(f'{path}: safetensors header size {n} exceeds the file or the 100 MB limit')

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f'duplicate name {next(k for k in keys if keys.count(k) > 1)!r}')
        return dict(pairs)
    try:
        header = json.loads(bytes(data[8:8 + n]).decode('utf-8'), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f'{path}: safetensors header is not valid JSON ({str(e)[:200]})') from None
    if not isinstance(header, dict):
        raise ValueError(f'{path}: safetensors header is not a JSON object')
    base, entries = 8 + n, []
    for name, info in header.items():
        if name == '__metadata__':
            continue
        ok = isinstance(info, dict) and info.get('dtype') in SAFETENSORS_DTYPES and isinstance(info.get('shape'), list)
        shape, offsets = (info.get('shape'), info.get('data_offsets')) if ok else (None, None)
        ok = ok and len(shape) <= 16 and all(type(s) is int and s >= 0 for s in shape) and isinstance(offsets, list) \
            and len(offsets) == 2 and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]
        if not ok:
            raise ValueError(f'{path}: bad safetensors entry for {name!r:.80}: {str(info)[:200]}')
        dtype = SAFETENSORS_DTYPES[info['dtype']]
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise ValueError(f'{path}: safetensors entry {name!r:.80} has {offsets[1] - offsets[0]} bytes for shape {shape} {info["dtype"]}')
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort()
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            raise ValueError(f'{path}: safetensors data of {name!r:.80} starts at {begin}, expected {pos} '
                             f'({"overlaps the previous tensor" if begin < pos else "a gap"})')
        pos = end
    if pos != len(data) - base:
        raise ValueError(f'{path}: safetensors data section has {len(data) - base} bytes, the header describes {pos}')
    out = {}
    for begin, _, name, dtype, shape in entries:
        numel = math.prod(shape)
        t = torch.frombuffer(data, dtype=dtype, count=numel, offset=base + begin) if numel else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


def read_state_dict(path):
    """Flat name -> tensor dict from a .safetensors file, a TorchScript archive (read_torchscript_tensors) or a
    torch.save'd state dict (load_torch_file). The legacy DeiT release nests it under 'model'."""
    with open(path, 'rb') as f:
        head = f.read(9)
    if str(path).endswith('.safetensors') or (len(head) == 9 and head[8:9] == b'{'):
        return read_safetensors(path)
    if is_zip(path) and is_torchscript(path):
        return read_torchscript_tensors(path)
    sd = load_torch_file(path)
    if isinstance(sd, dict) and isinstance(sd.get('model'), dict):
        sd = sd['model']
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f'{path}: not a state dict (expected a dict of name -> tensor)')
    return sd

# --- TorchScript detectors -------------------------------------------------------------------------------------

TORCHSCRIPT_MAX_CODE = 64 * 2**20  # bytes of (deflated) TorchScript code a detector archive may declare


def is_torchscript(path):
    """Both torch.jit.save and torch.save write zip archives; only TorchScript's holds constants.pkl (and code/)."""
    try:
        with open(path, 'rb') as f, _open_zip(f, os.fstat(f.fileno()).st_size) as z:   # directory size bounded
            return any(n.endswith('/constants.pkl') for n in z.namelist())
    except (_BadFile, zipfile.BadZipFile):
        return True         # torchscript_archive's full check reports it


def torchscript_blobs(data):
    """Every bytes value inside read_pickle data that looks like a zip archive (a torch.jit.save stream); each
    object is visited once (pickle_values), so a pickle of shared children cannot make this hang."""
    return [bytes(v) for v in pickle_values(data) if isinstance(v, (bytes, bytearray)) and bytes(v[:4]) == b'PK\x03\x04']


def torchscript_archive(path, name=None):
    """The TorchScript archive of a detector file, its central directory checked (check_torch_zip): the file
    itself, or the one archive stored inside an EDM / StyleGAN3 pickle (read_pickle: the pickle's Python source is
    never run). torch.jit.load then runs the archive's TorchScript graph: a trusted detector, README."""
    name = name or str(path)
    if is_zip(path):
        archive = path
    else:
        blobs = torchscript_blobs(read_pickle(path))
        if len(blobs) != 1:
            raise ValueError(f'{name}: expected one TorchScript archive inside the pickle, found {len(blobs)} '
                             f'(its Python source is never executed)')
        archive = io.BytesIO(blobs[0])
        archive.name = f'{name} (TorchScript archive inside)'
    check_torch_zip(archive, TORCHSCRIPT_MAX_CODE)
    return archive

# --- TorchScript archives: their tensors, without running them -------------------------------------------------
#
# OpenAI's CLIP release (ViT-B-32.pt) is a TorchScript archive. torch.jit.load would compile and run its code; only
# its weights are needed. The archive's data.pkl pickles the module tree as records of __torch__.* classes whose
# BUILD state holds the attributes (submodules, tensors, plain values); a tensor is a _rebuild_tensor_v2 call on a
# storage in data/KEY, as in torch.save archives.

def read_torchscript_tensors(path):
    """{attribute path: tensor} of every tensor attribute in a TorchScript archive's module tree, named as its
    state_dict names them ('visual.conv1.weight'), without torch.jit.load: nothing in the archive is compiled or run.
    Checked first: the zip directory (_torch_zip; code members may be deflated), data.pkl read by the inert machine
    (objects only records of __torch__.* classes, tensors only _rebuild_tensor_v2 records), every storage member
    holding exactly its declared bytes and its CRC-32; then every view inside its storage, and all tensors together
    no more bytes than the storages. Raises ValueError('<path>: <problem>')."""
    with _refusals(path, 'TorchScript archive'), open(path, 'rb') as f:
        zf, root, storages = _zip_records(f, os.fstat(f.fileno()).st_size, 'a TorchScript archive', TORCHSCRIPT_MAX_CODE)
        # zipfile checks each member's CRC-32 as it reads it
        return _module_tensors(root, {key: (dtype, numel, zf.read(info)) for key, (dtype, numel, info) in storages.items()})


def _module_tensors(root, storages):
    """The tensors of read_torchscript_tensors, in the archive's order; each module record is visited once (a tree)."""
    out, seen, total = {}, set(), [0, sum(numel * dtype.itemsize for dtype, numel, _ in storages.values())]

    def tensor(rec, where):     # _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, metadata])
        args = rec.args
        if not (len(args) in (6, 7) and type(args[0]) is _Call and args[0].func is _PERSISTENT_ID and rec.state is None
                and type(args[4]) is bool and type(args[5]) is dict and not args[5] and args[6:] in ((), (None,), ({},))):
            raise _BadFile(f'malformed tensor record {where}')
        dtype, numel, blob = storages[args[0].args[0][2]]
        _check_view(numel, args[1], args[2], args[3])
        total[0] += math.prod(args[2]) * dtype.itemsize
        if total[0] > total[1]:
            raise _BadFile(f'tensors describe more data ({total[0]} bytes so far) than the archive holds '
                           f'({total[1]} bytes of storages): views share a storage')
        return _copy_view(blob, 0, dtype, numel, args[1], tuple(args[2]), tuple(args[3]))

    def walk(obj, prefix, depth):
        if not (type(obj) is _Call and obj.func.module.startswith('__torch__') and obj.args == () and type(obj.state) is dict):
            raise _BadFile(f'{prefix[:-1] or "the root"} is {_describe(obj)}, not a TorchScript module record')
        if id(obj) in seen or depth > MAX_NESTING:
            raise _BadFile(f'module {prefix[:-1]} appears twice or deeper than {MAX_NESTING} levels')
        seen.add(id(obj))
        for key, value in obj.state.items():
            if type(key) is not str or not key or '.' in key:
                raise _BadFile(f'attribute {key!r:.40} of {prefix[:-1] or "the root"} is not a plain name')
            if type(value) is _Call and value.key() == ('torch._utils', '_rebuild_tensor_v2'):
                out[prefix + key] = tensor(value, prefix + key)
            elif type(value) is _Call:
                walk(value, prefix + key + '.', depth + 1)
            # other attributes (training flags, numbers, lists) hold no weights

    walk(root, '', 0)
    return out

# --- npz: images and reference statistics ----------------------------------------------------------------------

NPZ_IMAGES_MAX_BYTES = 4 * 2**30  # declared size of an image npz (decompressed twice, one image in memory at a time)
REF_MAX_DIM = 4096                # feature dimension D of reference statistics (Inception-v3: 2048)


class NpzImages:
    """uint8 images [N, H, W, C] of an npz (key "images", or "arr_0"), header checked before anything is
    decompressed; image i comes out as [C, H, W]. The member is decompressed front to back as readers ask for
    increasing indices, so memory holds one image whatever the file declares (a 1 MB deflated npz can declare a
    1 GB array); one full pass first verifies the CRC, so a corrupt file is never used."""
    def __init__(self, path):
        self.npz, self.file = NpzFile(path), None
        try:
            self._check(path)
        except BaseException:
            self.npz.close()
            raise

    def _check(self, path):
        self.key = next((k for k in ('images', 'arr_0') if k in self.npz.files), None)
        if self.key is None:
            raise ValueError(f'{path}: no "images" (or "arr_0") array; keys: {", ".join(self.npz.files) or "none"}')
        f, shape, dtype, fortran = self.npz.open(self.key)
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or shape[1] != shape[2] or not 1 <= shape[1] <= 4096 or fortran:
            raise ValueError(f'{path}: images must be uint8 [N, H, W, C] with H == W <= 4096 and C in (1, 3), '
                             f'got {dtype} {list(shape)}')
        if math.prod(shape) > NPZ_IMAGES_MAX_BYTES:
            raise ValueError(f'{path}: {list(shape)} images declare {math.prod(shape):,} bytes, more than the limit of '
                             f'{NPZ_IMAGES_MAX_BYTES:,} (safe_files.NPZ_IMAGES_MAX_BYTES)')
        self.shape, self.size = shape, math.prod(shape[1:])
        for done in range(0, math.prod(shape), 1 << 20):   # CRC check of the whole member, 1 MiB at a time
            self.npz.read(f, min(1 << 20, math.prod(shape) - done))
        f.close()
        self.next = 0

    def close(self):
        if self.file is not None:
            self.file.close()
        self.npz.close()

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


def load_ref(source, mu='mu', sigma='sigma'):
    """(mu, sigma) of a reference npz, path or URL (EDM's: arrays mu and sigma; fid_min.py ref also writes other
    metrics' statistics under other names): float arrays mu [D], sigma [D, D] with D <= REF_MAX_DIM, checked from
    their headers before anything is decompressed, and finite (FID of NaN statistics is no result)."""
    if not str(source).split('?')[0].lower().endswith('.npz'):
        raise ValueError(f'{source}: reference statistics must be an .npz file (arrays mu and sigma, as EDM publishes)')
    path = open_url(source)
    with NpzFile(path) as f:
        if mu not in f.files or sigma not in f.files:
            raise ValueError(f'{source}: reference statistics need arrays {mu} and {sigma}; keys: {", ".join(f.files) or "none"}')
        (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = (f.open(k)[1:3] for k in (mu, sigma))
        d = mu_shape[0] if len(mu_shape) == 1 else -1
        if not 1 <= d <= REF_MAX_DIM or tuple(sigma_shape) != (d, d) or mu_dtype.kind != 'f' or sigma_dtype.kind != 'f':
            raise ValueError(f'{source}: {mu} must be float [D] and {sigma} float [D, D] with D <= {REF_MAX_DIM}, '
                             f'got {mu_dtype} {list(mu_shape)} and {sigma_dtype} {list(sigma_shape)}')
        m, s = f.array(mu, 8 * d).astype(np.float64), f.array(sigma, 8 * d * d).astype(np.float64)
    if not (np.isfinite(m).all() and np.isfinite(s).all()):
        raise ValueError(f'{source}: {mu} or {sigma} contains NaN or inf')
    return m, s


REF_FEATURES_MAX_BYTES = 8 * 2**30  # features of a reference npz (precision / recall: 50,000 x 2048 float32 = 0.4 GB)


def load_ref_features(source, key):
    """Features float32 [N, D] (N >= 2, D <= REF_MAX_DIM) stored under `key` in a reference npz, path or URL, checked
    from the header before anything is decompressed (at most REF_FEATURES_MAX_BYTES), and finite."""
    path = open_url(source)
    with NpzFile(path) as f:
        if key not in f.files:
            raise ValueError(f'{source}: no array {key}; keys: {", ".join(f.files) or "none"}')
        shape, dtype = f.open(key)[1:3]
        if len(shape) != 2 or shape[0] < 2 or not 1 <= shape[1] <= REF_MAX_DIM or dtype.kind != 'f':
            raise ValueError(f'{source}: {key} must be float [N, D] with N >= 2 and D <= {REF_MAX_DIM}, got {dtype} {list(shape)}')
        features = f.array(key, REF_FEATURES_MAX_BYTES).astype(np.float32)
    if not np.isfinite(features).all():
        raise ValueError(f'{source}: {key} contains NaN or inf')
    return features

# --- Downloads ------------------------------------------------------------------------------------------------

def is_url(source):
    """Whether a file argument names an http(s) download rather than a local path."""
    return re.match(r'^https?://', str(source)) is not None


def open_url(source, cache_dir=None):
    """Local path as is, or an http(s) URL downloaded once into the cache ($GDD_CACHE, else ~/.cache/gdd-min),
    with progress on stderr and an atomic rename (a cut download is never used)."""
    source = str(source)
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f'no such file: {source}')
        return path
    cache_dir = Path(cache_dir or os.environ.get('GDD_CACHE') or Path.home() / '.cache' / 'gdd-min')
    base = re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(urllib.parse.urlparse(source).path)) or 'download'
    path = cache_dir / f'{hashlib.sha256(source.encode()).hexdigest()[:16]}_{base}'
    if path.is_file():
        return path
    try:
        r = urllib.request.urlopen(source, timeout=60)
    except (OSError, ValueError) as e:   # URLError, HTTPError and timeouts are OSErrors
        reason = error_line(getattr(e, 'reason', None) or e)
        raise OSError(f'could not download {source} ({reason}); download it elsewhere and pass the local path') from None

    def download(f):
        total, done = int(r.headers.get('Content-Length') or 0), 0
        while chunk := r.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            print(f'\rdownloading {base}: {done / 2**20:.1f}' + (f' / {total / 2**20:.1f}' if total else '') + ' MiB',
                  end='', file=sys.stderr, flush=True)
        print(file=sys.stderr)
        if total and done != total:
            raise OSError(f'download of {source} incomplete ({done} of {total} bytes)')
    with r:
        cli.atomic_write(path, download)
    return path


def is_zip(path):
    """A zip archive (torch.save / torch.jit.save), told by its first bytes: zipfile.is_zipfile also accepts a
    pickle that merely holds an archive near its end."""
    with open(path, 'rb') as f:
        return f.read(4) == b'PK\x03\x04'

# --- Networks: gdd-min checkpoints, EDM and D2O pickles ---------------------------------------------------------

CHECKPOINT_FORMAT = 'gdd-min'


def net_to_dict(net):
    """Plain-data description of a network with init_kwargs (loadable with torch.load(weights_only=True))."""
    return {'class_name': type(net).__name__, 'init_kwargs': copy.deepcopy(net.init_kwargs),
            'state_dict': {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}


def save_torch(obj, path, also=''):
    """torch.save through the one atomic writer (cli.atomic_write): never a half-written file. A Ctrl-C or SIGTERM
    waits until the file is written (torch's writer would turn it into a RuntimeError). also: a second path that
    gets the same file (--export)."""
    with cli.deferred_signals():
        for p in [path] + ([also] if also else []):
            cli.atomic_write(p, lambda f: torch.save(obj, f))


def save_checkpoint(net, cfg, path):
    """A network as a gdd-min checkpoint {'format', 'ema': net_to_dict, 'config'} at path and at cfg.export
    (load_network reads it)."""
    save_torch({'format': CHECKPOINT_FORMAT, 'ema': net_to_dict(net), 'config': vars(cfg)}, path, cfg.export)
    print(f'Saved {path}' + (f' and {cfg.export}' if cfg.export else ''))


def _checkpoint_entry(ckpt, key):
    """(class_name, init_kwargs, state_dict) of entry `key` of a gdd-min checkpoint {'format', key: net_to_dict}."""
    if not isinstance(ckpt, dict) or ckpt.get('format') != CHECKPOINT_FORMAT:
        raise ValueError('a torch archive, but not a gdd-min checkpoint')
    if key not in ckpt:
        raise ValueError(f'no {key!r} entry (has: {", ".join(map(str, list(ckpt)[:10]))})')
    d = ckpt[key]
    if not (isinstance(d, dict) and type(d.get('class_name')) is str and isinstance(d.get('init_kwargs'), dict)
            and isinstance(d.get('state_dict'), dict)):
        raise ValueError(f'entry {key!r} is not a network (class_name, init_kwargs, state_dict)')
    return d['class_name'], dict(d['init_kwargs']), d['state_dict']


def _pickle_entry(data, key):
    """(class_name, init_kwargs, state_dict) of the network `key` of an EDM-format pickle. The official GDD / D2O
    release's wrapper D2OPrecond (Zyriix/D2O training/networks.py:533-582) is EDM's preconditioning with the
    eps = 0.002 boundary around a U-Net child 'model': it becomes a GDDPrecond, whose state_dict names are the same."""
    obj = data.get(key) if isinstance(data, dict) else None
    if not isinstance(obj, Persistent):
        raise ValueError(f'no network under key {key!r}')
    if obj.init_args:
        raise ValueError('positional init_args (EDM passes every constructor argument by name)')
    state_dict = persistent_state_dict(obj)     # also checks the module tree's structure
    if obj.class_name != 'D2OPrecond':
        return obj.class_name, obj.init_kwargs, state_dict
    model = obj.state['_modules'].get('model')
    if not isinstance(model, Persistent):
        raise ValueError('D2OPrecond without a U-Net child "model"')
    attr = lambda k, default=None: obj.state.get(k, obj.init_kwargs.get(k, default))
    unet_kwargs = {k: v for k, v in model.init_kwargs.items() if k not in ('img_resolution', 'in_channels', 'out_channels', 'label_dim')}
    return 'GDDPrecond', dict(img_resolution=attr('img_resolution'), img_channels=attr('img_channels'),
                              label_dim=attr('label_dim', 0), use_fp16=bool(attr('use_fp16', False)),
                              sigma_data=attr('sigma_data', 0.5), model_type=model.class_name, **unet_kwargs), state_dict


def load_network(source, key='ema', classes=None, device='cpu'):
    """The one loading path for networks: an official EDM pickle, an official GDD / D2O release pickle (its
    D2OPrecond rebuilt as GDDPrecond, which `classes` must then name) or a gdd-min checkpoint, in eval mode, every
    part of the file validated first (see the module docstring). source: local path or http(s) URL; key: the
    file's entry ('ema', or 'net'); classes: {class name: class} beyond edm_nets.NETWORKS."""
    path = open_url(source)
    data = load_torch_file(path) if is_zip(path) else read_pickle(path)
    try:
        class_name, init_kwargs, state_dict = (_checkpoint_entry if is_zip(path) else _pickle_entry)(data, key)
        if class_name == 'GDDPrecond' and 'GDDPrecond' not in (classes or {}):
            raise ValueError('a GDD / D2O generator: load it with sample_min.load_generator (classes={"GDDPrecond": gdd.GDDPrecond})')
        net = build_network(class_name, init_kwargs, state_dict, classes)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    return net.eval().to(device)
