"""edm_nets: equivalence with EDM's reference outputs, checkpoint layouts, safe loading, sampler, bf16 path."""

import functools
import http.server
import io
import json
import math
import os
import pickle
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import edm_nets  # noqa: E402
from edm_pickle import dump_edm_pickle  # noqa: E402
import safe_files  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'edm'
NET_FIXTURES = sorted(p.name for p in FIXTURES.glob('*.pt') if p.name.startswith(('tiny_', 'seeded_')))
PARAM_SHAPES = json.loads((FIXTURES / 'param_shapes.json').read_text())['configs']
LAYERS = torch.load(FIXTURES / 'layers.pt', weights_only=True)


def load_fixture(name):
    return torch.load(FIXTURES / name, weights_only=True)


def recipe_state_dict(weight_seed, weight_spec, fixed):
    """Fixture weight recipe (manifest.json): entry k = offset + amplitude * (2u - 1), u ~ RandomState([seed, k])."""
    sd = {}
    for k, (name, shape, offset, amplitude) in enumerate(weight_spec):
        if amplitude is None:
            sd[name] = fixed[name]  # EDM's deterministic buffers (resample filters, iDDPM's u)
            continue
        u = np.random.RandomState([weight_seed, k]).random_sample(int(np.prod(shape)))
        sd[name] = torch.from_numpy((offset + amplitude * (2.0 * u - 1.0)).astype(np.float32).reshape(shape))
    return sd


def check_recipe(d, fixed):
    sd = recipe_state_dict(d['weight_seed'], d['weight_spec'], fixed)
    sums = [sd[name].double().sum().item() for name, *_ in d['weight_spec']]
    np.testing.assert_allclose(sums, d['weight_checksums'], rtol=1e-9, atol=1e-9)
    return sd


def check_wrapper_attrs(net, attrs):
    # Floats to 1e-6: iDDPM's sigma_max ends a 1000-step float32 recursion of sin and sqrt, whose last bit
    # depends on the CPU's vector math (1 ulp from EDM's value on an AMD EPYC).
    for attr, value in attrs.items():
        assert (math.isclose(getattr(net, attr), value, rel_tol=1e-6) if type(value) is float
                else getattr(net, attr) == value), attr


def tiny_net(name, **overrides):
    d = load_fixture(name)
    return safe_files.build_network(d['precond'], {**d['kwargs'], **overrides}, d['state_dict']).eval(), d

# ----------------------------------------------------------------------------------------------------------------
# Numerical equivalence with EDM.

@pytest.mark.parametrize('case', [k for k in LAYERS if k != 'description'])
def test_layer_matches_edm(case):
    c = LAYERS[case]
    layer = getattr(edm_nets, c['class'])(**c['kwargs']).eval()
    layer.load_state_dict(c['state_dict'], strict=True)
    assert [n for n, *_ in c['weight_spec']] == list(layer.state_dict())
    for attr, value in c['attrs'].items():
        assert getattr(layer, attr) == value
    with torch.no_grad():
        out = layer(*c['inputs'].values())
    assert out.dtype == torch.float32 and out.shape == c['out'].shape
    assert (out - c['out']).abs().max().item() <= 1e-5


@pytest.mark.parametrize('name', NET_FIXTURES)
def test_network_matches_edm(name):
    d = load_fixture(name)
    if 'state_dict' in d:
        sd = d['state_dict']
        recipe = check_recipe(d, sd)
        assert all(torch.equal(recipe[k], sd[k]) for k in sd)
    else:
        sd = check_recipe(d, d['fixed_buffers'])
    net = safe_files.build_network(d['precond'], d['kwargs'], sd).eval()
    assert type(net.model).__name__ == d['inner_model_class']
    check_wrapper_attrs(net, d['wrapper_attrs'])

    # Capture what the wrapper hands to the U-Net and the embedding seen by the first block.
    seen = {}
    net.model.register_forward_hook(lambda m, args, out: seen.update(model_in=args[0], noise=args[1], model_out=out))
    first_block = next(m for m in net.model.enc.values() if isinstance(m, edm_nets.UNetBlock))
    first_block.register_forward_pre_hook(lambda m, args: seen.update(emb=args[1]))

    x, sigma, labels = d['x'], d['sigma'], d['class_labels']
    out_tol = 1e-4 * max(1.0, sigma.max().item())  # manifest "tolerance"
    with torch.no_grad():
        out = net(x, sigma, labels)
        assert out.dtype == torch.float32
        assert (out - d['out']).abs().max().item() <= out_tol
        assert (seen['model_out'] - d['model_out']).abs().max().item() <= 1e-4
        assert (seen['noise'] - d['model_noise_labels']).abs().max().item() <= 1e-6
        assert (seen['emb'] - d['emb']).abs().max().item() <= 1e-5
        if 'model_in' in d:
            assert (seen['model_in'] - d['model_in']).abs().max().item() <= 1e-6
        if 'out_augment' in d:
            out = net(x, sigma, labels, augment_labels=d['augment_labels'])
            assert (out - d['out_augment']).abs().max().item() <= out_tol
            assert (seen['emb'] - d['emb_augment']).abs().max().item() <= 1e-5
            if 'model_out_augment' in d:
                assert (seen['model_out'] - d['model_out_augment']).abs().max().item() <= 1e-4
        if 'out_class_labels_none' in d:
            out = net(x, sigma, None)
            assert (out - d['out_class_labels_none']).abs().max().item() <= out_tol


def test_train_mode_without_dropout_equals_eval():
    net, d = tiny_net('tiny_songunet_ncsnpp_cond_aug.pt', dropout=0)
    with torch.no_grad():
        out = net.train()(d['x'], d['sigma'], d['class_labels'])
    assert (out - d['out']).abs().max().item() <= 1e-4

# ----------------------------------------------------------------------------------------------------------------
# Layout of every official checkpoint (built on the meta device: names and shapes only).

@pytest.mark.parametrize('config', list(PARAM_SHAPES))
def test_official_state_dict_layout(config):
    c = PARAM_SHAPES[config]
    with torch.device('meta'):
        net = edm_nets.NETWORKS[c['precond']](**c['kwargs'])
    params = dict(net.named_parameters())
    layout = [[name, list(t.shape), 'param' if name in params else 'buffer'] for name, t in net.state_dict().items()]
    assert layout == c['state_dict']
    assert sum(p.numel() for p in params.values()) == c['num_params']
    assert [[n, type(m).__name__] for n, m in net.named_modules() if n] == c['module_classes']
    check_wrapper_attrs(net, c['wrapper_attrs'])
    with torch.device('meta'):  # init_kwargs rebuild the same network; strict load accepts the state_dict
        rebuilt = type(net)(**net.init_kwargs)
    rebuilt.load_state_dict(net.state_dict(), strict=True, assign=True)

# ----------------------------------------------------------------------------------------------------------------
# Loading files: EDM pickles (safe reader), project checkpoints, URLs, hostile and broken files.

def edm_pickle_bytes(net, **kwargs):
    buf = io.BytesIO()
    dump_edm_pickle({'ema': net.requires_grad_(False), 'loss_fn': None, 'augment_pipe': None,
                     'dataset_kwargs': {'path': 'cifar10-32x32.zip', 'use_labels': True, 'xflip': False}}, buf, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize('name', ['tiny_songunet_ncsnpp_cond_aug.pt', 'tiny_songunet_skip_uncond.pt',
                                  'tiny_dhariwal_cond.pt', 'tiny_iddpm_dhariwal_cond.pt', 'tiny_vp_songunet_ddpmpp_uncond.pt'])
def test_edm_pickle_loads_into_our_classes(name, tmp_path):
    net, d = tiny_net(name)
    path = tmp_path / 'network-snapshot.pkl'
    path.write_bytes(edm_pickle_bytes(net))
    loaded = safe_files.load_network(path)
    assert type(loaded) is type(net) and not loaded.training
    assert 'torch_utils' not in sys.modules  # EDM's code was neither needed nor imported
    with torch.no_grad():
        assert torch.equal(loaded(d['x'], d['sigma'], d['class_labels']), net(d['x'], d['sigma'], d['class_labels']))
    data = safe_files.read_pickle(path)
    assert data['dataset_kwargs']['use_labels'] is True and data['loss_fn'] is None
    assert list(safe_files.persistent_state_dict(data['ema'])) == list(net.state_dict())


def test_pickle_numpy_scalars_and_custom_class(tmp_path):
    net, d = tiny_net('tiny_songunet_ddpmpp_uncond.pt')
    path = tmp_path / 'custom.pkl'
    path.write_bytes(edm_pickle_bytes(net, class_name='CustomPrecond', extra_init_kwargs={'eps': np.float64(0.002)}))
    data = safe_files.read_pickle(path)
    assert data['ema'].class_name == 'CustomPrecond' and data['ema'].init_kwargs['eps'] == 0.002
    assert type(data['ema'].init_kwargs['eps']) is float  # numpy scalars come back as plain floats
    block = data['ema'].state['_modules']['model'].state['_modules']['enc'].state['_modules']['16x16_block0']
    assert block.state['skip_scale'] == np.sqrt(0.5)
    with pytest.raises(ValueError, match='unsupported network class .CustomPrecond.*EDMPrecond'):
        safe_files.load_network(path)

    class CustomPrecond(edm_nets.EDMPrecond):
        def __init__(self, eps, **kwargs):
            super().__init__(**kwargs)

    loaded = safe_files.load_network(path, classes={'CustomPrecond': CustomPrecond})
    with torch.no_grad():
        assert torch.equal(loaded(d['x'], d['sigma']), net(d['x'], d['sigma']))


class _Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize('attack', ['os.system', 'builtins.eval', 'nested'])
def test_hostile_pickle_is_refused(attack, tmp_path):
    marker = tmp_path / 'pwned'
    if attack == 'os.system':
        payload = _Payload(os.system, f'touch {marker}')
    else:
        payload = _Payload(eval, f'open({str(marker)!r}, "w").close()')
    if attack == 'nested':  # a valid EDM network pickle with the payload hidden among the plain data
        net, _ = tiny_net('tiny_songunet_ddpmpp_uncond.pt')
        buf = io.BytesIO()
        dump_edm_pickle({'ema': net, 'loss_fn': None, 'augment_pipe': None, 'dataset_kwargs': {'path': payload}}, buf)
        blob = buf.getvalue()
    else:
        blob = pickle.dumps({'ema': payload})
    path = tmp_path / 'evil.pkl'
    path.write_bytes(blob)
    with pytest.raises(safe_files.UnsafePickleError, match='refusing to load global (posix.system|builtins.eval)'):
        safe_files.load_network(path)
    assert not marker.exists()
    if attack != 'nested':
        pickle.loads(blob)  # the payload is real: an ordinary unpickler runs it
        assert marker.exists()


def test_hostile_storage_blob_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    evil_blob = pickle.dumps(_Payload(os.system, f'touch {marker}'), protocol=2)
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(_Payload(torch.storage._load_from_bytes, evil_blob)))
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        safe_files.read_pickle(path)
    assert not marker.exists()


def test_broken_files_give_clear_errors(tmp_path):
    net, _ = tiny_net('tiny_songunet_ddpmpp_uncond.pt')
    blob = edm_pickle_bytes(net)
    (tmp_path / 'truncated.pkl').write_bytes(blob[:len(blob) // 2])
    (tmp_path / 'text.pkl').write_text('this is not a pickle\n')
    for name in ['truncated.pkl', 'text.pkl']:
        with pytest.raises(ValueError, match='not a readable EDM network pickle'):
            safe_files.load_network(tmp_path / name)
    with pytest.raises(FileNotFoundError, match='no such file'):
        safe_files.load_network(tmp_path / 'missing.pkl')
    torch.save({'weights': torch.zeros(2)}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match='not a gdd-min checkpoint'):
        safe_files.load_network(tmp_path / 'other.pt')
    (tmp_path / 'data.pkl').write_bytes(pickle.dumps({'ema': [1, 2]}))
    with pytest.raises(ValueError, match="no network under key 'ema'"):
        safe_files.load_network(tmp_path / 'data.pkl')


def test_project_checkpoint_round_trip(tmp_path):
    net, d = tiny_net('tiny_iddpm_dhariwal_cond.pt')
    path = tmp_path / 'ckpt.pt'
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(net), 'config': {'lr': 1e-4}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pt']
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['ema']['class_name'] == 'iDDPMPrecond' and ckpt['config'] == {'lr': 1e-4}
    loaded = safe_files.load_network(path)
    assert type(loaded) is edm_nets.iDDPMPrecond and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(d['x'], d['sigma'], d['class_labels']), net(d['x'], d['sigma'], d['class_labels']))
    with pytest.raises(ValueError, match="no 'net' entry"):
        safe_files.load_network(path, key='net')


def test_load_network_from_url_is_cached(tmp_path, monkeypatch):
    net, d = tiny_net('tiny_songunet_ddpmpp_uncond.pt')
    served = tmp_path / 'served'
    served.mkdir()
    (served / 'edm-tiny.pkl').write_bytes(edm_pickle_bytes(net))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv('GDD_CACHE', str(tmp_path / 'cache'))
    url = f'http://127.0.0.1:{server.server_address[1]}/edm-tiny.pkl'
    try:
        first = safe_files.load_network(url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    second = safe_files.load_network(url)  # server is gone: must come from the cache
    cached = list((tmp_path / 'cache').iterdir())
    assert len(cached) == 1 and cached[0].name.endswith('edm-tiny.pkl') and safe_files.open_url(url) == cached[0]
    with torch.no_grad():
        want = net(d['x'], d['sigma'])
        assert torch.equal(first(d['x'], d['sigma']), want) and torch.equal(second(d['x'], d['sigma']), want)

# ----------------------------------------------------------------------------------------------------------------
# Sampler.

def test_edm_sampler_matches_edm():
    s = load_fixture('sampler_heun.pt')
    net, _ = tiny_net(s['network_fixture'])
    for n, ref in s['t_steps'].items():
        assert edm_nets.sigma_steps(int(n)).tolist() + [0.0] == ref
    calls = []
    net.register_forward_pre_hook(lambda m, args: calls.append(float(args[1])))

    r = s['deterministic']
    images = edm_nets.edm_sampler(net, s['latents'], r['class_labels'], **r['kwargs'])
    assert images.dtype == torch.float64 and calls == r['sigma_calls'] and len(calls) == r['num_network_calls']
    assert (images - r['images']).abs().max().item() <= 1e-5   # float32 network: CPU kernels differ across torch releases
    again = edm_nets.edm_sampler(net, s['latents'], r['class_labels'], **r['kwargs'])
    assert torch.equal(images, again)  # deterministic for fixed latents

    r = s['stochastic']
    calls.clear()
    noise = iter(r['noise'])  # EDM's randn_like draws, in call order
    images = edm_nets.edm_sampler(net, s['latents'], r['class_labels'], randn_like=lambda x: next(noise), **r['kwargs'])
    assert calls == r['sigma_calls'] and len(calls) == r['num_network_calls']
    assert (images - r['images']).abs().max().item() <= 1e-5   # float32 network: CPU kernels differ across torch releases

# ----------------------------------------------------------------------------------------------------------------
# Mixed precision (README quirk 11): exercised on CPU by adding 'cpu' to the reduced-precision device types.

@pytest.mark.parametrize('name', ['tiny_songunet_ncsnpp_cond_aug.pt', 'seeded_tiny_dhariwal_attn_cond.pt'])
def test_bf16_path(name, monkeypatch):
    d = load_fixture(name)
    sd = d.get('state_dict') or recipe_state_dict(d['weight_seed'], d['weight_spec'], d['fixed_buffers'])
    net = safe_files.build_network(d['precond'], {**d['kwargs'], 'use_fp16': True}, sd).eval()
    x, sigma, labels = d['x'], d['sigma'], d['class_labels']
    fp32_out = safe_files.build_network(d['precond'], {**d['kwargs'], 'use_fp16': False}, sd).eval()(x, sigma, labels).detach()
    assert torch.equal(net(x, sigma, labels).detach(), fp32_out)  # on CPU use_fp16 changes nothing

    monkeypatch.setattr(edm_nets, '_REDUCED_PRECISION_DEVICES', {'cuda', 'cpu'})
    dtypes = {}
    def record(kind):
        return lambda m, args, out: dtypes.setdefault(kind, set()).add((args[0].dtype, out.dtype))
    for m in net.modules():
        if isinstance(m, edm_nets.UNetBlock):
            m.affine.register_forward_hook(record('affine'))
            m.norm1.register_forward_hook(record('norm'))
            m.conv0.register_forward_hook(record('conv'))
    net.model.map_layer0.register_forward_hook(record('mapping'))
    net.model.register_forward_hook(record('unet'))

    out = net(x, sigma, labels)
    fp32, bf16 = torch.float32, torch.bfloat16
    assert dtypes == {'affine': {(fp32, fp32)}, 'mapping': {(fp32, fp32)}, 'norm': {(bf16, bf16)},
                      'conv': {(bf16, bf16)}, 'unet': {(bf16, bf16)}}
    assert out.dtype == fp32
    err = (out.detach() - d['out']).abs().max().item()
    assert 0 < err <= 0.05 * d['out'].abs().max().item()  # bf16 has an 8-bit mantissa
    out.square().mean().backward()  # gradients reach the fp32 master weights, in fp32
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and g.dtype == fp32 for n, g in grads.items() if 'map_augment' not in n)
    assert all(p.dtype == fp32 for p in net.parameters())
    assert torch.equal(net(x, sigma, labels, force_fp32=True).detach(), fp32_out)


def test_networks_built_from_one_state_dict_do_not_share_memory():
    d = load_fixture('tiny_dhariwal_cond.pt')
    a = safe_files.build_network(d['precond'], d['kwargs'], d['state_dict'])
    b = safe_files.build_network(d['precond'], d['kwargs'], d['state_dict'])
    with torch.no_grad():
        a.model.out_conv.weight.add_(1)
    assert torch.equal(b.model.out_conv.weight, d['state_dict']['model.out_conv.weight'])
    assert all(p.requires_grad for p in a.parameters())  # ready for fine-tuning; eval/no-grad is the caller's choice


def test_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    # Nothing listens on port 1 of the loopback address: the connection is refused at once.
    monkeypatch.setenv('GDD_CACHE', str(tmp_path))
    url = 'http://127.0.0.1:1/edm-cifar10-32x32-uncond-ve.pkl'
    with pytest.raises(OSError) as e:
        safe_files.load_network(url)
    msg = str(e.value)
    assert '\n' not in msg and url in msg and 'local path' in msg
    assert not list(tmp_path.iterdir())           # no partial file left in the cache
