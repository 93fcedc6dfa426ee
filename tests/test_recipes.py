"Registered chains (chapter 88): found by name, built by create_optimizer and fastai, resumable, checked settings, tuned by the lab"
import copy, math
import pytest, torch
from torch import nn
from optim_lab import load_optimizer, list_optimizers, create_optimizer
from optim_lab.modular import Recipe, m

CHAINS = sorted(set(list_optimizers(chains=True)) - set(list_optimizers()))

def test_the_four_recipes_are_registered_chains():
    assert CHAINS == ['CautiousSOAPChain', 'GramsChain', 'LaPropChain', 'SignumChain']
    assert all(issubclass(load_optimizer(n), Recipe) for n in CHAINS)

def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 1))

def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g)
    return (model(x).squeeze(-1) - x[:, 0] * x[:, 1]).pow(2).mean()

def _train(opt, model, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad(); _loss(model, t).backward(); opt.step()

@pytest.mark.parametrize('name', CHAINS)
def test_loss_falls_and_no_decay_group(name):
    model = _model()
    opt = create_optimizer(model, name, lr=3e-3, weight_decay=1e-2)
    assert [g['weight_decay'] for g in opt.param_groups] == [1e-2, 0.0]
    before = _loss(model, 999).item()
    _train(opt, model, 60)
    assert _loss(model, 999).item() < 0.8 * before

@pytest.mark.parametrize('name', CHAINS)
def test_exact_resume(name):
    a = _model(); opt_a = load_optimizer(name)(a.parameters(), lr=3e-3, weight_decay=1e-2)
    _train(opt_a, a, 7)
    b = copy.deepcopy(a); opt_b = load_optimizer(name)(b.parameters(), lr=3e-3, weight_decay=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _train(opt_a, a, 5, start=7); _train(opt_b, b, 5, start=7)
    for p, q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q)

@pytest.mark.parametrize('name', CHAINS)
def test_bad_setting_names_the_module_and_value(name):
    opt = load_optimizer(name)(_model().parameters())
    with pytest.raises(ValueError, match='weight_decay'): opt.param_groups[0]['weight_decay'] = -1.0
    with pytest.raises(ValueError, match='WeightDecay'): load_optimizer(name)(_model().parameters(), weight_decay=-1.0)

def test_registering_a_non_optimizer_is_refused():
    from optim_lab.registry import register
    with pytest.raises(TypeError, match='Recipe'):
        register(type('NotAnOptimizer', (torch.optim.SGD,), {}))

def test_fastai_schedules_a_chain_momentum():
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (Learner.fit_one_cycle)
    from fastai.callback.progress import ProgressCallback  # noqa: F401  (Learner.no_bar)
    from optim_lab.fastai import digits_learner, HyperRecorder
    rec = HyperRecorder()
    learn = digits_learner('SignumChain', lr=1e-3, cbs=rec)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    moms = learn.recorder.hps['mom']
    rec.assert_follows('momentum', moms)
    assert max(moms) - min(moms) > 0.09

def test_the_lab_builds_and_fingerprints_chains():
    from optim_lab.lab import optimizer_factory, source_of, centre_lr, workload_named
    w = workload_named('tabular_mlp')
    opt = optimizer_factory('GramsChain', dict(lr=1e-2, weight_decay=1e-3, warmup=0.05), 60)([nn.Parameter(torch.zeros(3))])
    assert isinstance(opt, load_optimizer('GramsChain')) and opt.param_groups[0]['lr'] == 1e-2
    assert opt.param_groups[0]['weight_decay'] == 1e-3
    assert centre_lr('LaPropChain', w) == pytest.approx(4e-4 * w.lr / 1e-3)
    assert source_of('GramsChain') == source_of('SignumChain') != source_of('Adam')   # one module holds the recipes
