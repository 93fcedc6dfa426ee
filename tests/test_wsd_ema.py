"""The warmup-stable-decay schedule against the formulas written out, and the weight EMA (plain PyTorch, FSDP2 and
the fastai callback) against a float64 loop.

The schedule's reference is the multiplier of Hu et al. (MiniCPM) with the cooldown shapes of Hägele et al., written
step by step below; pytorch-optimizer 4.1 is compared only where it computes that formula (the cosine cooldown, and
every cooldown with min_lr_ratio = 0). The EMA's reference is s <- decay*s + (1-decay)*p in float64.
"""
from __future__ import annotations
import io, math, os

os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest
import torch
from torch import nn

from optim_lab import EMA, get_wsd_schedule, get_wsd_scheduler_lambda
from distributed_harness import is_rank, rank_results, serve_rank

# fastai's own imports: torch.jit.script in its layers, a pandas option in fastai.tabular
pytestmark = [pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning'),
              pytest.mark.filterwarnings("ignore:The 'mode.chained_assignment' option is deprecated")]

KINDS = ('cosine', '1-sqrt', 'linear', '1-square')
W, S, D = 7, 11, 13        # uneven phase lengths, so an off-by-one in any boundary shows


# %% WSD

def wsd_formula(s: int, warmup: int, stable: int, decay: int, floor: float, cycles: float, kind: str) -> float:
    "The WSD multiplier of the 0-based step s, as the formulas say"
    if s < warmup: return s / warmup
    if s < warmup + stable: return 1.0
    if s >= warmup + stable + decay: return floor
    u = (s - warmup - stable) / decay
    if kind == '1-sqrt': shape = 1 - u ** 0.5
    elif kind == 'linear': shape = 1 - u
    elif kind == '1-square': shape = 1 - u * u
    else: shape = max(0.0, (1 + math.cos(2 * math.pi * cycles * u)) / 2)
    return floor + (1 - floor) * shape


def scheduled_lrs(steps: int, base_lr: float = 0.3, **kwargs) -> list[float]:
    "The learning rate of each step under `get_wsd_schedule`, read from a real optimizer"
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = get_wsd_schedule(opt, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step(); sched.step()
    return lrs


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('floor', [0.0, 0.1, 0.35])
@pytest.mark.parametrize('cycles', [0.5, 0.3, 1.0])
def test_wsd_matches_the_formula(kind, floor, cycles):
    steps = W + S + D + 6
    got = scheduled_lrs(steps, num_warmup_steps=W, num_stable_steps=S, num_decay_steps=D, min_lr_ratio=floor,
                        num_cycles=cycles, cooldown_type=kind)
    want = [0.3 * wsd_formula(s, W, S, D, floor, cycles, kind) for s in range(steps)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-12


@pytest.mark.parametrize('kind', ['1-sqrt', 'linear', '1-square'])
def test_every_cooldown_ends_at_the_floor(kind):
    "The cooldown stays at or above min_lr_ratio and meets it: no dip below the floor and jump back up"
    floor = 0.2
    mults = [get_wsd_scheduler_lambda(s, num_warmup_steps=W, num_stable_steps=S, num_decay_steps=D, min_lr_ratio=floor,
                                      num_cycles=0.5, cooldown_type=kind) for s in range(W + S + D + 3)]
    cooldown = mults[W + S:W + S + D]
    assert min(cooldown) >= floor and all(a >= b for a, b in zip(cooldown, cooldown[1:]))
    last_u = (D - 1) / D
    assert abs(cooldown[-1] - wsd_formula(W + S + D - 1, W, S, D, floor, 0.5, kind)) < 1e-12
    assert cooldown[-1] - floor < 0.2 * (1 - floor) and last_u > 0.9     # close to the floor at the end ...
    assert mults[W + S + D:] == [floor] * 3                              # ... and at it afterwards


def test_wsd_agrees_with_the_peer_where_the_peer_is_right():
    from pytorch_optimizer.lr_scheduler.wsd import get_wsd_scheduler_lambda as peer
    cases = [dict(cooldown_type=k, min_lr_ratio=0.0, num_cycles=0.5) for k in KINDS]
    cases += [dict(cooldown_type='cosine', min_lr_ratio=r, num_cycles=n) for r in (0.1, 0.35) for n in (0.3, 0.5, 1.0)]
    for case in cases:
        for s in range(W + S + D + 4):
            ours = get_wsd_scheduler_lambda(s, num_warmup_steps=W, num_stable_steps=S, num_decay_steps=D, **case)
            theirs = peer(s, num_warmup_steps=W, num_stable_steps=S, num_decay_steps=D, **case)
            assert abs(ours - theirs) < 1e-12, (case, s, ours, theirs)


def test_wsd_resumes_and_handles_empty_phases():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_wsd_schedule(opt, 3, 4, 5, min_lr_ratio=0.1)
    for _ in range(6): opt.step(); sched.step()
    saved = sched.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = get_wsd_schedule(opt2, 3, 4, 5, min_lr_ratio=0.1)
    sched2.load_state_dict(saved)
    opt2.param_groups[0]['lr'] = opt.param_groups[0]['lr']
    for _ in range(8):
        assert opt2.param_groups[0]['lr'] == opt.param_groups[0]['lr']
        opt.step(); sched.step(); opt2.step(); sched2.step()
    # no warm-up: the first step is at the peak; no stable phase: the cooldown starts at once; no cooldown: the floor
    assert scheduled_lrs(2, base_lr=1.0, num_warmup_steps=0, num_stable_steps=1, num_decay_steps=0, min_lr_ratio=0.25) == [1.0, 0.25]
    assert scheduled_lrs(2, base_lr=1.0, num_warmup_steps=0, num_stable_steps=0, num_decay_steps=4, cooldown_type='linear') == [1.0, 0.75]


@pytest.mark.parametrize('kwargs, message', [
    (dict(cooldown_type='exponential'), "cooldown_type='exponential' must be one of"),
    (dict(min_lr_ratio=-0.1), 'min_lr_ratio=-0.1 must be in [0, 1]'),
    (dict(min_lr_ratio=1.5), 'min_lr_ratio=1.5 must be in [0, 1]'),
    (dict(num_cycles=-1.0), 'num_cycles=-1.0 must be >= 0'),
    (dict(num_decay_steps=-2), 'num_decay_steps=-2 must be an integer >= 0'),
    (dict(num_warmup_steps=2.5), 'num_warmup_steps=2.5 must be an integer >= 0'),
])
def test_wsd_rejects_bad_arguments(kwargs, message):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    args = {**dict(num_warmup_steps=2, num_stable_steps=3, num_decay_steps=4), **kwargs}
    with pytest.raises(ValueError, match='get_wsd_schedule') as e: get_wsd_schedule(opt, **args)
    assert message in str(e.value)
    assert opt.param_groups[0]['lr'] == 0.5 and 'initial_lr' not in opt.param_groups[0]


# %% EMA in plain PyTorch

def mixed_params(seed: int = 0, dtype=torch.float32) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in ((5,), (3, 4), (2, 3, 2), ())]


def random_walk(params, generator, scale=0.1):
    with torch.no_grad():
        for p in params: p.add_(torch.randn(p.shape, generator=generator).to(p.dtype), alpha=scale)


@pytest.mark.parametrize('decay', [0.0, 0.5, 0.9, 0.999, 1.0])
def test_ema_matches_the_float64_loop(decay):
    params = mixed_params()
    ema = EMA(params, decay=decay)
    reference = [p.detach().double().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        random_walk(params, g)
        ema.update()
        reference = [decay * s + (1 - decay) * p.detach().double() for s, p in zip(reference, params)]
    assert ema.num_updates == 50
    for s, r in zip(ema.shadow, reference):
        assert s.dtype == torch.float32
        assert (s.double() - r).abs().max() < 2e-6   # float32 rounding of 50 updates of values of order 1
    if decay == 0.0: assert all(torch.equal(s, p) for s, p in zip(ema.shadow, params))


def test_ema_starts_at_a_copy_of_the_weights_and_averages_parameters_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    assert len(ema.shadow) == len(list(model.parameters())) == 4    # BatchNorm's running stats are not averaged
    for s, p in zip(ema.shadow, model.parameters()):
        assert torch.equal(s, p) and s.data_ptr() != p.data_ptr() and not s.requires_grad
    with torch.no_grad(): model[0].weight.add_(1.0)
    assert not torch.equal(ema.shadow[0], model[0].weight)


def test_average_parameters_restores_the_training_weights_bit_exactly():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        params = mixed_params(dtype=dtype)
        ema = EMA(params, decay=0.7)
        g = torch.Generator().manual_seed(2)
        for _ in range(5): random_walk(params, g); ema.update()
        before = [p.detach().clone() for p in params]
        with ema.average_parameters():
            for p, s in zip(params, ema.shadow):
                assert torch.equal(p, s.to(p.dtype)) and p.dtype == dtype
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        with pytest.raises(RuntimeError):
            with ema.average_parameters(): raise RuntimeError('evaluation failed')
        assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_copy_to_writes_the_averages():
    params = mixed_params()
    ema = EMA(params, decay=0.5)
    random_walk(params, torch.Generator().manual_seed(3)); ema.update()
    other = [nn.Parameter(torch.zeros_like(p)) for p in params]
    ema.copy_to(other)
    assert all(torch.equal(o, s) for o, s in zip(other, ema.shadow))
    ema.copy_to()
    assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow))
    with pytest.raises(ValueError, match='2 parameters given, 4 averaged'): ema.copy_to(other[:2])


def test_ema_state_dict_resumes_exactly():
    params, g = mixed_params(), torch.Generator().manual_seed(4)
    ema = EMA(params, decay=0.95)
    for _ in range(7): random_walk(params, g); ema.update()
    buffer = io.BytesIO(); torch.save(ema.state_dict(), buffer); buffer.seek(0)
    resumed = EMA(params, decay=0.1)
    resumed.load_state_dict(torch.load(buffer))
    assert (resumed.decay, resumed.num_updates) == (0.95, 7)
    for _ in range(5): random_walk(params, g); ema.update(); resumed.update()
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, resumed.shadow))
    with pytest.raises(ValueError, match='do not match'): EMA(params[:3]).load_state_dict(ema.state_dict())


@pytest.mark.parametrize('decay', [-0.1, 1.01, float('nan'), True, '0.9'])
def test_ema_rejects_a_bad_decay(decay):
    with pytest.raises(ValueError, match=r'EMA: decay=.* is outside the allowed range \[0, 1\]'): EMA(mixed_params(), decay)


# %% EMA with fastai

def _fastai_run(cbs, epochs=2):
    from optim_lab.fastai import digits_learner
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (as the chapters import it: Learner.no_bar too)
    learn = digits_learner('Adam', lr=1e-2, cbs=cbs)
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-2)
    return learn


def test_ema_callback_resumes_bit_exactly_and_leaves_the_training_weights():
    from fastai.callback.core import Callback
    from optim_lab.fastai import EMACallback

    class Probe(Callback):
        order = 99  # after EMACallback in every event
        def before_fit(self): self.ends, self.starts, self.valid_weights = [], [], []
        def before_train(self): self.starts.append([p.detach().clone() for p in self.model.parameters()])
        def after_train(self): self.ends.append([p.detach().clone() for p in self.model.parameters()])
        def before_validate(self): self.valid_weights.append([p.detach().clone() for p in self.model.parameters()])

    ema_cb, probe = EMACallback(decay=0.9), Probe()
    learn = _fastai_run([ema_cb, probe], epochs=3)
    n = len(learn.dls.train)
    assert ema_cb.average.num_updates == 3 * n
    for epoch in (1, 2):  # training resumes from the weights the previous epoch ended with
        assert all(torch.equal(a, b) for a, b in zip(probe.starts[epoch], probe.ends[epoch - 1]))
    assert all(torch.equal(p, b) for p, b in zip(learn.model.parameters(), probe.ends[-1]))
    # the last validation ran on the averages, which differ from the training weights
    assert all(torch.equal(v, s) for v, s in zip(probe.valid_weights[-1], ema_cb.average.shadow))
    assert not all(torch.equal(v, e) for v, e in zip(probe.valid_weights[-1], probe.ends[-1]))

    # the callback does not change training: a run without it ends at the same weights
    plain = _fastai_run([], epochs=3)
    for p, q in zip(learn.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)   # the same computation, so equal up to kernel choice

    # learn.validate() fires before_fit: it must neither restart nor update the average, and it uses the averages
    shadow, trained = [s.clone() for s in ema_cb.average.shadow], probe.ends[-1]
    recorded = learn.recorder.values[-1][1]
    with learn.no_bar(): assert abs(learn.validate()[0] - recorded) < 1e-5
    assert ema_cb.average.num_updates == 3 * n and all(torch.equal(a, b) for a, b in zip(shadow, ema_cb.average.shadow))
    assert all(torch.equal(p, b) for p, b in zip(learn.model.parameters(), trained))


def test_ema_callback_average_matches_the_float64_loop():
    "The callback's average against s <- decay s + (1 - decay) p over the weights recorded after every step"
    from fastai.callback.core import Callback
    from optim_lab.fastai import EMACallback

    class StepRecorder(Callback):
        order = 99
        def before_fit(self): self.start, self.after = None, []
        def before_train(self):
            if self.start is None: self.start = [p.detach().double().clone() for p in self.model.parameters()]
        def after_step(self): self.after.append([p.detach().double().clone() for p in self.model.parameters()])

    ema_cb, rec = EMACallback(decay=0.95), StepRecorder()
    _fastai_run([ema_cb, rec], epochs=1)
    reference = rec.start
    for weights in rec.after: reference = [0.95 * s + 0.05 * p for s, p in zip(reference, weights)]
    for s, r in zip(ema_cb.average.shadow, reference):
        assert (s.double() - r).abs().max() < 1e-5   # float32 rounding over 89 updates; the weights are of order 1


def test_ema_callback_skips_cancelled_steps():
    "A step cancelled with CancelStepException (MixedPrecision's overflow skip) updates neither the weights nor the average"
    from fastai.callback.core import Callback, CancelStepException
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (Learner.no_bar, as in _fastai_run)
    from optim_lab.fastai import EMACallback, digits_learner

    class CancelOddSteps(Callback):
        def before_fit(self): self.cancelled = 0
        def before_step(self):
            if self.iter % 2:
                self.cancelled += 1
                raise CancelStepException()

    ema_cb, canceller = EMACallback(decay=0.95), CancelOddSteps()
    learn = digits_learner('Adam', lr=1e-2, cbs=[ema_cb, canceller])
    learn.create_opt()
    start = [p.detach().double().clone() for p in learn.model.parameters()]
    after_steps = []   # the weights after every step the PyTorch optimizer took, recorded by the optimizer itself
    learn.opt.opt.register_step_post_hook(
        lambda opt, args, kwargs: after_steps.append([p.detach().double().clone() for p in learn.model.parameters()]))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)

    batches = len(learn.dls.train)
    assert canceller.cancelled == batches // 2 > 0
    assert len(after_steps) == batches - canceller.cancelled
    assert ema_cb.average.num_updates == len(after_steps)
    reference = start
    for weights in after_steps: reference = [0.95 * s + 0.05 * p for s, p in zip(reference, weights)]
    for s, r in zip(ema_cb.average.shadow, reference):
        assert (s.double() - r).abs().max() < 1e-5   # float32 rounding over 45 updates; the weights are of order 1


# %% EMA on FSDP2's sharded parameters (2 gloo ranks)

def sharded_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))  # 5 and 1 rows: uneven shards on 2 ranks


def sharded_batches(steps=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(steps)]


def ema_run(model, rank=None):
    "SGD steps on the batches (each rank takes half), EMA(decay=0.8) after each; the model's averages"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.8)
    for x, y in sharded_batches():
        if rank is not None: x, y = x.chunk(2)[rank], y.chunk(2)[rank]
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); ema.update()
    return ema


def worker(mesh, out_dir):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from optim_lab.distributed import full_tensor
    rank = mesh.get_rank()
    model = sharded_model()
    for layer in (model[0], model[2]): fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ema = ema_run(model, rank)
    assert all(isinstance(s, DTensor) and s.placements == p.placements for s, p in zip(ema.shadow, model.parameters()))
    before = [full_tensor(p.detach()) for p in model.parameters()]
    with ema.average_parameters():
        inside = [full_tensor(p.detach()) for p in model.parameters()]
    after = [full_tensor(p.detach()) for p in model.parameters()]
    averages = [full_tensor(s) for s in ema.shadow]
    return dict(averages=averages, inside=inside, before=before, after=after)


def test_ema_on_fsdp2_sharded_parameters(tmp_path):
    got = rank_results(__file__, tmp_path)[0]   # rank 0's
    reference = ema_run(sharded_model())
    for a, r in zip(got['averages'], reference.shadow):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-6)   # gradients summed over 2 ranks: rounding only
    assert all(torch.equal(i, a) for i, a in zip(got['inside'], got['averages']))
    assert all(torch.equal(b, a) for b, a in zip(got['before'], got['after']))


if is_rank(__name__): serve_rank(worker)
