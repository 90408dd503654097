"""Where the time of a training iteration goes (`train_min.py PRESET --bench N`), and the speed options beyond
the official numerics. Infrastructure: a reader of the method may skip this file.

--bench N runs N iterations of the real training loop (train_min.train_gdd, gdd.train_step) on one fixed batch of
random images, with a random-weight teacher of the preset's architecture and random-filled ImageNet backbones (no
dataset, no download), and prints images/s, peak memory, the achieved TFLOP/s and a table of phases (R1's rows
when an R1 step is among the timed iterations: --bench 16 or more, as R1 runs every 16th). The phases
are taken from outside gdd.py, which holds no timing code: module hooks on G, D and each feature network,
gradient hooks that fire when backward reaches a phase boundary, the reduce_grads callback of gdd.train_step (it
runs once backward is done) and the optimizers' step hooks. Each marker starts a phase that lasts until the next
marker, so the phases add up to the iteration. Times are CUDA events on a GPU (no synchronisation inside the
iteration) and wall time on a CPU. FLOPs are counted once, in a warm-up iteration, with PyTorch's FLOP formulas
for matrix products and convolutions (forward, backward and R1's double backward; elementwise work is not
counted).

Speed options, all off by default (the presets reproduce the official numerics, README "On a GPU"):
  --tf32           TF32 tensor cores for fp32 convolutions and matrix products on CUDA (the official code keeps
                   TF32 off, as EDM's training/training_loop.py). With --fp16 (every paper preset) the U-Net's
                   convolutions are bf16 already, so this is the discriminator (feature networks, projections,
                   heads, R1) and the generator's fp32 mapping and affine layers.
  --channels-last  generator and discriminator weights in channels_last memory format (NHWC convolutions).
  --bf16-features  the frozen feature networks under bf16 autocast, their taps cast back to fp32: projections,
                   heads and losses stay fp32. R1's double backward runs through the same bf16 operations.
torch.compile is not offered: README "On a GPU" says why.
"""

import functools
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import cli
import gdd

#----------------------------------------------------------------------------
# Speed options (train_min.build_training applies them after building G, its EMA copy and D).

class BF16Features(torch.nn.Module):
    """A frozen feature network under bf16 autocast (bf16 products, fp32 accumulation), its taps returned in fp32."""
    def __init__(self, net):
        super().__init__()
        self.net, self.channels = net, net.channels

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            maps = self.net(x)
        return [m.float() for m in maps]


def apply_speed_options(cfg, G, D):
    """--tf32, --channels-last, --bf16-features on G (not its EMA copy, which only samples) and D, in place."""
    if cfg.tf32:        # read at every kernel launch, backward included
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.channels_last:
        G.to(memory_format=torch.channels_last)
        D.to(memory_format=torch.channels_last)
    if cfg.bf16_features:
        for name, net in list(D.features.items()):
            D.features[name] = BF16Features(net)
    on = [k for k in ('tf32', 'channels_last', 'bf16_features') if getattr(cfg, k)]
    if on:
        cpu = cfg.tf32 and next(G.parameters()).device.type != 'cuda'
        print(f'Speed options {", ".join(on)}: not the official numerics (README: On a GPU)'
              + ('; tf32 does nothing on a CPU' if cpu else ''))


#----------------------------------------------------------------------------
# Phases of one iteration, marked from outside gdd.train_step.

class FlopCount(TorchDispatchMode):
    """Sums torch.utils.flop_counter's formulas over every operation run inside it (the autograd engine carries
    the mode into backward). FlopCounterMode itself cannot be used: its module tracker refuses R1's autograd.grad."""
    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


class Phases:
    """Marks the phases of gdd.train_step. Names: '<step>: <what>', step in G step, D step, R1 step; the feature
    networks' rows name the D call (fake or real images). 'heads, projections, losses' holds everything of D that
    is not a feature network, forward and backward; 'other' the latents, the EMA update and the loop."""
    OTHER = 'other: latents, EMA update'

    def __init__(self, G, D, optimizers, device, reduce=None):
        self.device, self.reduce = device, reduce
        self.marks, self.flops = None, None           # marks: None when not recording
        self.step, self.call, self.fake, self.frozen = 'G step', 'fake', None, False
        self.handles = [G.register_forward_pre_hook(self._G_pre), G.register_forward_hook(self._G_post),
                        D.register_forward_pre_hook(self._D_pre)]
        for name, net in D.features.items():
            self.handles += [net.register_forward_pre_hook(functools.partial(self._F_pre, name)),
                             net.register_forward_hook(functools.partial(self._F_post, name))]
        self.handles += [opt.register_step_post_hook(lambda *_: self.mark(self.OTHER)) for opt in optimizers]

    def mark(self, name):
        if self.marks is None or (self.marks and self.marks[-1][0] == name):
            return
        if self.device.type == 'cuda':
            t = torch.cuda.Event(enable_timing=True)
            t.record()
        else:
            t = time.perf_counter()
        self.marks.append((name, t, self.flops.total if self.flops else 0))

    def _at(self, name, freeze=False):
        """A gradient hook that starts phase `name`; freeze: ignore gradient hooks until the next forward (R1's
        double backward passes the hooked tensors again)."""
        def hook(grad):
            if not self.frozen:
                self.mark(name)
                self.frozen = freeze
        return hook

    def _G_pre(self, module, args):
        self.step, self.frozen = 'G step' if torch.is_grad_enabled() else 'D step', False
        self.mark(f'{self.step}: G forward')

    def _G_post(self, module, args, out):
        if out.requires_grad:       # its gradient is complete when backward reaches G
            out = out.view_as(out)
            out.register_hook(self._at(f'{self.step}: G backward'))
        self.fake = out
        return out

    def _D_pre(self, module, args):
        x, self.frozen = args[0], False
        if x.requires_grad and x.is_leaf:       # gdd.r1_penalty: the real images, a leaf that requires grad
            self.step, self.call = 'R1 step', 'real'
            x.register_hook(self._at('R1 step: double backward', freeze=True))     # after autograd.grad
        else:
            self.call = 'fake' if x is self.fake else 'real'

    def _F_pre(self, name, module, args):
        self.mark(f'{self.step}: {name} forward ({self.call})')
        if args[0].requires_grad:       # the gradient of this network's own view of x: its backward is done
            x = args[0].view_as(args[0])
            x.register_hook(self._at(f'{self.step}: heads, projections, losses'))
            return (x, *args[1:])

    def _F_post(self, name, module, args, maps):
        self.mark(f'{self.step}: heads, projections, losses')
        if any(m.requires_grad for m in maps):  # the first tap gradient starts this network's backward
            maps = [m.view_as(m) for m in maps]
            for m in maps:
                m.register_hook(self._at(f'{self.step}: {name} backward ({self.call})'))
            return maps

    def reduce_grads(self, params):
        """gdd.train_step's reduce_grads: called once the step's backward is done."""
        self.frozen = False
        if self.reduce is not None:
            self.mark(f'{self.step}: all-reduce')
            self.reduce(params)
        self.mark(f'{self.step}: optimizer')

    def run(self, iteration, chunks, step, seen, flops=None):
        """One instrumented iteration; returns its marks, ending with ('end', ...)."""
        self.marks, self.flops = [], flops
        self.mark(self.OTHER)
        iteration(chunks, step, seen, reduce_grads=self.reduce_grads)
        self.mark('end')
        marks, self.marks, self.flops = self.marks, None, None
        return marks


def phase_table(marks):
    """{phase: [seconds, FLOPs]} of one iteration's marks, in order of first appearance (synchronises on CUDA)."""
    if marks and not isinstance(marks[0][1], float):
        marks[-1][1].synchronize()
    table = {}
    for (name, t0, f0), (_, t1, f1) in zip(marks, marks[1:]):
        dt = t1 - t0 if isinstance(t0, float) else t0.elapsed_time(t1) / 1000
        row = table.setdefault(name, [0.0, 0])
        row[0], row[1] = row[0] + dt, row[1] + f1 - f0
    return table

#----------------------------------------------------------------------------
# The benchmark.

def bench(cfg, iteration, reduce, G, D, opt_G, opt_D, device, world, num_chunks, batch_gpu):
    """cfg.bench timed iterations with indices 1, 2, ... (R1 steps at 16, 32, ... as in a run) on one fixed random
    batch, after one warm-up iteration in which the FLOPs are counted (an R1 iteration when a timed one has R1).
    Returns the dict printed after 'BENCH '."""
    g = torch.Generator(device).manual_seed(cfg.seed)
    R, L = G.img_resolution, G.label_dim
    chunks = [(torch.rand([batch_gpu, G.img_channels, R, R], generator=g, device=device) * 2 - 1,
               torch.eye(L, device=device)[torch.randint(L, [batch_gpu], generator=g, device=device)] if L else
               torch.zeros([batch_gpu, 0], device=device)) for _ in range(num_chunks)]
    sync = lambda: torch.cuda.synchronize(device) if device.type == 'cuda' else None
    phases = Phases(G, D, [opt_G, opt_D], device, reduce)
    num_r1 = sum(step % gdd.R1_INTERVAL == 0 for step in range(1, cfg.bench + 1)) if cfg.r1_gamma > 0 else 0
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)

    with FlopCount() as counter:
        flops = phase_table(phases.run(iteration, chunks, gdd.R1_INTERVAL if num_r1 else 1, 0, counter))
    sync()
    t0 = time.time()
    timed = [phases.run(iteration, chunks, step, (step - 1) * cfg.batch) for step in range(1, cfg.bench + 1)]
    sync()
    dt = time.time() - t0
    for handle in phases.handles:
        handle.remove()

    # Mean seconds per phase over the iterations that have it.
    rows = {}
    for marks in timed:
        for name, (sec, _) in phase_table(marks).items():
            rows.setdefault(name, []).append(sec)
    rows = {k: sum(v) / len(v) for k, v in sorted(rows.items(), key=lambda kv: kv[0] == Phases.OTHER)}
    plain = {k: v for k, v in rows.items() if not k.startswith('R1 step')}
    r1 = {k: v for k, v in rows.items() if k.startswith('R1 step')}
    flop_plain = sum(f for name, (_, f) in flops.items() if not name.startswith('R1 step'))
    flop_r1 = sum(f for name, (_, f) in flops.items() if name.startswith('R1 step'))
    mem = torch.tensor([cli.peak_memory_gb(device)], device=device)
    if world > 1:
        torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
    options = [k for k in ('fp16', 'tf32', 'channels_last', 'bf16_features')     # those in effect (fp16, tf32: CUDA)
               if getattr(cfg, k) and (device.type == 'cuda' or k not in ('fp16', 'tf32'))]
    result = dict(preset=cfg.preset, freeze=cfg.freeze, features=cfg.features, batch=cfg.batch, batch_gpu=batch_gpu,
                  processes=world, device=str(device), options=options, iterations=cfg.bench,
                  images_per_s=cfg.bench * cfg.batch / dt, sec_per_iteration=dt / cfg.bench, peak_mem_gb=mem.item(),
                  gflop_per_iteration=flop_plain / 1e9, gflop_per_r1_step=flop_r1 / 1e9 if num_r1 else None,
                  tflop_per_s=(cfg.bench * flop_plain + num_r1 * flop_r1) / dt / 1e12,
                  phases_ms={k: v * 1000 for k, v in plain.items()}, r1_phases_ms={k: v * 1000 for k, v in r1.items()})
    print(f'bench {cfg.preset} freeze={cfg.freeze} features={cfg.features} batch {cfg.batch} ({world} x {num_chunks} x '
          f'{batch_gpu}) on {device}, options {",".join(options) or "none"}: {result["images_per_s"]:.2f} images/s, '
          f'{result["sec_per_iteration"]:.3f} s/iteration, peak memory {result["peak_mem_gb"]:.2f} GB, '
          f'{result["tflop_per_s"]:.3g} TFLOP/s per process ({cfg.bench} timed iterations, {num_r1} with R1)', flush=True)
    print(format_phases(plain, r1, flops, 'CUDA events' if device.type == 'cuda' else 'wall time'))
    print('BENCH ' + json.dumps(result))
    return result


def format_phases(plain, r1, flops, clock):
    """The table: per phase ms, share, GFLOP and TFLOP/s; R1 per R1 step and amortised over R1_INTERVAL."""
    total, r1_total = sum(plain.values()), sum(r1.values())
    amortised = total + r1_total / gdd.R1_INTERVAL
    lines = [f'where the time goes ({clock}, rank 0; share of an iteration with R1 amortised over {gdd.R1_INTERVAL}):',
             f'  {"phase":<56} {"ms":>9} {"share":>6} {"GFLOP":>9} {"TFLOP/s":>8}']
    def row(name, sec, weight):
        f = flops.get(name, (0, 0))[1]
        lines.append(f'  {name:<56} {sec * 1000:9.1f} {100 * sec * weight / amortised:5.1f}% {f / 1e9:9.2f} '
                     f'{f / sec / 1e12 if sec > 0 else 0:8.3f}')
    for name, sec in plain.items():
        row(name, sec, 1)
    lines.append(f'  {"iteration without R1":<56} {total * 1000:9.1f}')
    for name, sec in r1.items():
        row(name, sec, 1 / gdd.R1_INTERVAL)
    if r1:
        lines.append(f'  {f"R1 step (every {gdd.R1_INTERVAL}th iteration)":<56} {r1_total * 1000:9.1f}')
        lines.append(f'  {"iteration, R1 amortised":<56} {amortised * 1000:9.1f}')
    else:
        lines.append(f'  (no R1 step among the timed iterations: it runs every {gdd.R1_INTERVAL}th; '
                     f'--bench {gdd.R1_INTERVAL} or more times one)')
    return '\n'.join(lines)
