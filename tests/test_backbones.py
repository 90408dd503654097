"""Backbones: names/shapes of the released state dicts, fingerprints of tests/fixtures/backbones (README there),
preprocessing, freezing, double backward and the weight loader (torch files and safetensors)."""

import hashlib
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones as B  # noqa: E402
import safe_files  # noqa: E402

FIX = Path(__file__).parent / 'fixtures' / 'backbones'
INPUT_SHA256 = 'cee44964ae43266e33f6c1212b2adffc1b598399b06a23cfc172ffc77950e511'


def facts(name):
    return json.loads((FIX / f'{name}.json').read_text())


def reference(name):
    return torch.load(FIX / f'{name}_reference.pt', weights_only=True)


def reference_input():
    # reference_input.pt is not copied: it is this tensor (fixture README section 3), checked by its hash.
    x = torch.randn((2, 3, 224, 224), generator=torch.Generator().manual_seed(12345))
    assert hashlib.sha256(x.numpy().astype('<f4').tobytes()).hexdigest() == INPUT_SHA256
    return x


def fingerprint_error(y, fp):
    """max(|sample error|, |mean error|, |std error|) / reference std (fixture README section 4)."""
    assert list(y.shape) == list(fp['shape'])
    y = y.detach().double().flatten()
    n = y.numel()
    k = min(2000, n)
    idx = fp.get('sample_index', torch.arange(k) * n // k)
    err = max((y[idx] - fp['sample']).abs().max().item(), abs(y.mean().item() - fp['mean']), abs(y.std().item() - fp['std']))
    return err / fp['std']


@pytest.fixture(scope='module', params=B.BACKBONES)
def full_net(request):
    """Full model (with classifier head), every tensor filled by the fixture rule, incl. DeiT's post layers."""
    net = B.build_backbone(request.param, classifier=True)
    B.fill_deterministic_(net)
    return request.param, net


def test_state_dict_names_and_shapes(full_net):
    name, net = full_net
    f = facts(name)
    sd = net.state_dict()
    pretrained = [(k, list(v.shape), str(v.dtype).replace('torch.', '')) for k, v in sd.items() if net.is_pretrained_key(k)]
    assert pretrained == [(e['key'], e['shape'], e['dtype']) for e in f['state_dict']]
    params = dict(net.named_parameters())
    assert sum(p.numel() for k, p in params.items() if net.is_pretrained_key(k)) == f['num_parameter_elements']
    assert {k for k in params if net.is_pretrained_key(k)} == {e['key'] for e in f['state_dict'] if e['kind'] == 'parameter'}
    extra = [(k, list(v.shape)) for k, v in sd.items() if not net.is_pretrained_key(k)]
    assert extra == [(e['key'], e['shape']) for e in f.get('projector_only_layers', {}).get('state_dict', [])]
    # Without the classifier, exactly the keys the taps use remain (plus DeiT's post-processing layers).
    lean = B.build_backbone(name)
    assert [k for k in lean.state_dict() if lean.is_pretrained_key(k)] == f['tapped_feature_extractor']['keys_used']
    assert [k for k, _ in extra] == [k for k in lean.state_dict() if not lean.is_pretrained_key(k)]


def test_fill_matches_fixture(full_net):
    name, net = full_net
    ref = reference(name)
    sd = net.state_dict()
    checks = {**ref['fill']['check'], **ref.get('projector_fill_check', {})}
    assert set(checks) == set(sd)
    for k, c in checks.items():
        v = sd[k].double().flatten()
        mine = torch.stack([v.sum(), v.abs().sum(), v[0], v[-1]])
        assert torch.allclose(mine, c, rtol=1e-9, atol=1e-9), k


def test_fingerprints_float32(full_net):
    """The issue's criterion: every fingerprint within 1e-4 x std in float32 (timm/torchvision reach ~6e-6)."""
    name, net = full_net
    ref, x = reference(name), reference_input()
    inter, modules = {}, dict(net.named_modules())
    hooks = [modules[k].register_forward_hook(lambda m, i, o, k=k: inter.__setitem__(k, o)) for k in ref['intermediates']]
    with torch.no_grad():
        errors = [fingerprint_error(y, fp) for y, fp in zip(net.taps(x), ref['taps'])]
        for h in hooks:
            h.remove()
        errors += [fingerprint_error(inter[k], fp) for k, fp in ref['intermediates'].items()]
        errors.append(fingerprint_error(net.logits(x), ref['logits']))
        if name == 'deit_base_distilled_patch16_224':
            errors += [fingerprint_error(y, fp) for y, fp in zip(net.tokens(x), ref['tokens'])]
        if name == 'tf_efficientnet_lite0':   # ReLU6 clipping exercised (fixture README section 4)
            amp = ref['high_amplitude']
            xa = x * amp['input_scale']
            errors += [fingerprint_error(y, fp) for y, fp in zip(net.taps(xa), amp['taps'])]
            errors.append(fingerprint_error(net.logits(xa), amp['logits']))
    print(f'{name}: max float32 fingerprint error {max(errors):.2e} x std over {len(errors)} fingerprints')
    assert max(errors) <= 1e-4


def test_deit_float64_tight():
    """Float64 at 1e-6 x std sees what float32 at 1e-4 cannot (e.g. LayerNorm eps 1e-5 vs 1e-6, README section 5)."""
    name = 'deit_base_distilled_patch16_224'
    net = B.build_backbone(name)
    B.fill_deterministic_(net)
    net = net.double()
    ref = reference(name)
    with torch.no_grad():
        tokens = net.tokens(reference_input().double())
        taps = [layer(t) for layer, t in zip((net.layer1, net.layer2, net.layer3, net.layer4), tokens)]
    errors = [fingerprint_error(y, fp) for y, fp in zip(tokens + taps, ref['tokens'] + ref['taps'])]
    assert max(errors) <= 1e-6


def test_tf_same_padding():
    """TF 'SAME': total = max((ceil(n/s) - 1)*s + k - n, 0), the extra pixel on the right/bottom."""
    for k, n_h, n_w, pad in [(3, 224, 224, (0, 1, 0, 1)), (3, 225, 7, (1, 1, 1, 1)), (5, 224, 224, (1, 2, 1, 2)),
                             (5, 224, 225, (2, 2, 1, 2)), (5, 7, 112, (1, 2, 2, 2))]:   # pad = (left, right, top, bottom)
        conv = B.Conv2dSame(1, 1, k, 2, bias=False)
        x = torch.randn(1, 1, n_h, n_w)
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, pad), conv.weight, stride=2)
        assert y.shape[-2:] == (-(-n_h // 2), -(-n_w // 2)) and torch.equal(conv(x), y)
    # Every strided conv of the network pads as the fixture trace records it (e.g. (0, 1) for 3x3, (1, 2) for 5x5).
    trace = facts('tf_efficientnet_lite0')['architecture_trace_for_input_1x3x224x224']['layers']
    trace = {t['module']: t for t in trace if t['type'] == 'Conv2dSame'}
    modules = dict(B.build_backbone('tf_efficientnet_lite0').named_modules())
    assert {k for k, m in modules.items() if isinstance(m, B.Conv2dSame)} == set(trace)
    for k, t in trace.items():
        m, x = modules[k], torch.randn(t['in_shape'])
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, t['tf_same_padding_applied_left_right_top_bottom']),
                                       m.weight, stride=m.stride, groups=m.groups)
        assert list(y.shape) == t['out_shape'] and torch.allclose(m(x), y, atol=1e-6), k


@pytest.mark.parametrize('name', B.BACKBONES)
def test_forward_preprocessing_and_shapes(name):
    net = B.build_backbone(name)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        maps = net(x)
        expected = facts(name)['tapped_feature_extractor']['output_shapes_for_input_1x3x224x224']
        assert [list(m.shape) for m in maps] == [[2] + s[1:] for s in expected]
        assert [m.shape[1] for m in maps] == net.channels
        # The official preprocessing written out: (x+1)/2, per-backbone mean/std, then bilinear resize to 224.
        mean, std = torch.tensor(net.mean).view(1, 3, 1, 1), torch.tensor(net.std).view(1, 3, 1, 1)
        z = torch.nn.functional.interpolate(((x + 1) / 2 - mean) / std, size=224, mode='bilinear', align_corners=False)
        for a, b in zip(maps, net.taps(z)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    expected_stats = (0.5,) * 3 if name == 'tf_efficientnet_lite0' else (0.485, 0.456, 0.406)
    assert net.mean == expected_stats == tuple(facts(name)['official_preprocessing']['mean_std_used_by_official_code']['mean'])


def test_frozen_always_eval_and_double_backward():
    parent = nn.ModuleDict({name: B.build_backbone(name) for name in B.BACKBONES}).train()
    for name, net in parent.items():
        assert not net.training and not any(m.training for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters())
        # R1 (StyleGAN2's R1 penalty, on the sum of the logits) needs d/dx of the taps and a second backward through that gradient.
        x = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_()
        (g,) = torch.autograd.grad(sum(m.square().mean() for m in net(x)), x, create_graph=True)
        (g2,) = torch.autograd.grad(g.square().sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert torch.isfinite(g2).all() and g2.abs().sum() > 0, name


def test_deit_post_layers_seeded_locally():
    name = 'deit_base_distilled_patch16_224'
    state = torch.get_rng_state()
    a, c = (B.build_backbone(name, seed=s) for s in (0, 1))
    assert torch.equal(torch.get_rng_state(), state)   # global RNG untouched
    post = [k for k in a.state_dict() if not a.is_pretrained_key(k)]
    assert len(post) == 14 and sum(a.state_dict()[k].numel() for k in post) == 6_711_744   # the official projector's frozen post-processing
    assert not any(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in post)
    assert all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict() if a.is_pretrained_key(k))
    B.init_random_layers_(c, seed=0)                  # same seed -> bit-identical layers (every rank agrees)
    assert all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())
    for m in a.random_layers():   # PyTorch default init bound 1/sqrt(fan_in), fan_in = weight[0].numel()
        bound = m.weight[0].numel() ** -0.5
        assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound and m.weight.std() > bound / 2

# ---------------------------------------------------------------------------------------------------------
# Loader


def write_safetensors(path, tensors, header_patch=None):
    header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
    codes = {v: k for k, v in safe_files.SAFETENSORS_DTYPES.items()}
    for k, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b''
        header[k] = {'dtype': codes[t.dtype], 'shape': list(t.shape), 'data_offsets': [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if header_patch:
        header_patch(header)
    text = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack('<Q', len(text)) + text + b''.join(blobs))


def test_safetensors_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {'a': torch.randn(3, 4, generator=g), 'b': torch.randn(5, generator=g).half(),
               'c': torch.randn(2, 2, generator=g).bfloat16(), 'd': torch.arange(7), 'e': torch.zeros(0, 3),
               'f': torch.tensor(3.5, dtype=torch.float64)}
    write_safetensors(tmp_path / 'x.safetensors', tensors)
    back = safe_files.read_safetensors(tmp_path / 'x.safetensors')
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


@pytest.mark.parametrize('patch', [
    lambda h: h['a'].update(data_offsets=[0, 10 ** 9]),           # points past the end of the file
    lambda h: h['a'].update(shape=[4, 4]),                        # byte count does not match the shape
    lambda h: h['a'].update(dtype='F128'),                        # unknown dtype
    lambda h: h['a'].pop('data_offsets'),
])
def test_safetensors_refuses_bad_headers(tmp_path, patch):
    write_safetensors(tmp_path / 'x.safetensors', {'a': torch.ones(3, 4)}, patch)
    with pytest.raises(ValueError):
        safe_files.read_safetensors(tmp_path / 'x.safetensors')


def test_safetensors_refuses_truncated_or_garbage(tmp_path):
    (tmp_path / 'a.safetensors').write_bytes(struct.pack('<Q', 1000) + b'{}')
    (tmp_path / 'b.safetensors').write_bytes(struct.pack('<Q', 4) + b'{oops')
    for f in ('a', 'b'):
        with pytest.raises(ValueError):
            safe_files.read_safetensors(tmp_path / f'{f}.safetensors')


@pytest.fixture(scope='module')
def effnet_file_state():
    """A 'released' tf_efficientnet_lite0 state dict: full model, random values distinct from the fill."""
    net = B.build_backbone('tf_efficientnet_lite0', classifier=True)
    g = torch.Generator().manual_seed(7)
    sd = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
          for k, v in net.state_dict().items()}
    return sd


def _taps(net):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize('fmt', ['pth', 'legacy_model_dict', 'safetensors', 'no_num_batches_tracked'])
def test_load_released_formats(tmp_path, effnet_file_state, fmt):
    name, sd = 'tf_efficientnet_lite0', effnet_file_state
    path = tmp_path / ('w.safetensors' if fmt == 'safetensors' else 'w.pth')
    if fmt == 'safetensors':
        write_safetensors(path, sd)
    elif fmt == 'legacy_model_dict':         # the legacy DeiT release nests its state dict under 'model'
        torch.save({'model': sd}, path)
    elif fmt == 'no_num_batches_tracked':    # the torchvision VGG file predates that buffer
        torch.save({k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}, path)
    else:
        torch.save(sd, path)
    net = B.build_backbone(name, weights=str(path))             # head keys in the file are dropped knowingly
    full = B.build_backbone(name, weights=path, classifier=True)
    assert all(torch.equal(v, sd[k]) for k, v in full.state_dict().items())
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    for a, b in zip(_taps(net), _taps(full)):
        assert torch.equal(a, b)


@pytest.mark.parametrize('damage', ['missing', 'unexpected', 'shape'])
def test_load_fails_loudly(tmp_path, effnet_file_state, damage):
    sd = dict(effnet_file_state)
    if damage == 'missing':
        del sd['blocks.3.1.conv_dw.weight']
    elif damage == 'unexpected':
        sd['blocks.3.1.se.conv_reduce.weight'] = torch.zeros(1)
    else:
        sd['bn1.weight'] = torch.zeros(33)
    torch.save(sd, tmp_path / 'w.pth')
    with pytest.raises(ValueError, match='blocks.3.1|bn1.weight'):
        B.build_backbone('tf_efficientnet_lite0', weights=tmp_path / 'w.pth')
    # A head-only omission is fine only when the head is not built.
    sd = {k: v for k, v in effnet_file_state.items() if not k.startswith('classifier.')}
    torch.save(sd, tmp_path / 'h.pth')
    B.build_backbone('tf_efficientnet_lite0', weights=tmp_path / 'h.pth')
    with pytest.raises(ValueError, match='classifier'):
        B.build_backbone('tf_efficientnet_lite0', weights=tmp_path / 'h.pth', classifier=True)


class _Evil:
    def __reduce__(self):
        return (os.system, ('touch pwned_by_backbone_file',))


def test_load_never_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open('evil.pth', 'wb') as f:
        pickle.dump({'conv_stem.weight': _Evil()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        B.build_backbone('tf_efficientnet_lite0', weights='evil.pth')
    assert not (tmp_path / 'pwned_by_backbone_file').exists()


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='vgg16_bn-6c64b313.pth'):
        B.build_backbone('vgg16_bn', weights=tmp_path / 'nope.pth')
    # A failed download (no network here: safe_files.open_url replaced by one that fails) -> one clear line.
    def open_url(source, cache_dir=None):
        raise OSError('network unreachable\nmore detail')
    monkeypatch.setattr(safe_files, "open_url", open_url)
    url = B.WEIGHT_URLS['deit_base_distilled_patch16_224']
    with pytest.raises(OSError) as e:
        B.build_backbone('deit_base_distilled_patch16_224', weights=url)
    msg = str(e.value)
    assert '\n' not in msg and url in msg and 'local path' in msg
    with pytest.raises(ValueError, match='choose from'):
        B.build_backbone('resnet50')


def test_weight_urls_are_the_released_files():
    for name in B.BACKBONES:
        rw = facts(name)['released_weights']
        assert B.WEIGHT_URLS[name] == rw.get('url', rw.get('legacy_url'))
