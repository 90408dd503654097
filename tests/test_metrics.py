"""The metrics of fid_min.py against tests/fixtures/metrics (README there): CLIP ViT-B/32 and DINOv2 ViT-L/14 features
and their pipelines from uint8 images, the Inception Score, precision/recall and the Frechet distance; the
TorchScript tensor reader; `fid_min.py ref / calc --metrics all` offline with stand-in weight files; and the
metrics of snapshots during training (train_min.py --metrics)."""

import collections
import hashlib
import io
import json
import os
import pickle
import socket
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones as B  # noqa: E402
import dataset_min  # noqa: E402
import edm_nets  # noqa: E402
import fid_min  # noqa: E402
import safe_files  # noqa: E402
import toy  # noqa: E402
import train_min  # noqa: E402
from test_backbones import fingerprint_error, reference_input, write_safetensors  # noqa: E402

FIX = Path(__file__).parent / 'fixtures' / 'metrics'


def load(name):
    return torch.load(FIX / name, weights_only=True)


def sha256(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def error_over_std(y, ref):
    """max |y - ref| / std(ref), the fixture README's measure for whole tensors."""
    return ((y.double() - ref).abs().max() / ref.std()).item()

#----------------------------------------------------------------------------
# CLIP ViT-B/32 and DINOv2 ViT-L/14 with the deterministic fill (README section 1): names, shapes, fill, features.

@pytest.fixture(scope='module')
def clip():
    return B.build_metric_network('clip_vit_b_32')


@pytest.fixture(scope='module')
def dinov2():
    return B.build_metric_network('dinov2_vitl14')


def test_state_dicts_are_the_released_layouts(clip, dinov2):
    facts = json.loads((FIX / 'clip_vit_b_32.json').read_text())
    want = [(e['key'], e['shape']) for e in facts['state_dict'] if e['image_encoder']]
    assert [('visual.' + k, list(v.shape)) for k, v in clip.state_dict().items()] == want       # OpenAI's order
    assert sum(p.numel() for p in clip.parameters()) == facts['num_image_encoder_parameter_elements']
    facts = json.loads((FIX / 'dinov2_vitl14.json').read_text())
    assert [(k, list(v.shape)) for k, v in dinov2.state_dict().items()] == [(e['key'], e['shape']) for e in facts['state_dict']]
    assert sum(p.numel() for p in dinov2.parameters()) == facts['num_parameter_elements']
    assert clip.resolution == 224 and not clip.training and not any(p.requires_grad for p in dinov2.parameters())


@pytest.mark.parametrize('name', ['clip_vit_b_32', 'dinov2_vitl14'])
def test_fill_matches_fixture(name, clip, dinov2):
    net, prefix = (clip, 'visual.') if name == 'clip_vit_b_32' else (dinov2, '')
    checks = load(f'{name}_reference.pt')['fill']['check']
    sd = net.state_dict()
    assert set(checks) == {prefix + k for k in sd}
    for k, c in checks.items():
        v = sd[k[len(prefix):]].double().flatten()
        assert torch.allclose(torch.stack([v.sum(), v.abs().sum(), v[0], v[-1]]), c, rtol=1e-9, atol=1e-9), k


def clip_errors(net, dtype):
    """Errors / std of CLIP's intermediates, embedding and 768-d feature on the reference input, run in dtype."""
    ref, inter = load('clip_vit_b_32_reference.pt'), {}
    modules = dict(net.named_modules())
    hooks = [modules['conv1'].register_forward_hook(lambda m, i, o: inter.__setitem__('conv1', o)),
             modules['ln_pre'].register_forward_hook(lambda m, i, o: inter.update(tokens_before_ln_pre=i[0], ln_pre=o)),
             modules['ln_post'].register_forward_hook(lambda m, i, o: inter.__setitem__('ln_post', o))]
    hooks += [modules[f'transformer.{k}'].register_forward_hook(lambda m, i, o, k=k: inter.__setitem__(k, o))
              for k in ref['intermediates'] if k.startswith('resblocks.')]
    with torch.no_grad():
        x = reference_input().to(dtype)
        embedding, feature = net(x), net(x, project=False)
    for h in hooks:
        h.remove()
    errors = {k: fingerprint_error(inter[k], fp) for k, fp in ref['intermediates'].items()}
    errors.update(embedding=error_over_std(embedding, ref['embedding']), pre_projection=error_over_std(feature, ref['pre_projection_768']))
    return errors


def dinov2_errors(net, dtype):
    ref, inter = load('dinov2_vitl14_reference.pt'), {}
    modules = dict(net.named_modules())
    hooks = [modules['patch_embed.proj'].register_forward_hook(lambda m, i, o: inter.__setitem__('patch_embed', o.flatten(2).transpose(1, 2))),
             modules['blocks.0'].register_forward_pre_hook(lambda m, i: inter.__setitem__('tokens', i[0])),
             modules['norm'].register_forward_hook(lambda m, i, o: inter.update(norm=o, x_norm_patchtokens=o[:, 1:], x_norm_clstoken=o[:, 0]))]
    hooks += [modules[k].register_forward_hook(lambda m, i, o, k=k: inter.__setitem__(k, o)) for k in ref['intermediates'] if k.startswith('blocks.')]
    with torch.no_grad():
        output = net(reference_input().to(dtype))
        inter['pos_embed_interpolated'] = net.pos_embed_for(16, 16)
    for h in hooks:
        h.remove()
    errors = {k: fingerprint_error(inter[k], fp) for k, fp in ref['intermediates'].items()}
    errors['output'] = error_over_std(output, ref['output'])
    return errors


def test_clip_features_float32_and_float64(clip):
    """The targets: 1e-4 x std in float32; 1e-9 x std in float64, which sees a wrong LayerNorm eps (1.3e-5)."""
    e32 = clip_errors(clip, torch.float32)
    e64 = clip_errors(clip.double(), torch.float64)
    clip.float()
    print(f'CLIP float32 max {max(e32.values()):.2e} (embedding {e32["embedding"]:.2e}), float64 max {max(e64.values()):.2e}')
    assert len(e32) == 18 and max(e32.values()) <= 1e-4 and max(e64.values()) <= 1e-9


def test_dinov2_features_float32_and_float64(dinov2):
    e32 = dinov2_errors(dinov2, torch.float32)
    e64 = dinov2_errors(dinov2.double(), torch.float64)     # in place: one copy of the 304M parameters at a time
    dinov2.float()
    print(f'DINOv2 float32 max {max(e32.values()):.2e} (output {e32["output"]:.2e}), float64 max {max(e64.values()):.2e}')
    assert len(e32) == 31 and max(e32.values()) <= 1e-4 and max(e64.values()) <= 1e-9


def test_dinov2_pos_embed_uses_the_scale_factor(dinov2):
    # DINOv2 resamples with scale factor 16.1/37: a resize to the size 16x16 is a different grid (2.07 x std).
    fp = load('dinov2_vitl14_reference.pt')['intermediates']['pos_embed_interpolated']
    grid = dinov2.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    by_size = torch.nn.functional.interpolate(grid, size=(16, 16), mode='bicubic').permute(0, 2, 3, 1).reshape(1, 256, -1)
    assert fingerprint_error(torch.cat([dinov2.pos_embed[:, :1], by_size], 1).detach(), fp) > 1
    assert dinov2.pos_embed_for(37, 37) is dinov2.pos_embed


@pytest.mark.parametrize('res', [32, 64])
def test_clip_pipeline_from_uint8(clip, res):
    """clean-fid's pipeline: the Pillow resize bit for bit, the normalised input's SHA-256, the embedding."""
    images, ref = load('images_uint8.pt'), load('clip_vit_b_32_reference.pt')['pipeline_clean_fid'][f'from_{res}']
    detector = fid_min.CLIPFeatures(clip)
    assert torch.equal(fid_min.pil_bicubic(images[f'images_{res}'], 224), images[f'pil_bicubic_224_from_{res}'])
    x = detector.preprocess(images[f'images_{res}'])
    assert x.dtype == torch.float32 and sha256(x) == ref['normalized_input_sha256_float32_folder_path']
    e32 = error_over_std(detector(images[f'images_{res}']), ref['embedding'])
    with torch.no_grad():
        e64 = error_over_std(clip.double()(x.double()), ref['embedding'])
    clip.float()
    print(f'CLIP pipeline from {res}px: float32 {e32:.2e}, float64 {e64:.2e} x std')
    assert e32 <= 1e-4 and e64 <= 1e-9


@pytest.mark.parametrize('res', [32, 64])
def test_dinov2_pipeline_from_uint8(dinov2, res):
    """EDM2's 'torch' resize mode: float antialiased bicubic, no rounding (the SHA-256 of the model input), output."""
    images = load('images_uint8.pt')[f'images_{res}']
    ref = load('dinov2_vitl14_reference.pt')['pipeline_edm2'][f'from_{res}']['resize_mode_torch']
    detector = fid_min.DINOv2Features(dinov2)
    x = detector.preprocess(images)
    assert x.dtype == torch.float32 and sha256(x) == ref['normalized_input_sha256_float32']
    e32 = error_over_std(detector(images), ref['output'])
    with torch.no_grad():       # float64 on the ramps and the hard edges (images 1, 2): ViT-L in float64 is slow
        e64 = error_over_std(dinov2.double()(x[1:3].double()), ref['output'][1:3])
    dinov2.float()
    print(f'DINOv2 pipeline from {res}px: float32 {e32:.2e}, float64 {e64:.2e} x std')
    assert e32 <= 1e-4 and e64 <= 1e-9

#----------------------------------------------------------------------------
# Inception Score (README section 5), precision/recall (section 6), Frechet distance (section 7).

def recipe_probs(n, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1008, generator=g, dtype=torch.float64)
    t = 1.0 + 5.0 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    return torch.softmax(z * t, dim=1).to(torch.float32)


@pytest.fixture(scope='module')
def is_ref():
    ref = load('inception_score_reference.pt')
    probs = recipe_probs(2000, 20240)        # the stored matrix (not copied: 8 MB), regenerated bit for bit
    assert sha256(probs) == ref['probs_2000_sha256_float32']
    return ref, probs


def guided_diffusion_is(probs, split_size):
    """guided-diffusion's rule: consecutive chunks of split_size rows, the mean of their scores."""
    return np.mean([fid_min.inception_score(probs[i:i + split_size], num_splits=1)[0] for i in range(0, len(probs), split_size)])


@pytest.mark.parametrize('case, rows, split_size', [('stored_2000', 2000, 5000), ('stored_first_1999', 1999, 500),
                                                    ('stored_2000_gd_split_600', 2000, 600)])
def test_inception_score_equals_both_references(is_ref, case, rows, split_size):
    ref, probs = is_ref
    c, probs = ref['cases'][case], probs[:rows]
    mean, std, scores = fid_min.inception_score(probs)
    sg, gd, f64 = c['stylegan2_ada'], c['guided_diffusion']['mean'], c['float64_same_splits_as_stylegan2_ada']
    errors = [abs(mean / sg['mean'] - 1), abs(std / sg['std'] - 1), abs(guided_diffusion_is(probs, split_size) / gd - 1)]
    print(f'{case}: relative differences to StyleGAN2-ADA mean, std and guided-diffusion mean {errors}')
    assert max(errors) <= 1e-6
    np.testing.assert_allclose(scores, sg['split_scores'], rtol=1e-6)
    assert abs(mean / f64['mean'] - 1) <= 1e-5 and abs(std / f64['std'] - 1) <= 1e-5    # float32 vs float64 rounding


def test_inception_score_recipe_and_zero_probability(is_ref):
    ref = is_ref[0]['cases']
    probs = recipe_probs(10000, 20241)
    if sha256(probs) == ref['recipe_10000']['probs_sha256_float32']:     # the README: another exp may differ in the last bit
        mean, std, _ = fid_min.inception_score(probs)
        assert abs(mean / ref['recipe_10000']['stylegan2_ada']['mean'] - 1) <= 1e-6
        assert abs(std / ref['recipe_10000']['stylegan2_ada']['std'] - 1) <= 1e-6
        assert abs(guided_diffusion_is(probs, 5000) / ref['recipe_10000']['guided_diffusion']['mean'] - 1) <= 1e-6
    edge = ref['zero_probability_edge']
    assert np.isnan(fid_min.inception_score(edge['probs_float32'], num_splits=2)[0])
    with pytest.raises(ValueError, match='N >= 10'):
        fid_min.inception_score(torch.full((9, 4), 0.25))


PR = load('precision_recall_reference.pt')


def pr_case(name):
    c = PR['cases'][name]
    if name == 'C_large_magnitude':     # case A times 32 (exact in float32)
        a = PR['cases']['A_continuous']
        return dict(c, real=a['real'] * 32, fake=a['fake'] * 32, fake_in_real_manifold=a['fake_in_real_manifold'],
                    real_in_fake_manifold=a['real_in_fake_manifold'], radii_sq_real_float64=a['radii_sq_real_float64'] * 1024)
    return c


@pytest.mark.parametrize('name', ['A_continuous', 'B_duplicates_integer', 'C_large_magnitude'])
@pytest.mark.parametrize('batch', [fid_min.PR_BATCH, 700])
def test_precision_recall_exact(name, batch):
    c = pr_case(name)
    exact = c['results']['exact_float64']
    assert fid_min.precision_recall(c['real'], c['fake'], batch=batch) == (exact['precision'], exact['recall'])
    fake_in, real_in = fid_min.manifold_membership(c['real'], c['fake'], batch=batch)
    assert torch.equal(fake_in, c['fake_in_real_manifold']) and torch.equal(real_in, c['real_in_fake_manifold'])
    # Float32 radii: the (k+1)-th smallest squared distance, the point itself included.
    radii = fid_min.knn_radii(c['real'], batch=batch).double()
    assert torch.allclose(radii, c['radii_sq_real_float64'], rtol=2e-6, atol=1e-6)


def test_frechet_distance_of_case_a():
    a, ref = PR['cases']['A_continuous'], load('frechet_reference.pt')
    real = fid_min.feature_stats(a['real'])
    value = fid_min.frechet_distance(*fid_min.feature_stats(a['fake']), *real)
    assert abs(value / ref['fd_edm2_float64_stats'] - 1) <= 1e-10       # EDM2's statistics and formula
    assert abs(fid_min.frechet_distance(*real, *real)) < 1e-9

#----------------------------------------------------------------------------
# Released weight files: OpenAI's TorchScript archive (its tensors only), open_clip's safetensors, DINOv2's .pth.

class TinyCLIP(torch.nn.Module):
    """A stand-in for OpenAI's whole CLIP model: the image encoder under 'visual', a text-tower tensor and the scalar
    tensors build_model deletes, all in one TorchScript archive."""
    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
        self.register_buffer('input_resolution', torch.tensor(224))

    def forward(self, x):
        return self.visual(x)


def tiny_metric_net(name, seed=0):
    """A small network of the released layout (sizes read off the file: CLIP width 64, DINOv2 dim 64, one block)."""
    net = B.METRIC_NETWORKS[name](**(dict(width=64, layers=1, out_dim=16) if name == 'clip_vit_b_32' else dict(dim=64, depth=1, hidden=128)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1) + (1 if p.ndim == 1 and p.shape[0] == 64 else 0))
    return net.eval()


def save_clip_archive(path, visual, dtype=torch.float32):
    traced = torch.jit.trace(TinyCLIP(visual).to(dtype), torch.zeros(1, 3, 224, 224, dtype=dtype))
    traced.save(str(path))


def test_torchscript_tensors_without_running_the_archive(tmp_path):
    visual = tiny_metric_net('clip_vit_b_32')
    save_clip_archive(tmp_path / 'ViT-B-32.pt', visual)
    tensors = safe_files.read_torchscript_tensors(tmp_path / 'ViT-B-32.pt')
    want = torch.jit.load(str(tmp_path / 'ViT-B-32.pt')).state_dict()   # the test's own file: only to compare with
    assert list(tensors) == list(want) and all(torch.equal(tensors[k], want[k]) for k in want)
    assert 'visual.transformer.resblocks.0.attn.in_proj_weight' in tensors and 'input_resolution' in tensors
    # OpenAI's file, open_clip's safetensors (same names) and a float16 copy load into the same encoder.
    write_safetensors(tmp_path / 'open_clip_model.safetensors', {'visual.' + k: v for k, v in visual.state_dict().items()})
    save_clip_archive(tmp_path / 'half.pt', visual.half().float().half(), torch.float16)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [B.build_metric_network('clip_vit_b_32', tmp_path / f)(x) for f in ('ViT-B-32.pt', 'open_clip_model.safetensors', 'half.pt')]
        want = tiny_metric_net('clip_vit_b_32')(x)
    assert torch.equal(outs[0], want) and torch.equal(outs[1], want) and outs[2].dtype == torch.float32
    assert error_over_std(outs[2], want.double()) < 0.05       # weights rounded to float16, computed in float32


class Hostile:
    def __reduce__(self):
        return os.system, ('touch pwned_by_torchscript',)


def crafted_archive(path, views, numel=4):
    """A TorchScript-style archive: data.pkl pickles a __torch__.M record whose attributes w0, w1, ... are tensors
    viewing (size, stride, offset) of one storage of numel float32 values (data/0)."""
    module, marker = types.ModuleType('__torch__'), object()

    class M:
        pass
    M.__module__, M.__qualname__, module.M = '__torch__', 'M', M

    class View:
        def __init__(self, size, stride, offset=0):
            self.args = (marker, offset, size, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, self.args

    class Root:
        def __reduce__(self):
            return M, (), {'training': False, **{f'w{i}': View(*v) for i, v in enumerate(views)}}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ('storage', torch.FloatStorage, '0', 'cpu', numel) if obj is marker else None
    buffer = io.BytesIO()
    sys.modules['__torch__'] = module
    try:
        Pickler(buffer, protocol=2).dump(Root())
    finally:
        del sys.modules['__torch__']
    archive_with(path, buffer.getvalue(), [('a/data/0', torch.arange(numel, dtype=torch.float32).numpy().tobytes())])


def archive_with(path, data_pkl, members=()):
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('a/data.pkl', data_pkl)
        z.writestr('a/constants.pkl', pickle.dumps(()))
        for name, data in members:
            z.writestr(name, data)


def test_torchscript_reader_refuses_bad_archives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    archive_with('hostile.pt', pickle.dumps(Hostile(), protocol=2))
    with pytest.raises(ValueError, match='not a TorchScript module record'):
        safe_files.read_torchscript_tensors('hostile.pt')
    with pytest.raises(ValueError, match='hostile.pt'):
        B.build_metric_network('clip_vit_b_32', 'hostile.pt')
    assert not (tmp_path / 'pwned_by_torchscript').exists()         # nothing in the archive ran
    crafted_archive('ok.pt', [((2, 2), (1, 2))])            # a transposed view: copied out as it reads
    assert torch.equal(safe_files.read_torchscript_tensors('ok.pt')['w0'], torch.tensor([[0., 2.], [1., 3.]]))
    crafted_archive('ok.pt', [((2,), (2,), 1), ((2,), (1,))])
    tensors = safe_files.read_torchscript_tensors('ok.pt')
    assert list(tensors) == ['w0', 'w1'] and tensors['w0'].tolist() == [1, 3] and tensors['w1'].tolist() == [0, 1]
    for views, problem in [([((100,), (1,))], 'reaches past its storage'), ([((2, 2), (0, 1))], 'overlaps itself'),
                           ([((4,), (1,)), ((4,), (1,))], 'views share a storage')]:
        crafted_archive('bad.pt', views)
        with pytest.raises(ValueError, match=problem):
            safe_files.read_torchscript_tensors('bad.pt')
    # A storage member shorter than its record declares; a damaged zip.
    save_clip_archive('good.pt', tiny_metric_net('clip_vit_b_32'))
    with zipfile.ZipFile('good.pt') as z, zipfile.ZipFile('short.pt', 'w') as out:
        for i in z.infolist():
            out.writestr(i.filename, z.read(i)[:-4] if i.filename == 'good/data/0' else z.read(i))
    with pytest.raises(ValueError, match="storage '0' declares"):
        safe_files.read_torchscript_tensors('short.pt')
    (tmp_path / 'garbage.pt').write_bytes(b'PK\x03\x04' + b'\0' * 100)
    with pytest.raises(ValueError, match='garbage.pt: not a readable TorchScript archive'):
        safe_files.read_torchscript_tensors('garbage.pt')


def test_metric_weights_are_checked(tmp_path):
    sd = tiny_metric_net('dinov2_vitl14').state_dict()
    torch.save(sd, tmp_path / 'ok.pth')
    assert isinstance(B.build_metric_network('dinov2_vitl14', tmp_path / 'ok.pth'), B.DINOv2)
    torch.save({k: v for k, v in sd.items() if k != 'blocks.0.ls1.gamma'}, tmp_path / 'missing.pth')
    with pytest.raises(ValueError, match='missing blocks.0.ls1.gamma'):
        B.build_metric_network('dinov2_vitl14', tmp_path / 'missing.pth')
    torch.save(dict(sd, **{'norm.weight': torch.full([64], float('nan'))}), tmp_path / 'nan.pth')
    with pytest.raises(ValueError, match='NaN'):
        B.build_metric_network('dinov2_vitl14', tmp_path / 'nan.pth')
    torch.save({'conv1.weight': torch.zeros(3)}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='not a dinov2_vitl14 state dict'):
        B.build_metric_network('dinov2_vitl14', tmp_path / 'other.pth')
    with pytest.raises(FileNotFoundError, match='dinov2_vitl14_pretrain.pth'):
        B.build_metric_network('dinov2_vitl14', tmp_path / 'nope.pth')
    assert B.WEIGHT_URLS['clip_vit_b_32'] == json.loads((FIX / 'clip_vit_b_32.json').read_text())['released_weights']['openai']['url']
    assert B.WEIGHT_URLS['dinov2_vitl14'] == json.loads((FIX / 'dinov2_vitl14.json').read_text())['released_weights']['url']

#----------------------------------------------------------------------------
# The command line, offline: stand-in Inception, CLIP and DINOv2 files made here.

class StandInInception(torch.nn.Module):
    """The Inception detector's call: uint8 [N, 3, H, W] -> pool features [N, 24], or class probabilities [N, 10]."""
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer('w', torch.randn(48, 24, generator=g))
        self.register_buffer('out', torch.randn(24, 10, generator=g))
        self.register_buffer('bias', torch.randn(10, generator=g))

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        f = torch.tanh(torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, 4).flatten(1) @ self.w)
        if return_features:
            return f
        logits = f @ self.out
        if not no_output_bias:
            logits = logits + self.bias
        return torch.softmax(logits, dim=1)


@pytest.fixture(scope='module')
def offline(tmp_path_factory):
    d = tmp_path_factory.mktemp('metrics')
    torch.jit.script(StandInInception()).save(str(d / 'inception.pt'))
    save_clip_archive(d / 'ViT-B-32.pt', tiny_metric_net('clip_vit_b_32'))
    torch.save(tiny_metric_net('dinov2_vitl14').state_dict(), d / 'dinov2_vitl14_pretrain.pth')
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 3, 16, 16), dtype=np.uint8)
    dataset_min.save_dataset(str(d / 'data.zip'), images)
    np.savez(d / 'same.npz', images=images.transpose(0, 2, 3, 1))
    np.savez(d / 'other.npz', images=np.clip(images.astype(int) + rng.integers(-60, 61, images.shape), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
    weights = [str(a) for a in ('--detector', d / 'inception.pt', '--clip-weights', d / 'ViT-B-32.pt',
                                '--dinov2-weights', d / 'dinov2_vitl14_pretrain.pth')]
    run('ref', '--data', d / 'data.zip', '--dest', d / 'ref.npz', '--metrics', 'all', '--pr-num', 20, *weights)
    return d, images, weights


def run(*argv):
    return fid_min.main([str(a) for a in argv])


def test_ref_and_calc_all_metrics_offline(offline, capsys):
    d, images, weights = offline      # ref.npz: fid_min.py ref --metrics all --pr-num 20
    with np.load(d / 'ref.npz') as f:
        arrays = {k: f[k] for k in f.files}
    assert sorted(arrays) == sorted(['mu', 'sigma', 'pr_features', 'fd_clip_mu', 'fd_clip_sigma', 'fd_dinov2_mu', 'fd_dinov2_sigma'])
    assert arrays['mu'].shape == (24,) and arrays['fd_clip_mu'].shape == (16,) and arrays['fd_dinov2_sigma'].shape == (64, 64)
    keep = fid_min.edm_subset(24, 20)      # P/R: EDM's random subset of --pr-num images
    x = torch.from_numpy(images)
    np.testing.assert_array_equal(arrays['pr_features'], StandInInception()(x[keep], return_features=True).numpy())
    # The same images: every distance 0, precision = recall = 1; the results also go to the JSON file.
    same = run('calc', '--images', d / 'same.npz', '--num', 24, '--ref', d / 'ref.npz', '--metrics', 'all', '--json', d / 'r.json', *weights)
    assert set(same) == {'fid', 'is_mean', 'is_std', 'precision', 'recall', 'fd_clip', 'fd_dinov2', 'images'}
    assert max(abs(same[k]) for k in ('fid', 'fd_clip', 'fd_dinov2')) < 1e-6 and same['precision'] == same['recall'] == 1
    assert json.loads((d / 'r.json').read_text())['fd_dinov2'] == same['fd_dinov2']
    # Generated in memory by a network (the shipped toy generator, 32x32: the stand-ins take any size).
    net = run('calc', '--net', toy.ASSETS + '/toy-gdd.pt', '--num', 12, '--ref', d / 'ref.npz', '--metrics', 'fid,is,pr', *weights)
    assert net['images'] == 12 and np.isfinite([net['fid'], net['is_mean'], net['precision'], net['recall']]).all()
    out = capsys.readouterr().out
    assert 'FID ' in out and 'FD_CLIP ' in out and 'precision 1.0000' in out and '24/24 images' in out
    # Other images: each metric equals its definition applied to the networks' outputs directly.
    other = torch.from_numpy(np.load(d / 'other.npz')['images'].transpose(0, 3, 1, 2))
    got = run('calc', '--images', d / 'other.npz', '--num', 24, '--ref', d / 'ref.npz', '--metrics', 'all', '--batch', 7, *weights)
    clip = fid_min.CLIPFeatures(B.build_metric_network('clip_vit_b_32', d / 'ViT-B-32.pt'))
    dino = fid_min.DINOv2Features(B.build_metric_network('dinov2_vitl14', d / 'dinov2_vitl14_pretrain.pth'))
    fd = lambda f, prefix: fid_min.frechet_distance(*fid_min.feature_stats(f.double()), arrays[prefix + 'mu'], arrays[prefix + 'sigma'])
    inception = StandInInception()
    want = dict(fid=fd(inception(other, return_features=True), ''), fd_clip=fd(clip(other), 'fd_clip_'),
                fd_dinov2=fd(dino(other), 'fd_dinov2_'))
    want['is_mean'], want['is_std'], _ = fid_min.inception_score(inception(other, no_output_bias=True))
    want['precision'], want['recall'] = fid_min.precision_recall(arrays['pr_features'], inception(other, return_features=True))
    assert min(want['fid'], want['fd_clip'], want['fd_dinov2']) > 1e-3
    for k, v in want.items():
        assert abs(got[k] - v) <= 1e-6 * max(1, abs(v)), (k, got[k], v)


def error_lines(*argv):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    lines = str(e.value.code).split('\n')
    assert all(line.startswith('error: ') for line in lines), lines
    return lines


def test_missing_files_and_references_are_one_line_each(offline, tmp_path):
    d, _, weights = offline
    run('ref', '--data', d / 'data.zip', '--dest', d / 'fid-only.npz', '--detector', d / 'inception.pt')
    lines = error_lines('calc', '--images', d / 'same.npz', '--num', 24, '--ref', d / 'ref.npz', '--metrics', 'all',
                        '--detector', tmp_path / 'a.pt', '--clip-weights', tmp_path / 'b.pt', '--dinov2-weights', tmp_path / 'c.pth')
    assert len(lines) == 3
    assert fid_min.DETECTOR_URL in lines[0] and '--detector PATH' in lines[0]
    assert B.WEIGHT_URLS['clip_vit_b_32'] in lines[1] and '--clip-weights PATH' in lines[1]
    assert B.WEIGHT_URLS['dinov2_vitl14'] in lines[2] and '--dinov2-weights PATH' in lines[2]
    # An EDM-style reference (mu, sigma only) serves fid, and says what fd_clip and pr lack, before any work.
    assert run('calc', '--images', d / 'same.npz', '--num', 24, '--ref', d / 'fid-only.npz', *weights)['fid'] < 1e-6
    (line,) = error_lines('calc', '--images', d / 'same.npz', '--num', 24, '--ref', d / 'fid-only.npz', '--metrics', 'fid,fd_clip,pr', *weights)
    assert 'fd_clip needs fd_clip_mu and fd_clip_sigma; pr needs pr_features' in line and 'fid_min.py ref --metrics' in line
    (line,) = error_lines('calc', '--images', d / 'same.npz', '--num', 9, '--ref', d / 'ref.npz', '--metrics', 'is', *weights)
    assert '--num must be >= 10' in line
    with pytest.raises(SystemExit):
        run('calc', '--images', d / 'same.npz', '--ref', d / 'ref.npz', '--metrics', 'fid,kid')     # argparse: exit 2
    (line,) = error_lines('ref', '--data', d / 'data.zip', '--dest', tmp_path / 'x.npz', '--metrics', 'is', *weights)
    assert 'needs no reference' in line
    (line,) = error_lines('calc', '--images', d / 'same.npz', '--num', 24, '--ref', d / 'ref.npz', '--metrics', 'is',
                          '--detector', toy.ASSETS + '/toy-classifier.pt')
    assert 'needs the Inception detector' in line


def _calc_worker(rank, port, argv):
    os.environ.update(WORLD_SIZE='2', RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fid_min.main(argv)


def test_two_processes_equal_one(offline, tmp_path):
    """torchrun's environment, two CPU processes: rows come back in image order, so IS splits and P/R are unchanged."""
    d, _, weights = offline
    common = ['--images', str(d / 'other.npz'), '--num', '23', '--ref', str(d / 'ref.npz'), '--metrics', 'fid,is,pr', *weights[:2]]
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_calc_worker, args=(port, ['calc', *common, '--batch', '5', '--json', str(tmp_path / 'two.json')]), nprocs=2)
    one = run('calc', *common)
    two = json.loads((tmp_path / 'two.json').read_text())
    assert all(two[k] == one[k] for k in ('is_mean', 'is_std', 'precision', 'recall')), (one, two)
    assert abs(two['fid'] - one['fid']) <= 1e-6     # statistics summed in another order


def test_bench_runs_and_reports_the_split(capsys):
    # Quick settings: the README's numbers come from the full command (with the networks and FID's 2048-d sqrtm).
    result = fid_min.main(['bench', '--num', '12', '--metrics', 'is,pr', '--batch', '6'])
    assert not result['seconds'] and set(result['rest_seconds']) == {'statistics', 'is', 'pr'}
    out = capsys.readouterr().out
    assert 'not timed (no --detector file' in out and 'feature networks' in out and 'BENCH ' in out
    result = fid_min.main(['bench', '--pr-num', '300'])
    assert result['peak_gb'] >= result['peak_before_gb'] > 0

#----------------------------------------------------------------------------
# During training: train_min.py --metrics fid,is,pr --ref REF with the stand-in detector, and --resume.

def test_training_records_metrics_and_the_best_snapshot(offline, tmp_path, capsys):
    d, _, _ = offline
    images, labels = toy.draw_toy_images(40, seed=0)
    dataset_min.save_dataset(str(tmp_path / 'data.zip'), images, labels)
    torch.manual_seed(0)
    teacher = edm_nets.EDMPrecond(img_resolution=32, img_channels=3, label_dim=10, **train_min.arch_kwargs(train_min.parse_args(['toy'])))
    safe_files.save_torch({'format': 'gdd-min', 'ema': safe_files.net_to_dict(teacher)}, tmp_path / 'teacher.pt')
    run('ref', '--data', tmp_path / 'data.zip', '--dest', tmp_path / 'ref.npz', '--metrics', 'fid,pr', '--detector', d / 'inception.pt')
    common = ['toy', '--outdir', str(tmp_path / 'runs'), '--data', str(tmp_path / 'data.zip'), '--teacher', str(tmp_path / 'teacher.pt'),
              '--batch', '2', '--tick', '0.002', '--snap', '1', '--state', '1', '--fd-images', '0', '--metrics', 'fid,is,pr',
              '--ref', str(tmp_path / 'ref.npz'), '--metric-images', '10', '--detector', str(d / 'inception.pt')]
    with pytest.raises(SystemExit, match='--ref .*nope.npz: no such file'):        # before anything is loaded
        train_min.parse_args(common + ['--ref', str(tmp_path / 'nope.npz')])
    with pytest.raises(SystemExit, match='takes fid and optionally is, pr'):
        train_min.parse_args(common + ['--metrics', 'is'])
    train_min.main(common + ['--kimg', '0.004'])         # two iterations, a snapshot after each
    run_dir = tmp_path / 'runs' / '00000-toy'
    lines = [json.loads(x) for x in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [x['kimg'] for x in lines] == [0.002, 0.004] and all(x['images'] == 10 for x in lines)
    assert all(np.isfinite([x['fid'], x['is_mean'], x['precision'], x['recall']]).all() for x in lines)
    best = json.loads((run_dir / 'best-snapshot.json').read_text())
    assert best == {k: min(lines, key=lambda x: x['fid'])[k] for k in ('snapshot', 'kimg', 'fid')}
    assert 'network-snapshot-000000.002.pt: FID ' in capsys.readouterr().out     # every snapshot kept, named to the image
    assert [x['snapshot'] for x in lines] == ['network-snapshot-000000.002.pt', 'network-snapshot-000000.004.pt']
    # Resume from the first state (iteration 1): the record keeps its first line and the run measures the same
    # images again, so the second line comes back equal (CPU training resumes bit for bit).
    train_min.main(common + ['--kimg', '0.004', '--resume', str(run_dir / 'training-state-00000001.pt')])
    again = [json.loads(x) for x in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [x['kimg'] for x in again] == [0.002, 0.004]
    for k in ('fid', 'is_mean', 'is_std', 'precision', 'recall'):
        assert again[0][k] == lines[0][k] and abs(again[1][k] - lines[1][k]) <= 1e-9 * max(1, abs(lines[1][k])), k
    assert json.loads((run_dir / 'best-snapshot.json').read_text()) == best
