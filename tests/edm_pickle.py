"""Test helper: write networks in EDM's persistence pickle format without EDM's code.

dump_edm_pickle(obj, file) pickles `obj` (typically {'ema': net, 'loss_fn': None, 'augment_pipe': None,
'dataset_kwargs': {...}}) the way EDM's training loop does: every module of the network tree becomes a call
torch_utils.persistence._reconstruct_persistent_obj(meta) with meta = {type, version, module_src, class_name,
state}; ModuleDict containers, Parameters, tensors (storages via torch.storage._load_from_bytes) and numpy
float64 scalars use the ordinary pickle reductions, exactly as in the official files (edm-formats.md, section a).
Writing needs a module named torch_utils.persistence, so a stand-in is registered in sys.modules while dumping.
"""

import contextlib
import pickle
import sys
import types

import numpy as np
import torch

DUMMY_MODULE_SRC = '# EDM module source would be embedded here; a safe reader never executes it.\n'


def _reconstruct_persistent_obj(meta):  # never called: only its name is written into the stream
    raise RuntimeError('stand-in used for writing only')


@contextlib.contextmanager
def _stand_in_persistence_module():
    saved = {name: sys.modules.get(name) for name in ['torch_utils', 'torch_utils.persistence']}
    package = types.ModuleType('torch_utils')
    module = types.ModuleType('torch_utils.persistence')
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    sys.modules.update({'torch_utils': package, 'torch_utils.persistence': module})
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


class _EDMPickler(pickle.Pickler):
    def __init__(self, file, root, class_name, extra_init_kwargs, module_src):
        super().__init__(file, protocol=4)
        self.root, self.class_name, self.extra_init_kwargs, self.module_src = root, class_name, extra_init_kwargs, module_src

    def reducer_override(self, obj):
        if not isinstance(obj, torch.nn.Module) or type(obj) is torch.nn.ModuleDict:
            return NotImplemented  # ModuleDict, tensors, dicts...: default pickling, as in EDM's files
        state = dict(obj.__dict__)
        init_kwargs = state.pop('init_kwargs', {})
        if obj is self.root:
            init_kwargs = {**init_kwargs, **self.extra_init_kwargs}
        state['_init_args'] = ()
        state['_init_kwargs'] = init_kwargs
        if isinstance(state.get('skip_scale'), float):
            state['skip_scale'] = np.float64(state['skip_scale'])  # EDM stores np.sqrt(0.5) here
        meta = dict(type='class', version=6, module_src=self.module_src,
                    class_name=self.class_name if obj is self.root and self.class_name else type(obj).__name__, state=state)
        return _reconstruct_persistent_obj, (meta,)


def dump_edm_pickle(obj, file, root=None, class_name=None, extra_init_kwargs=None, module_src=DUMMY_MODULE_SRC):
    """Write `obj` in EDM's pickle format. root: the network whose record gets `class_name` (e.g. 'D2OPrecond')
    and `extra_init_kwargs` merged into its init kwargs (default: obj['ema'] when obj is a dict)."""
    if root is None and isinstance(obj, dict):
        root = obj.get('ema')
    with _stand_in_persistence_module():
        if isinstance(file, (str, bytes)) or hasattr(file, '__fspath__'):
            with open(file, 'wb') as f:
                _EDMPickler(f, root, class_name, extra_init_kwargs or {}, module_src).dump(obj)
        else:
            _EDMPickler(file, root, class_name, extra_init_kwargs or {}, module_src).dump(obj)
