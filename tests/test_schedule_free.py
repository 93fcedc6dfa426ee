"""Schedule-Free SGD, AdamW and RAdam (chapter 70) against a float64 transcription of Algorithm 1 of Defazio et al.
2024 (and of the authors' RAdam variant), the train/eval switch, exact resume, compile, pytorch-optimizer where it
follows the paper, its two deviations measured against the paper, and the fastai callback."""
from __future__ import annotations
import copy, io, math, pickle

import pytest
import torch

from optim_lab import load_optimizer
from optim_lab.optimizers.schedule_free import ScheduleFreeSGD, ScheduleFreeAdamW, ScheduleFreeRAdam
from peer_versions import peer_is

torch.set_num_threads(1)
SHAPES = [(6,), (3, 4), (2,)]     # 1-D and 2-D parameters stepped together by one optimizer
STEPS = 50


# %% The paper's algorithm, with x, y and z explicit, in float64

def paper_run(rule: str, thetas: list, grad_of, steps: int, *, lr, beta, beta2=0.999, eps=1e-8, weight_decay=0.0,
              r=0.0, weight_lr_power=2.0, warmup_steps=0, silent_sgd_phase=True, maximize=False):
    """Algorithm 1 (and the authors' RAdam rule) for a list of tensors; returns ([y_2..y_{T+1}], [x_2..x_{T+1}]), each a
    list over steps of lists over tensors. The step size and the averaging weights are shared by all tensors."""
    zs = [t.clone() for t in thetas]
    xs = [t.clone() for t in thetas]
    vs = [torch.zeros_like(t) for t in thetas]
    lr_max, weight_sum = 0.0, 0.0
    ys_out, xs_out = [], []
    for t in range(1, steps + 1):
        ys = [(1 - beta) * z + beta * x for z, x in zip(zs, xs)]
        gs = [(-1 if maximize else 1) * g for g in grad_of(ys, t)]
        vs = [beta2 * v + (1 - beta2) * g ** 2 for v, g in zip(vs, gs)]
        warm = min(1.0, t / warmup_steps) if warmup_steps else 1.0
        if rule == 'sgd':
            gamma = lr * warm
            ds = gs
        elif rule == 'adamw':
            gamma = lr * warm * math.sqrt(1 - beta2 ** t)
            ds = [g / (v.sqrt() + eps) for g, v in zip(gs, vs)]
        else:
            rho_inf = 2 / (1 - beta2) - 1
            rho_t = rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t)
            if rho_t > 4:
                gamma = lr * math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                ds = [g / ((v / (1 - beta2 ** t)).sqrt() + eps) for g, v in zip(gs, vs)]
            else:
                gamma = 0.0 if silent_sgd_phase else lr
                ds = gs
        zs = [z - gamma * d - gamma * weight_decay * y for z, d, y in zip(zs, ds, ys)]
        lr_max = max(lr_max, gamma)
        weight = t ** r * lr_max ** weight_lr_power
        weight_sum += weight
        c = weight / weight_sum if weight_sum > 0 else 0.0
        xs = [(1 - c) * x + c * z for x, z in zip(xs, zs)]
        ys_out.append([(1 - beta) * z + beta * x for z, x in zip(zs, xs)])
        xs_out.append(xs)
    return ys_out, xs_out


def problem(dtype=torch.float64, seed=0, steps=STEPS):
    "Start tensors and a gradient g = A(θ) + noise that depends on the point (a quadratic with a coupling term)"
    gen = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    scales = [torch.rand(s, generator=gen, dtype=torch.float64) + 0.2 for s in SHAPES]
    noise = [[0.5 * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]
    def grad_of(points, t):
        return [k * p.double() + torch.sin(p.double()) + n for k, p, n in zip(scales, points, noise[t - 1])]
    return [th.to(dtype) for th in thetas], grad_of


def class_run(cls, thetas, grad_of, steps, *, switch_every_step=False, **hypers):
    "The class on the same problem: ([y after each step], [x after the last step], the optimizer, the params)"
    params = [th.clone().requires_grad_(True) for th in thetas]
    opt = cls(params, **hypers)
    ys = []
    for t in range(1, steps + 1):
        for p, g in zip(params, grad_of([p.detach() for p in params], t)): p.grad = g.to(p.dtype)
        opt.step()
        ys.append([p.detach().clone() for p in params])
        if switch_every_step:
            opt.eval()
            opt.train()
    opt.eval()
    x_end = [p.detach().clone() for p in params]
    opt.train()
    return ys, x_end, opt, params


def deviation(a, b) -> float:
    return max((u.double() - v.double()).abs().max().item() for us, vs in zip(a, b) for u, v in zip(us, vs))


CASES = {
    'ScheduleFreeSGD': ('sgd', 'momentum', [dict(lr=0.1), dict(lr=0.3, momentum=0.7, weight_decay=0.1, warmup_steps=8),
                                            dict(lr=0.05, r=1.0, weight_lr_power=1.0, maximize=True)]),
    'ScheduleFreeAdamW': ('adamw', 'betas', [dict(lr=1e-2), dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1,
                                                                 warmup_steps=8),
                                             dict(lr=1e-2, r=0.5, weight_lr_power=0.0, maximize=True)]),
    'ScheduleFreeRAdam': ('radam', 'betas', [dict(lr=1e-2), dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.1),
                                             dict(lr=1e-2, silent_sgd_phase=False, r=2.0, weight_lr_power=3.0)]),
}


def paper_hypers(name, hypers):
    "The class's hyperparameters in the transcription's names"
    rule, beta_name, _ = CASES[name]
    h = dict(hypers)
    cls = load_optimizer(name)
    defaults = cls([torch.zeros(1, requires_grad=True)]).defaults
    h.setdefault('lr', defaults['lr'])
    if beta_name == 'momentum': h['beta'] = h.pop('momentum', defaults['momentum'])
    else: h['beta'], h['beta2'] = h.pop('betas', defaults['betas'])
    if rule == 'sgd': h.pop('eps', None)
    return rule, h


ALL_CASES = [(name, i) for name, (_, _, variants) in CASES.items() for i in range(len(variants))]


@pytest.mark.parametrize('name,i', ALL_CASES, ids=[f'{n}-{i}' for n, i in ALL_CASES])
def test_matches_algorithm_1_in_float64(name, i):
    "y after every step and x at the end agree with the transcription to float64 rounding (50 steps, 3 tensors)"
    hypers = CASES[name][2][i]
    thetas, grad_of = problem()
    ys, x_end, _, _ = class_run(load_optimizer(name), thetas, grad_of, STEPS, **hypers)
    rule, h = paper_hypers(name, hypers)
    paper_ys, paper_xs = paper_run(rule, thetas, grad_of, STEPS, **h)
    moved = deviation([thetas], [ys[-1]])
    assert moved > 1e-2, f'{name}: the weights hardly moved ({moved:.2e}); the comparison would be empty'
    assert deviation(ys, paper_ys) < 1e-10
    assert deviation([x_end], [paper_xs[-1]]) < 1e-10


@pytest.mark.parametrize('name,i', ALL_CASES, ids=[f'{n}-{i}' for n, i in ALL_CASES])
def test_float32_stays_within_1e_5_of_algorithm_1(name, i):
    "float32 against the float64 transcription: rounding only (50 steps of a contracting problem keep it below 1e-5)"
    hypers = CASES[name][2][i]
    thetas, grad_of = problem(torch.float32)
    ys, x_end, _, _ = class_run(load_optimizer(name), thetas, grad_of, STEPS, **hypers)
    rule, h = paper_hypers(name, hypers)
    paper_ys, paper_xs = paper_run(rule, [t.double() for t in thetas], grad_of, STEPS, **h)
    assert deviation([ys[-1]], [paper_ys[-1]]) < 1e-5 and deviation([x_end], [paper_xs[-1]]) < 1e-5


# %% train / eval

@pytest.mark.parametrize('name', list(CASES))
def test_eval_train_round_trip(name):
    "eval() puts x in the parameters, a second eval() changes nothing, train() restores y to float64 rounding"
    hypers = CASES[name][2][1]
    thetas, grad_of = problem()
    ys, _, opt, params = class_run(load_optimizer(name), thetas, grad_of, 20, **hypers)
    rule, h = paper_hypers(name, hypers)
    _, paper_xs = paper_run(rule, thetas, grad_of, 20, **h)
    opt.eval()
    once = [p.detach().clone() for p in params]
    assert deviation([once], [paper_xs[-1]]) < 1e-12
    assert all(g['train_mode'] is False for g in opt.param_groups)
    opt.eval()
    assert all(torch.equal(p, q) for p, q in zip(params, once)), 'a second eval() changed the weights'
    opt.train()
    assert deviation([[p.detach() for p in params]], [ys[-1]]) < 1e-12
    opt.train()
    assert deviation([[p.detach() for p in params]], [ys[-1]]) < 1e-12


@pytest.mark.parametrize('name', list(CASES))
def test_switching_between_steps_leaves_the_trajectory_unchanged(name):
    hypers = CASES[name][2][1]
    thetas, grad_of = problem()
    plain, x_plain, _, _ = class_run(load_optimizer(name), thetas, grad_of, STEPS, **hypers)
    switched, x_switched, _, _ = class_run(load_optimizer(name), thetas, grad_of, STEPS, switch_every_step=True, **hypers)
    assert deviation(plain, switched) < 1e-12 and deviation([x_plain], [x_switched]) < 1e-12


@pytest.mark.parametrize('name', list(CASES))
def test_step_in_eval_mode_refuses_and_changes_nothing(name):
    thetas, grad_of = problem()
    _, _, opt, params = class_run(load_optimizer(name), thetas, grad_of, 5)
    opt.eval()
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    for p, g in zip(params, grad_of(params, 6)): p.grad = g.detach()
    with pytest.raises(RuntimeError, match='eval mode'): opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    after = opt.state_dict()
    for i, s in state['state'].items():
        assert all(torch.equal(v, after['state'][i][k]) if torch.is_tensor(v) else v == after['state'][i][k]
                   for k, v in s.items())


@pytest.mark.parametrize('name', list(CASES))
def test_eval_before_any_step_is_a_no_op(name):
    p = torch.randn(4, requires_grad=True)
    before = p.detach().clone()
    opt = load_optimizer(name)([p])
    opt.eval()
    assert torch.equal(p.detach(), before)
    opt.train()
    assert torch.equal(p.detach(), before)


def test_bf16_weights_switch_to_the_average_and_back():
    "Low-precision weights: eval()/train() compute in float32 and round to bf16, so y comes back to bf16 rounding"
    torch.manual_seed(0)
    p = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    opt = ScheduleFreeAdamW([p], lr=1e-2)
    for _ in range(10):
        p.grad = torch.randn(64).to(torch.bfloat16)
        opt.step()
    y = p.detach().float().clone()
    z = opt.state[p]['z']
    opt.eval()
    torch.testing.assert_close(p.detach().float(), (y - 0.1 * z) / 0.9, rtol=1e-2, atol=1e-2)
    opt.train()
    torch.testing.assert_close(p.detach().float(), y, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('name,hp,value', [('ScheduleFreeSGD', 'momentum', 0.0), ('ScheduleFreeSGD', 'momentum', 1.0),
                                           ('ScheduleFreeAdamW', 'betas', (0.0, 0.999)),
                                           ('ScheduleFreeRAdam', 'betas', (1.0, 0.999)),
                                           ('ScheduleFreeAdamW', 'weight_lr_power', -1.0),
                                           ('ScheduleFreeSGD', 'r', math.nan),
                                           ('ScheduleFreeAdamW', 'warmup_steps', 2.5)])
def test_bad_hyperparameters_are_refused(name, hp, value):
    "β must be in (0, 1): eval() divides by β, and β = 1 never leaves x"
    with pytest.raises(ValueError, match=f'{name}.*{hp}'):
        load_optimizer(name)([torch.zeros(2, requires_grad=True)], **{hp: value})


# %% Resume

def _torch_save_round_trip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize('compile', [False, True], ids=['eager', 'compiled'])
@pytest.mark.parametrize('saved_in', ['train', 'eval'])
@pytest.mark.parametrize('name', list(CASES))
def test_state_dict_resume_is_bit_exact(name, saved_in, compile):
    """N steps, (eval(),) save weights and state, load into fresh params and optimizer, (train(),) M more steps:
    bit for bit the run that was never interrupted, with the same eval()/train() at the same point"""
    hypers = dict(CASES[name][2][1], compile=compile)
    cls = load_optimizer(name)
    thetas, grad_of = problem(torch.float32, steps=16)

    def steps(opt, params, ts):
        for t in ts:
            for p, g in zip(params, grad_of([p.detach() for p in params], t)): p.grad = g.float()
            opt.step()

    params = [th.clone().requires_grad_(True) for th in thetas]
    opt = cls(params, **hypers)
    steps(opt, params, range(1, 9))
    if saved_in == 'eval': opt.eval()
    saved = ([p.detach().clone() for p in params], _torch_save_round_trip(opt.state_dict()))
    if saved_in == 'eval': opt.train()
    steps(opt, params, range(9, 17))

    resumed = [w.clone().requires_grad_(True) for w in saved[0]]
    opt2 = cls(resumed, **hypers)
    opt2.load_state_dict(saved[1])
    assert opt2.param_groups[0]['train_mode'] is (saved_in == 'train')
    if saved_in == 'eval': opt2.train()
    steps(opt2, resumed, range(9, 17))
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        for k in ('z', 'lr_max', 'weight_sum'): assert torch.equal(s1[k], s2[k]), k


# %% compile=True on the defaults the contract tests do not use

@pytest.mark.parametrize('name,hypers', [('ScheduleFreeRAdam', dict(lr=1e-2)),                 # the silent phase
                                         ('ScheduleFreeSGD', dict(lr=0.1, warmup_steps=5)),
                                         ('ScheduleFreeAdamW', dict(lr=1e-2, warmup_steps=5, weight_decay=0.1))])
def test_compiled_step_matches_the_paper(name, hypers):
    "compile=True against the float32-rounded transcription: the 0-d state (max γ, Σw) traces and stays right"
    thetas, grad_of = problem(torch.float32, steps=20)
    ys, x_end, _, _ = class_run(load_optimizer(name), thetas, grad_of, 20, compile=True, **hypers)
    rule, h = paper_hypers(name, hypers)
    paper_ys, paper_xs = paper_run(rule, [t.double() for t in thetas], grad_of, 20, **h)
    assert deviation(ys, paper_ys) < 1e-5 and deviation([x_end], [paper_xs[-1]]) < 1e-5
    assert deviation([thetas], [ys[-1]]) > 1e-3


# %% pytorch-optimizer 4.1

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')

PEER_AGREES = [
    ('ScheduleFreeSGD', dict(lr=0.1)),
    ('ScheduleFreeSGD', dict(lr=0.3, momentum=0.7, weight_decay=0.1, warmup_steps=8, r=1.0, weight_lr_power=1.0)),
    ('ScheduleFreeRAdam', dict(lr=1e-2)),
    ('ScheduleFreeRAdam', dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.1, r=0.5)),
    ('ScheduleFreeAdamW', dict(lr=1e-2, betas=(0.9, 0.0), weight_decay=0.1, warmup_steps=8)),  # √(1 - 0^t) = 1
]


def peer_run(cls, thetas, grad_of, steps, **hypers):
    params = [th.clone().requires_grad_(True) for th in thetas]
    opt = cls(params, **hypers)
    ys = []
    for t in range(1, steps + 1):
        for p, g in zip(params, grad_of([p.detach() for p in params], t)): p.grad = g.float()
        opt.step()
        ys.append([p.detach().clone() for p in params])
    opt.eval()
    return ys, [p.detach().clone() for p in params]


@pytest.mark.parametrize('name,hypers', PEER_AGREES, ids=[f'{n}-{i}' for i, (n, _) in enumerate(PEER_AGREES)])
def test_agrees_with_pytorch_optimizer_where_it_follows_the_paper(name, hypers):
    "float32, 100 steps: 1e-5 covers float32 rounding (the peer adds 1e-15 under AdamW's root, invisible here)"
    thetas, grad_of = problem(torch.float32, steps=100)
    ours = class_run(load_optimizer(name), thetas, grad_of, 100, **hypers)
    theirs = peer_run(getattr(pytorch_optimizer, name), thetas, grad_of, 100, **hypers)
    assert deviation(ours[0], theirs[0]) < 1e-5 and deviation([ours[1]], [theirs[1]]) < 1e-5


def test_pytorch_optimizer_adamw_averaging_weights_differ_from_algorithm_1():
    """Its γ_t lacks √(1 - β2^t), so its averaging weights are uniform from the first step: the average it evaluates
    is measurably not Algorithm 1's, while ours is within float32 rounding of it"""
    thetas, grad_of = problem(torch.float32, steps=100)
    rule, h = paper_hypers('ScheduleFreeAdamW', dict(lr=1e-2))
    _, paper_xs = paper_run(rule, [t.double() for t in thetas], grad_of, 100, **h)
    _, ours_x, _, _ = class_run(ScheduleFreeAdamW, thetas, grad_of, 100, lr=1e-2)
    _, peer_x = peer_run(pytorch_optimizer.ScheduleFreeAdamW, thetas, grad_of, 100, lr=1e-2)
    assert deviation([ours_x], [paper_xs[-1]]) < 1e-5
    if peer_is('pytorch_optimizer'):
        assert deviation([peer_x], [paper_xs[-1]]) > 1e-2


def test_pytorch_optimizer_radam_sgd_phase_uses_lr_one():
    "silent_sgd_phase=False: the authors' SGD steps have size lr, the peer's size 1.0 (400 times 2.5e-3)"
    thetas, grad_of = problem(torch.float32, steps=30)
    rule, h = paper_hypers('ScheduleFreeRAdam', dict(silent_sgd_phase=False))
    paper_ys, _ = paper_run(rule, [t.double() for t in thetas], grad_of, 30, **h)
    ours, _, _, _ = class_run(ScheduleFreeRAdam, thetas, grad_of, 30, silent_sgd_phase=False)
    theirs, _ = peer_run(pytorch_optimizer.ScheduleFreeRAdam, thetas, grad_of, 30, silent_sgd_phase=False)
    assert deviation(ours, paper_ys) < 1e-5
    first_paper = deviation([paper_ys[0]], [[t.double() for t in thetas]])
    first_peer = deviation([theirs[0]], [thetas])
    if peer_is('pytorch_optimizer'):
        assert first_peer > 100 * first_paper, (first_peer, first_paper)


# %% fastai

def test_callback_validates_on_the_average_and_leaves_it_in_the_model():
    from fastai.callback.progress import ProgressCallback  # noqa: F401 (Learner.no_bar)
    from optim_lab.fastai import digits_learner
    from optim_lab.optimizers.schedule_free import ScheduleFreeCallback
    cb = ScheduleFreeCallback()
    learn = digits_learner(ScheduleFreeAdamW, lr=1e-2, cbs=cb, warmup_steps=10)
    modes = []
    class Spy(ScheduleFreeCallback.__mro__[1]):   # fastai's Callback
        order = 50
        def before_batch(self): modes.append((self.training, self.learn.opt.opt.param_groups[0]['train_mode']))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=Spy())
    assert modes and all(training == mode for training, mode in modes), 'trained in eval mode or validated in train mode'
    opt = learn.opt.opt
    assert opt.param_groups[0]['train_mode'] is False          # the model holds x after fit
    recorded = learn.recorder.values[-1][1]
    with learn.no_bar(), learn.no_logging(), learn.removed_cbs(cb):
        at_x = learn.validate()[0]
        opt.train()
        at_y = learn.validate()[0]
    assert at_x == pytest.approx(recorded, abs=1e-5) and at_x != at_y
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)   # fit again from train mode: steps are allowed
    assert math.isfinite(learn.recorder.values[-1][1])


def test_callback_refuses_an_optimizer_without_train_and_eval():
    from optim_lab.fastai import digits_learner
    from optim_lab.optimizers.schedule_free import ScheduleFreeCallback
    from optim_lab.optimizers.adam import Adam
    learn = digits_learner(Adam, lr=1e-3, cbs=ScheduleFreeCallback())
    with pytest.raises(TypeError, match='train\\(\\) and eval\\(\\)'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)


def test_callback_pickles_by_name():
    "`learn.export` pickles the callbacks: the class built on first use is found again under its module's name"
    from optim_lab.optimizers import schedule_free
    cb = schedule_free.ScheduleFreeCallback()
    assert type(pickle.loads(pickle.dumps(cb))) is schedule_free.ScheduleFreeCallback
    with pytest.raises(AttributeError): schedule_free.NoSuchCallback


def test_recompute_batchnorm_averages_the_batch_statistics():
    "The running mean and variance become the plain means of the n batches' mean and unbiased variance; mode and momentum restored"
    from optim_lab.optimizers.schedule_free import recompute_batchnorm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    batches = [(torch.randn(8, 3) * (i + 1), torch.zeros(8)) for i in range(5)]
    recompute_batchnorm(model, batches, 3)
    h = [model[0](x).detach() for x, _ in batches[:3]]
    torch.testing.assert_close(model[1].running_mean, torch.stack([b.mean(0) for b in h]).mean(0))
    torch.testing.assert_close(model[1].running_var, torch.stack([b.var(0) for b in h]).mean(0))
    assert not model.training and model[1].momentum == 0.1


def test_callback_with_bn_batches_fits():
    from fastai.callback.progress import ProgressCallback  # noqa: F401 (Learner.no_bar)
    from optim_lab.fastai import digits_learner
    from optim_lab.optimizers.schedule_free import ScheduleFreeCallback
    with pytest.raises(ValueError, match='bn_batches'): ScheduleFreeCallback(bn_batches=-1)
    learn = digits_learner(ScheduleFreeSGD, lr=0.5, cbs=ScheduleFreeCallback(bn_batches=5))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.5)
    assert learn.recorder.values[-1][2] > 0.5 and learn.opt.opt.param_groups[0]['train_mode'] is False
