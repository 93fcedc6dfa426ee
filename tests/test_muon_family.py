"""Chapter 79 (AdaMuon, NorMuon, SCION) and the Newton–Schulz schedules of chapters 44 and 64: float64 transcriptions of
the papers' algorithms, pytorch-optimizer 4.1 with its Newton–Schulz in float32, 'original' bit-identical to the
iteration before `ns_coeffs` existed, Polar Express's band, the hyperparameter checks, and the peers' deviations."""
from __future__ import annotations
import contextlib, copy, functools, os

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch

from optim_lab.checks import reference_check
from optim_lab.optimizers.muon import MUON_COEFFS, Muon, orthogonalize
from optim_lab.optimizers.muon_family import AdaMuon, NorMuon, SCION, LMO_NORMS
from optim_lab.toolkit.spectral import NS_COEFFS, newton_schulz, spectral_clip, polar_express_schedule

D = torch.float64
SHAPES = ((7,), (4, 6), (6, 3), (3, 2, 2, 2))


# %% the iteration before `ns_coeffs`, kept verbatim: 'original' must reproduce it bit for bit

def previous_newton_schulz(m, coeffs=NS_COEFFS):
    wide = m.shape[-2] < m.shape[-1]
    x = m.mT if wide else m
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-20)
    for a, b, c in coeffs:
        gram = x.mT @ x
        x = x @ (b * gram + c * (gram @ gram)) + a * x
    return x.mT if wide else x


def previous_orthogonalize(update, ns_steps=5, eps=1e-7):
    x = update.reshape(update.shape[0] if update.dim() else 1, -1)
    norm = torch.linalg.matrix_norm(x)
    s = norm / (norm + eps)
    a, b, c = MUON_COEFFS
    first = (a * s, b * s ** 3, c * s ** 5)
    return previous_newton_schulz(x, [first] + [MUON_COEFFS] * (ns_steps - 1)).reshape(update.shape)


@pytest.mark.parametrize('dtype', [torch.float32, D])
@pytest.mark.parametrize('ns_steps', [1, 3, 5])
def test_original_schedule_is_bit_identical_to_before(dtype, ns_steps):
    gen = torch.Generator().manual_seed(ns_steps)
    for shape in ((8, 32), (40, 12), (3, 2, 3, 3), (9,)):
        m = torch.randn(*shape, generator=gen, dtype=dtype)
        assert torch.equal(orthogonalize(m, ns_steps, ns_coeffs='original'), previous_orthogonalize(m, ns_steps))
        assert torch.equal(orthogonalize(m, ns_steps), previous_orthogonalize(m, ns_steps))
    w = torch.randn(20, 12, generator=gen, dtype=dtype)
    assert torch.equal(newton_schulz(w), previous_newton_schulz(w))            # the spectral clip's default schedule
    assert torch.equal(spectral_clip(w, 0.5, 1.5), spectral_clip(w, 0.5, 1.5, NS_COEFFS))


def test_muon_default_trajectory_unchanged():
    "Muon's step with ns_coeffs='original' is the previous Muon's, bit for bit (40 steps, float32)"
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(6, 5, generator=gen).requires_grad_()
    q, B = p.detach().clone(), torch.zeros(6, 5)
    opt = Muon([p], ns_coeffs='original')
    for _ in range(40):
        g = torch.randn(6, 5, generator=gen)
        p.grad = g.clone(); opt.step()
        B.lerp_(g, 0.05)
        q.add_(previous_orthogonalize(g.lerp(B, 0.95)).mul_(max(1, 6 / 5) ** 0.5), alpha=-0.02)
    assert torch.equal(p.detach(), q)


# %% Polar Express

PAPER_TABLE = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
               (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
               (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
               (3.3184196573706015, -2.488488024314874, 0.51004894012372),
               (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
               (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
               (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
               (1.875, -1.25, 0.375)]


def paper_polar_express(G, steps, eps=1e-7):
    "The paper's listing, in float64: safety 1.01 on all but the last triple, X / (1.01 ‖X‖_F + 1e-7)"
    coeffs = [(a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in PAPER_TABLE[:-1]] + [PAPER_TABLE[-1]]
    X = G.mT if G.shape[0] > G.shape[1] else G
    X = X / (torch.linalg.matrix_norm(X) * 1.01 + eps)
    for a, b, c in coeffs[:steps] + [coeffs[-1]] * max(0, steps - len(coeffs)):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if G.shape[0] > G.shape[1] else X


@pytest.mark.parametrize('steps', [3, 5, 8, 10])
def test_polar_express_is_the_papers_listing(steps):
    m = torch.randn(24, 40, generator=torch.Generator().manual_seed(steps), dtype=D)
    torch.testing.assert_close(newton_schulz(m, 'polar_express', steps), paper_polar_express(m, steps, eps=0.0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(orthogonalize(m, steps, ns_coeffs='polar_express'), paper_polar_express(m, steps),
                               rtol=1e-6, atol=1e-7)   # Muon's ε = 1e-7 enters as (‖X‖ + ε)·1.01 against 1.01‖X‖ + ε
    assert len(polar_express_schedule(steps)) == steps


def test_polar_express_band_at_five_steps():
    "Every singular value in (0.8, 1.2), mean |σ-1| under 0.7× the original quintic's (float32, non-square shapes)"
    gen = torch.Generator().manual_seed(10)
    for shape in ((64, 32), (48, 160), (200, 100), (96, 80)):
        m = torch.randn(*shape, generator=gen)
        pe, kj = (torch.linalg.svdvals(orthogonalize(m, 5, ns_coeffs=c)) for c in ('polar_express', 'original'))
        assert 0.8 < pe.min() and pe.max() < 1.2, (shape, pe.min(), pe.max())   # measured in [0.87, 1.13]
        assert (pe - 1).abs().mean() < 0.7 * (kj - 1).abs().mean()             # measured ratios ≈ 0.4-0.5


def test_a_list_of_triples_is_used_as_given():
    m = torch.randn(10, 6, generator=torch.Generator().manual_seed(0), dtype=D)
    triples = [(2.0, -1.5, 0.5), (1.875, -1.25, 0.375)]
    x = m / torch.linalg.matrix_norm(m)
    for a, b, c in triples + [triples[-1]] * 2:
        A = x.mT @ x
        x = x @ (a * torch.eye(6, dtype=D) + b * A + c * A @ A)
    torch.testing.assert_close(newton_schulz(m, triples, 4), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('cls', [Muon, AdaMuon, NorMuon])
@pytest.mark.parametrize('bad', ['polar', [], [(1.0, 2.0)], [(1.0, 2.0, float('nan'))], 3.0])
def test_bad_ns_coeffs_raise_naming_the_optimizer(cls, bad):
    with pytest.raises(ValueError, match=f'{cls.__name__}: ns_coeffs='):
        cls([torch.nn.Parameter(torch.randn(3, 4))], ns_coeffs=bad)


# %% float64 transcriptions of the papers (compact forms of chapter 79's)

def ns5(X, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / (torch.linalg.matrix_norm(X) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def adamw(theta, g, m, v, t, lr, betas, eps, wd):
    m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
    return theta * (1 - lr * wd) - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps), m, v


def adamuon_reference(theta, grad_fn, steps, lr=2e-2, betas=(0.9, 0.95), weight_decay=0.0, ns_steps=5,
                      use_adjusted_lr=True, adamw_lr=3e-4, adamw_betas=(0.9, 0.999), adamw_wd=0.0, eps=1e-10,
                      adamw_eps=1e-10, sign_stabilize=True):
    M, m, v = (torch.zeros_like(theta) for _ in range(3))
    V = torch.zeros_like(theta.reshape(len(theta), -1))
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        if theta.dim() >= 2:
            M = betas[0] * M + g                                           # Algorithm 1: M_t = βM_{t-1} + G_t
            X = M.reshape(len(M), -1)
            O = ns5(torch.sign(X) if sign_stabilize else (1 - betas[0]) * X, ns_steps)
            V = betas[1] * V + (1 - betas[1]) * O * O
            O_hat = O / (V.sqrt() + eps)
            r, c = X.shape
            size = 0.2 * (r * c) ** 0.5 if use_adjusted_lr else (max(1, r / c) * min(r, c)) ** 0.5
            theta = theta - lr * (size / (torch.linalg.matrix_norm(O_hat) + eps) * O_hat.reshape(theta.shape) + weight_decay * theta)
        else: theta, m, v = adamw(theta, g, m, v, t, adamw_lr, adamw_betas, adamw_eps, adamw_wd)
        out.append(theta)
    return out


def normuon_reference(theta, grad_fn, steps, lr=2e-2, momentum=0.95, beta2=0.95, weight_decay=0.0, nesterov=True,
                      ns_steps=5, update_scale='preserve_norm', use_adjusted_lr=False, adamw_lr=3e-4,
                      adamw_betas=(0.9, 0.95), adamw_wd=0.0, adamw_eps=1e-10, eps=1e-10):
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    M, vrow = torch.zeros_like(theta.reshape(len(theta), -1)), torch.zeros(len(theta), 1, dtype=theta.dtype)
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        if theta.dim() >= 2:
            G = g.reshape(len(g), -1)
            M = momentum * M + (1 - momentum) * G
            O = ns5((1 - momentum) * G + momentum * M if nesterov else M, ns_steps)
            vrow = beta2 * vrow + (1 - beta2) * (O * O).mean(dim=1, keepdim=True)
            O_hat = O / (vrow.sqrt() + eps)
            r, c = O.shape
            if update_scale == 'match_rms': size = 0.2 * (r * c) ** 0.5
            else: size = (0.2 * max(r, c) ** 0.5 if use_adjusted_lr else max(1, r / c) ** 0.5) * torch.linalg.matrix_norm(O)
            step = size * O_hat / (torch.linalg.matrix_norm(O_hat) + eps)
            theta = theta - lr * weight_decay * theta - lr * step.reshape(theta.shape)
        else: theta, m, v = adamw(theta, g, m, v, t, adamw_lr, adamw_betas, adamw_eps, adamw_wd)
        out.append(theta)
    return out


def lmo_reference(d, norm_type):
    if norm_type == 'auto': norm_type = 'bias' if d.dim() <= 1 else 'spectral' if d.dim() == 2 else 'spectral_conv'
    if norm_type == 'spectral': return (d.shape[0] / d.shape[1]) ** 0.5 * ns5(d)
    if norm_type == 'spectral_conv':
        return (d.shape[0] / d.shape[1]) ** 0.5 / d[0, 0].numel() * ns5(d.reshape(len(d), -1)).reshape(d.shape)
    if norm_type == 'sign': return torch.sign(d) / d.shape[1]
    if norm_type == 'bias': return d / ((d * d).mean(dim=0, keepdim=True).sqrt() + 1e-8)
    if norm_type == 'col': return d / ((d * d).sum(dim=0, keepdim=True).sqrt() / d.shape[0] ** 0.5 + 1e-8)
    if norm_type == 'row': return d / ((d * d).sum(dim=1, keepdim=True).sqrt() * d.shape[1] ** 0.5 + 1e-8)
    return d


def scion_reference(theta, grad_fn, steps, lr=1e-3, momentum=0.1, constraint=False, norm_type='auto', scale=1.0,
                    weight_decay=0.0):
    d, out = torch.zeros_like(theta), []
    for t in range(1, steps + 1):
        d = (1 - momentum) * d + momentum * grad_fn(theta, t)                  # d₀ = 0
        theta = theta * (1 - lr * weight_decay)
        if constraint: theta = (1 - lr) * theta
        theta = theta - lr * scale * lmo_reference(d, norm_type)
        out.append(theta)
    return out


@pytest.mark.parametrize('hypers', [dict(), dict(lr=0.05, betas=(0.8, 0.9), weight_decay=0.1, ns_steps=3, use_adjusted_lr=False,
                                                 adamw_lr=1e-2, adamw_wd=0.05, eps=1e-8, adamw_eps=1e-8),
                                    dict(sign_stabilize=False, weight_decay=0.02)])
def test_adamuon_against_the_paper(hypers):
    assert reference_check(AdaMuon, adamuon_reference, steps=40, shapes=SHAPES, noise=3.0, **hypers) < 1e-12


@pytest.mark.parametrize('hypers', [dict(), dict(update_scale='match_rms', nesterov=False),
                                    dict(update_scale='match_rms', weight_decay=0.1, beta2=0.5),
                                    dict(lr=0.05, momentum=0.9, beta2=0.8, weight_decay=0.1, use_adjusted_lr=True,
                                         ns_steps=3, adamw_lr=1e-2, adamw_wd=0.05, eps=1e-8)])
def test_normuon_against_the_paper(hypers):
    assert reference_check(NorMuon, normuon_reference, steps=40, shapes=SHAPES, noise=3.0, **hypers) < 1e-12


@pytest.mark.parametrize('norm_type,shapes', [('auto', SHAPES), ('spectral', ((4, 6), (6, 3))),
                                              ('spectral_conv', ((3, 2, 2, 2), (4, 2, 3))), ('sign', ((4, 6),)),
                                              ('col', ((4, 6),)), ('row', ((6, 3),)), ('bias', ((7,),)), ('none', SHAPES)])
@pytest.mark.parametrize('constraint', [False, True])
def test_scion_against_the_paper(norm_type, shapes, constraint):
    hypers = dict(lr=0.05, momentum=0.3, constraint=constraint, norm_type=norm_type, scale=2.0, weight_decay=0.1)
    assert reference_check(SCION, scion_reference, steps=40, shapes=shapes, noise=3.0, **hypers) < 1e-12


# %% pytorch-optimizer 4.1, its Newton–Schulz switched from bfloat16 to float32

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')
from pytorch_optimizer.optimizer.utils import matrix as peer_matrix           # noqa: E402
from pytorch_optimizer.optimizer.muon import base as peer_base, adamuon as peer_adamuon, normuon as peer_normuon  # noqa: E402
from pytorch_optimizer.optimizer import scion as peer_scion                    # noqa: E402
from pytorch_optimizer.optimizer.scion import LMONorm                          # noqa: E402


@contextlib.contextmanager
def peer_newton_schulz_in(dtype):
    modules = (peer_base, peer_adamuon, peer_normuon, peer_scion)
    saved = [m.zero_power_via_newton_schulz_5 for m in modules]
    for m in modules: m.zero_power_via_newton_schulz_5 = functools.partial(peer_matrix.zero_power_via_newton_schulz_5, dtype=dtype)
    try: yield
    finally:
        for m, s in zip(modules, saved): m.zero_power_via_newton_schulz_5 = s


def relative_deviation(ours, theirs, shapes, steps=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    w0 = [p.detach().clone() for p in a]
    with peer_newton_schulz_in(torch.float32):
        opts = ours(a), theirs(b)
        for _ in range(steps):
            for x, y in zip(a, b): x.grad = torch.randn(x.shape, generator=gen); y.grad = x.grad.clone()
            for o in opts: o.step()
    return max((x - y).abs().max().item() for x, y in zip(a, b)) / max((y - w).abs().max().item() for y, w in zip(b, w0))


MIXED = [(6, 4), (4, 9), (3, 2, 3, 3), (5,)]
GROUPS = lambda ps: [dict(params=ps[:3], use_muon=True), dict(params=ps[3:], use_muon=False)]   # noqa: E731
HYPERS = dict(lr=0.03, weight_decay=0.05, adamw_lr=1e-2, adamw_wd=0.1)

# Tolerance 1e-4 relative to how far the weights moved: float32 rounding of 40 steps through five Newton–Schulz
# iterations, measured ≈ 1e-6; a wrong scale, ε placement or decay order shows at 1e-3 or more.


@pytest.mark.parametrize('use_adjusted_lr', [True, False])
def test_adamuon_agrees_with_pytorch_optimizer(use_adjusted_lr):
    dev = relative_deviation(lambda ps: AdaMuon(ps, sign_stabilize=False, use_adjusted_lr=use_adjusted_lr, **HYPERS),
                             lambda ps: pytorch_optimizer.AdaMuon(GROUPS(ps), use_adjusted_lr=use_adjusted_lr, **HYPERS), MIXED)
    assert dev < 1e-4


@pytest.mark.parametrize('update_scale', ['preserve_norm', 'match_rms'])
@pytest.mark.parametrize('nesterov', [True, False])
@pytest.mark.parametrize('foreach', [False, None])
def test_normuon_agrees_with_pytorch_optimizer(update_scale, nesterov, foreach):
    kw = dict(update_scale=update_scale, nesterov=nesterov, **HYPERS)
    dev = relative_deviation(lambda ps: NorMuon(ps, **kw),
                             lambda ps: pytorch_optimizer.NorMuon(GROUPS(ps), foreach=foreach, **kw), MIXED)
    assert dev < 1e-4


def test_normuon_adjusted_lr_agrees_with_pytorch_optimizer():
    kw = dict(use_adjusted_lr=True, **HYPERS)
    assert relative_deviation(lambda ps: NorMuon(ps, **kw), lambda ps: pytorch_optimizer.NorMuon(GROUPS(ps), **kw), MIXED) < 1e-4


@pytest.mark.parametrize('norm_type,shapes,kw', [
    ('auto', MIXED, None), ('spectral', [(6, 4), (4, 9)], None), ('spectral', [(6, 4)], {'max_scale': True, 'normalize': False}),
    ('spectral_conv', [(3, 2, 3, 3), (4, 2, 3)], None), ('sign', [(6, 4)], None), ('sign', [(6, 4)], {'normalize': False}),
    ('col', [(6, 4)], None), ('col', [(6, 4)], {'normalized': True, 'transpose': True}), ('row', [(6, 4)], None),
    ('row', [(6, 4)], {'normalized': False}), ('bias', [(5,)], None), ('none', [(6, 4), (5,)], None)])
@pytest.mark.parametrize('constraint', [False, True])
def test_scion_agrees_with_pytorch_optimizer(norm_type, shapes, kw, constraint):
    h = dict(lr=0.02, momentum=0.2, scale=3.0, constraint=constraint, weight_decay=0.0 if constraint else 0.1, norm_kwargs=kw)
    number = LMONorm[norm_type.upper().replace('_', '')]
    dev = relative_deviation(lambda ps: SCION(ps, norm_type=norm_type, **h),
                             lambda ps: pytorch_optimizer.SCION(ps, norm_type=number, **h), shapes)
    assert dev < 1e-4


# %% the peers' deviations, shown in chapter 79: ours follow the papers

def test_adamuon_sign_step_changes_the_direction():
    gen = torch.Generator().manual_seed(3)
    hist = [torch.randn(16, 32, generator=gen) * torch.logspace(-2, 0, 32) for _ in range(5)]
    steps = []
    for sign in (True, False):
        p = torch.zeros(16, 32, requires_grad=True)
        opt = AdaMuon([p], lr=1.0, sign_stabilize=sign)
        for g in hist: p.grad = g.clone(); before = p.detach().clone(); opt.step()
        steps.append((p.detach() - before).flatten())
    assert torch.nn.functional.cosine_similarity(*steps, dim=0) < 0.99      # measured 0.61
    for s in steps: assert s.pow(2).mean().sqrt() == pytest.approx(0.2, rel=1e-6)   # RMS alignment


def test_normuon_leaves_the_gradient_alone():
    p = torch.nn.Parameter(torch.randn(6, 4)); g = torch.randn(6, 4); p.grad = g.clone()
    NorMuon([p]).step()
    assert torch.equal(p.grad, g)


def test_scion_constrained_weight_decay_is_applied():
    w0, g = torch.randn(6, 4), torch.randn(6, 4)
    after = []
    for wd in (0.0, 0.5):
        p = torch.nn.Parameter(w0.clone()); p.grad = g.clone()
        SCION([p], lr=0.1, constraint=True, weight_decay=wd).step(); after.append(p.detach())
    torch.testing.assert_close(after[1], after[0] - 0.1 * 0.5 * 0.9 * w0, rtol=0, atol=1e-6)   # (1-γλ) then (1-γ)


# %% SCION's own contract

def test_scion_accepts_lmonorm_numbers():
    for number, name in enumerate(LMO_NORMS):
        if name in ('spectral_conv',): continue
        shape = (5,) if name == 'bias' else (6, 4)
        ps = [torch.nn.Parameter(torch.ones(*shape)) for _ in range(2)]
        for p in ps: p.grad = torch.linspace(-1, 1, p.numel()).reshape(shape)
        SCION([ps[0]], norm_type=name).step(); SCION([ps[1]], norm_type=LMONorm(number)).step()
        assert torch.equal(ps[0], ps[1]), name


@pytest.mark.parametrize('bad,match', [
    (dict(norm_type='spectralconv'), 'norm_type'), (dict(norm_kwargs={'max_scale': True}), r"norm_kwargs \['max_scale'\]"),
    (dict(norm_type='sign', norm_kwargs={'transpose': True}), 'norm_kwargs'), (dict(norm_kwargs=[1]), 'norm_kwargs'),
    (dict(momentum=0.0), 'momentum'), (dict(momentum=1.5), 'momentum'), (dict(scale=0.0), 'scale'),
    (dict(norm_type='spectral_conv'), 'spectral_conv'), (dict(norm_type=9), 'norm_type')])
def test_scion_rejects_bad_hyperparameters(bad, match):
    with pytest.raises(ValueError, match=f'SCION: .*{match}'):
        SCION([torch.nn.Parameter(torch.randn(3, 4))], **bad)


def test_scion_auto_refuses_five_dimensions():
    with pytest.raises(ValueError, match='SCION: .*auto'):
        SCION([torch.nn.Parameter(torch.randn(2, 2, 2, 2, 2))])


def test_scion_constrained_stays_in_the_spectral_ball():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(32, 128, generator=gen)
    B = 3 * torch.linalg.qr(torch.randn(32, 16, generator=gen))[0].T @ A
    W = torch.zeros(16, 32, requires_grad=True)
    opt = SCION([W], lr=0.05, constraint=True, scale=2.0, norm_kwargs={'ns_coeffs': 'polar_express'})
    for _ in range(200):
        opt.zero_grad(); (0.5 * ((W @ A - B) ** 2).sum() / 128).backward(); opt.step()
        assert torch.linalg.matrix_norm(W.detach(), ord=2) < 1.13 * 2.0 * 0.5 ** 0.5   # Polar Express's σ ≤ 1.13


@pytest.mark.parametrize('cls,kw', [(AdaMuon, {}), (NorMuon, {}), (NorMuon, {'update_scale': 'match_rms'}),
                                    (SCION, {'constraint': True}), (SCION, {'norm_type': 'sign'})])
def test_zero_gradients_and_resume(cls, kw):
    "All-zero gradients leave the weights bit-identical (SCG: shrunk by 1 - γ); state_dict → load_state_dict continues identically"
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4)] if kw.get('norm_type') == 'sign' else [(6, 4), (3, 2, 3, 3), (5,)]
    ps = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    opt = cls(ps, **kw)
    before = [p.detach().clone() for p in ps]
    for p in ps: p.grad = torch.zeros_like(p)
    opt.step()
    shrink = 1 - 1e-3 if kw.get('constraint') else 1.0        # SCG's (1 - γ)w acts at any gradient, like weight decay
    assert all(torch.equal(p, b * shrink if shrink != 1.0 else b) for p, b in zip(ps, before))
    grads = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(12)]
    for gs in grads[:6]:
        for p, g in zip(ps, gs): p.grad = g.clone()
        opt.step()
    saved, snapshot = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]
    qs = [torch.nn.Parameter(s.clone()) for s in snapshot]
    resumed = cls(qs, **kw); resumed.load_state_dict(saved)
    for gs in grads[6:]:
        for p, q, g in zip(ps, qs, gs): p.grad, q.grad = g.clone(), g.clone()
        opt.step(); resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


@pytest.mark.parametrize('norm_type,shape,kw', [
    ('auto', (16, 32), None), ('auto', (8, 4, 3, 3), None), ('auto', (5,), None), ('spectral', (6, 4), {'max_scale': True, 'normalize': False}),
    ('sign', (6, 4), None), ('sign', (6, 4), {'zero_init': True}), ('col', (6, 4), None), ('row', (6, 4), None),
    ('col', (6, 4), {'transpose': True, 'normalized': True}), ('row', (6, 4), {'normalized': False}), ('none', (6, 4), None)])
def test_scion_init_draws_as_pytorch_optimizer(norm_type, shape, kw):
    "SCION.init() puts each weight where pytorch-optimizer's does, from the same torch random state"
    a = torch.nn.Parameter(torch.randn(*shape)); b = torch.nn.Parameter(a.detach().clone())
    torch.manual_seed(0); SCION([a], norm_type=norm_type, norm_kwargs=kw, scale=2.0).init()
    torch.manual_seed(0); pytorch_optimizer.SCION([b], norm_type=LMONorm[norm_type.upper().replace('_', '')], norm_kwargs=kw, scale=2.0).init()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_scion_init_is_on_the_spectral_sphere():
    w = torch.nn.Parameter(torch.randn(16, 32))
    SCION([w], scale=2.0).init()
    torch.testing.assert_close(torch.linalg.svdvals(w.detach()), torch.full((16,), 2 * 0.5 ** 0.5), rtol=1e-6, atol=1e-6)
