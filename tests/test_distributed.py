"""The distributed contract: every registered optimizer, on 2 gloo CPU processes under FSDP2 and under DDP, ends
where one process ends; its sharded state is DTensors; `torch.distributed.checkpoint` resumes it bit for bit.

Everything distributed happens in ONE spawn of 2 ranks (this file run as a script by tests/distributed_harness.py,
`worker`), which saves each rank's results to a file; the tests below read them, compute the one-process references
here, and assert per optimizer, so a failure names it. Parametrized over the registry: an optimizer added later is covered.
"""
from __future__ import annotations
import json, os
from functools import lru_cache
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest
import torch
from torch import nn

from optim_lab.core import LabOptimizer
from optim_lab.distributed import bytes_gathered, full_tensor, local_shard_like, run_ranks

from conftest import ALL, ROUNDING_CHAOTIC, make_opt, opt_class
from distributed_harness import is_rank, rank_results, serve_rank

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT = 5, 3     # steps per run; the checkpoint test saves after SAVE_AT and resumes for the rest
BATCH = 8                 # the total batch; each of the 2 ranks takes half
FLOAT_TOL = 1e-6          # max |w_2 ranks - w_1 process| allowed beyond the optimizer's own noise floor
FLOOR_FACTOR = 10         # ... and this many times that floor


# %% The model, the data and the training loop: shared by the worker (2 ranks) and the references (1 process)

class ContractNet(nn.Module):
    "Uneven shards on 2 ranks: conv kernels with 5 and 1 output channels (rank 1 holds no row of the second), a wide 3x16 matrix, a 1-row head; 1-D biases"
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(2, 5, 3, padding=1)
            self.squeeze = nn.Conv2d(5, 1, 3, padding=1)
            self.wide = nn.Linear(16, 3)
            self.head = nn.Linear(3, 1)
    def layers(self): return [self.conv, self.squeeze, self.wide, self.head]
    def forward(self, x):
        h = torch.tanh(self.squeeze(torch.tanh(self.conv(x))))
        return self.head(torch.tanh(self.wide(h.flatten(1))))


def contract_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 2, 4, 4, generator=g), torch.randn(BATCH, 1, generator=g)


def half(t: torch.Tensor, rank: int) -> torch.Tensor: return t.chunk(2)[rank]


def loss_fn(model, x, y): return ((model(x) - y) ** 2).mean()


# Controls that are not registered optimizers: they check that the harness can tell right from wrong.
class PerShardNormSGD(LabOptimizer):
    "WRONG under FSDP on purpose: g / ||g|| with the norm of this rank's shard only (`.to_local()`)"
    def __init__(self, params, lr=1e-2): super().__init__(params, dict(lr=lr))
    def update(self, p, grad, state, group):
        local = grad.to_local() if hasattr(grad, 'to_local') else grad
        return grad / (torch.linalg.vector_norm(local).item() + 1e-12)

def orthogonalize(m: torch.Tensor) -> torch.Tensor:
    "U V^T of the matrix m (flattened after dim 0), by SVD; 1-D tensors are returned as they are"
    if m.dim() < 2: return m
    u, _, vh = torch.linalg.svd(m.flatten(1), full_matrices=False)
    return (u @ vh).view_as(m)

class FullMatrixOrthoSGD(LabOptimizer):
    "A matrix rule done right: gather the gradient with `full_tensor`, orthogonalize it, keep this rank's shard"
    def __init__(self, params, lr=1e-2): super().__init__(params, dict(lr=lr))
    def update(self, p, grad, state, group):
        if grad.dim() < 2: return grad  # element-wise where there is no matrix: no gather
        return local_shard_like(orthogonalize(full_tensor(grad)), grad)

class PerShardOrthoSGD(LabOptimizer):
    "WRONG under FSDP on purpose: orthogonalizes this rank's rows only, as a peer that reaches for the local tensor"
    def __init__(self, params, lr=1e-2): super().__init__(params, dict(lr=lr))
    def update(self, p, grad, state, group):
        if not hasattr(grad, 'to_local'): return orthogonalize(grad)
        local = grad.to_local()
        out = orthogonalize(local) if local.numel() else local
        return type(grad).from_local(out, grad.device_mesh, grad.placements, shape=grad.shape, stride=grad.stride())

CONTROLS = {c.__name__: c for c in (PerShardNormSGD, FullMatrixOrthoSGD, PerShardOrthoSGD)}


# Second-order optimizers backpropagate through the gradient (`backward(create_graph=True)`), but the gradient that
# FSDP2 reduce-scatters and DDP all-reduces is not differentiable: these cannot run here, and are skipped (by name).
def cannot_run_distributed(name: str) -> str | None:
    if needs(name, 'needs_create_graph'):
        return (f"{name} needs the gradient's graph (needs_create_graph), and PyTorch's FSDP2 reduce-scatter and DDP "
                "all-reduce do not backpropagate: it should refuse DTensor/DDP parameters at construction")
    return None


def build(name: str, params):
    return CONTROLS[name](params) if name in CONTROLS else make_opt(name, params)


def needs(name: str, flag: str) -> bool:
    return name not in CONTROLS and bool(getattr(opt_class(name), flag, False))


def train(name, model, opt, x, y, steps, reduce=lambda loss: loss, loss_fn=loss_fn):
    "`steps` steps on (x, y); the closure returns the loss averaged over ranks (`reduce`), as a line search needs"
    create_graph = needs(name, 'needs_create_graph')
    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward(create_graph=create_graph)
        return reduce(loss.detach().clone())
    for _ in range(steps):
        if needs(name, 'needs_closure'): opt.step(closure)
        else:
            closure()
            opt.step()


# %% The worker: 2 ranks run every optimizer under FSDP2, DDP and a checkpoint round trip

def worker(mesh, out_dir: Path):
    import torch.distributed as dist
    rank = mesh.get_rank()
    x, y = (half(t, rank) for t in contract_data())
    def mean_over_ranks(loss):
        dist.all_reduce(loss)
        return loss / dist.get_world_size()
    results = {}
    for name in [*ALL, *CONTROLS]:
        if cannot_run_distributed(name): continue
        results[name] = r = {}
        r['fsdp'] = attempt(lambda: run_fsdp(name, mesh, x, y, mean_over_ranks, r, out_dir))
        r['ddp'] = attempt(lambda: run_ddp(name, x, y, mean_over_ranks))
    return results


def attempt(run):
    "`run()`, or the error as a string"
    try: return run()
    except Exception as e: return f'{type(e).__name__}: {e}'


def fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard
    model = ContractNet()
    for layer in model.layers(): fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def run_fsdp(name, mesh, x, y, reduce, record: dict, out_dir):
    "Full weights after STEPS steps; records state placements, the checkpoint round trip and bytes gathered in `record`"
    torch.manual_seed(0)   # an optimizer that draws random numbers (Kron's probes) draws the same ones as the references
    model = fsdp_model(mesh)
    try: opt = build(name, model.parameters())
    except Exception as e:
        record['refused'] = f'{type(e).__name__}: {e}'
        return None
    with bytes_gathered() as meter: train(name, model, opt, x, y, STEPS, reduce)
    record['bytes_gathered_per_step'] = meter.bytes / STEPS
    record['state_problems'] = state_problems(opt)
    full = [p.full_tensor() for p in model.parameters()]
    record['dcp'] = attempt(lambda: resumed_weights(name, mesh, x, y, reduce, Path(out_dir) / f'ckpt_{name}'))
    return full


def state_problems(opt) -> list[str]:
    """Every parameter-shaped state tensor of a sharded parameter that is not a DTensor with the parameter's placement
    (0-dim scalars excepted; statistics of another shape, such as Shampoo's factor matrices, are replicated on
    every rank, and the checkpoint test holds them to an exact resume)"""
    from torch.distributed.tensor import DTensor
    problems = []
    for i, p in enumerate(p for g in opt.param_groups for p in g['params']):
        for key, v in opt.state.get(p, {}).items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape != p.shape: continue
            if not isinstance(v, DTensor): problems.append(f'param {i} state {key!r}: a plain {type(v).__name__}')
            elif v.placements != p.placements or v.device_mesh != p.device_mesh:
                problems.append(f'param {i} state {key!r}: placements {v.placements}, param {p.placements}')
    return problems


def resumed_weights(name, mesh, x, y, reduce, path):
    "SAVE_AT steps, `dcp.save`, load into a fresh model and optimizer, STEPS - SAVE_AT more: the full weights"
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    torch.manual_seed(0)
    model = fsdp_model(mesh)
    opt = build(name, model.parameters())
    train(name, model, opt, x, y, SAVE_AT, reduce)
    msd, osd = get_state_dict(model, opt)
    dcp.save({'model': msd, 'optim': osd}, checkpoint_id=str(path))
    rng = torch.get_rng_state()   # a training script checkpoints its RNG too; get_state_dict below may step (and draw)
    model = fsdp_model(mesh)
    opt = build(name, model.parameters())
    msd, osd = get_state_dict(model, opt)
    loaded = {'model': msd, 'optim': osd}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=loaded['model'], optim_state_dict=loaded['optim'])
    torch.set_rng_state(rng)
    steps = {s['step'] for s in opt.state.values() if 'step' in s}
    if steps and steps != {SAVE_AT}: raise AssertionError(f'resumed at step {steps}, saved at {SAVE_AT}')
    train(name, model, opt, x, y, STEPS - SAVE_AT, reduce)
    return [p.full_tensor() for p in model.parameters()]


def run_ddp(name, x, y, reduce):
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = DDP(ContractNet())
    opt = build(name, model.parameters())
    train(name, model, opt, x, y, STEPS, reduce)
    return [p.detach().clone() for p in model.module.parameters()]


# %% The tests: read the ranks' results, compare with one process

@pytest.fixture(scope='module')
def ranks(tmp_path_factory) -> list[dict]:
    "Spawn the 2 ranks once for the whole module; each rank's results"
    return rank_results(__file__, tmp_path_factory.mktemp('distributed'))


@lru_cache(maxsize=None)
def reference(name: str):
    "(initial weights, weights after STEPS steps in one process, the noise floor)"
    x, y = contract_data()
    model = ContractNet()
    init = [p.detach().clone() for p in model.parameters()]
    opt = build(name, model.parameters())
    torch.manual_seed(0)
    train(name, model, opt, x, y, STEPS)
    return init, [p.detach().clone() for p in model.parameters()], noise_floor(name)


def noise_floor(name: str) -> float:
    "How far one process moves when each gradient is the mean of two half-batch gradients: float32's own noise for this rule"
    x, y = contract_data()
    model, ref = ContractNet(), ContractNet()
    opt, ref_opt = build(name, model.parameters()), build(name, ref.parameters())
    torch.manual_seed(0)
    train(name, ref, ref_opt, x, y, STEPS)
    def halves_loss(m, x, y): return (loss_fn(m, half(x, 0), half(y, 0)) + loss_fn(m, half(x, 1), half(y, 1))) / 2
    torch.manual_seed(0)
    train(name, model, opt, x, y, STEPS, loss_fn=halves_loss)
    return max_dev(list(model.parameters()), list(ref.parameters()))


def max_dev(a, b) -> float:
    return max((u.detach().double() - v.detach().double()).abs().max().item() for u, v in zip(a, b, strict=True))


def tolerance(floor: float) -> float: return max(FLOAT_TOL, FLOOR_FACTOR * floor)


def results_of(name, ranks) -> tuple[dict, dict]:
    if (why := cannot_run_distributed(name)): pytest.skip(why)
    return ranks[0][name], ranks[1][name]


def check_matches_one_process(name, ranks, mode):
    r0, r1 = results_of(name, ranks)
    if mode == 'fsdp' and 'refused' in r0:  # allowed: refusing FSDP at construction, saying why
        assert 'FSDP' in r0['refused'] or 'DTensor' in r0['refused'], f"{name} refused with an unclear error: {r0['refused']}"
        return
    for r in (r0, r1): assert not isinstance(r[mode], str), f"{name} under {mode}: {r[mode]}"
    assert all(torch.equal(u, v) for u, v in zip(r0[mode], r1[mode])), f'{name} under {mode}: the ranks disagree'
    if name in ROUNDING_CHAOTIC: pytest.skip(f'{name}: {ROUNDING_CHAOTIC[name]}')
    init, one, floor = reference(name)
    assert max_dev(one, init) > 100 * tolerance(floor), f'{name}: the weights hardly moved; the comparison is empty'
    dev = max_dev(r0[mode], one)
    assert dev <= tolerance(floor), f'{name} under {mode}: max |w - w_1 process| = {dev:.2e} > {tolerance(floor):.2e} (noise floor {floor:.2e})'


def test_fsdp_matches_one_process(name, ranks): check_matches_one_process(name, ranks, 'fsdp')


def test_ddp_matches_one_process(name, ranks): check_matches_one_process(name, ranks, 'ddp')


def fsdp_ran(name, r: dict) -> dict:
    "The rank's FSDP record, skipping an optimizer that refused FSDP and failing one whose FSDP run crashed"
    if 'refused' in r: pytest.skip(f"{name} refuses FSDP: {r['refused']}")
    assert not isinstance(r['fsdp'], str), f"{name} under fsdp: {r['fsdp']}"
    return r


def test_sharded_state_is_dtensor_with_param_placement(name, ranks):
    for rank in (0, 1):
        problems = fsdp_ran(name, results_of(name, ranks)[rank])['state_problems']
        assert problems == [], f"{name} on rank {rank}: {problems}"


def test_dcp_resume_is_exact(name, ranks):
    "N steps, dcp.save, load into a fresh model and optimizer, M more steps == N + M steps, bit for bit, on both ranks"
    for rank in (0, 1):
        r = fsdp_ran(name, results_of(name, ranks)[rank])
        assert not isinstance(r['dcp'], str), f"{name}: checkpoint round trip failed on rank {rank}: {r['dcp']}"
        for i, (u, v) in enumerate(zip(r['dcp'], r['fsdp'], strict=True)):
            assert torch.equal(u, v), f'{name}: param {i} after resume differs by {max_dev([u], [v]):.2e}'


# %% The harness has teeth, and the full-matrix helper is what makes a matrix rule right

@pytest.mark.parametrize('control', ['PerShardNormSGD', 'PerShardOrthoSGD'])
def test_harness_catches_per_shard_rules(control, ranks):
    _, one, floor = reference(control)
    assert max_dev(ranks[0][control]['fsdp'], one) > 100 * tolerance(floor)
    check_matches_one_process(control, ranks, 'ddp')  # under DDP every rank holds whole tensors: right


def test_full_matrix_helper_matches_one_process(ranks):
    check_matches_one_process('FullMatrixOrthoSGD', ranks, 'fsdp')


def test_bytes_gathered_is_the_missing_part_of_each_matrix(ranks):
    "Each step gathers, per rank, the rows of every matrix gradient it does not hold (4 bytes each), once; 1-D ones not at all"
    model = ContractNet()
    for rank in (0, 1):
        expected = sum((p.numel() - half_rows(p, rank).numel()) * 4 for p in model.parameters() if p.dim() >= 2)
        assert ranks[rank]['FullMatrixOrthoSGD']['bytes_gathered_per_step'] == expected
        assert ranks[rank]['PerShardNormSGD']['bytes_gathered_per_step'] == 0


def half_rows(p, rank): return p.tensor_split([-(-len(p) // 2)])[rank]  # FSDP2's dim-0 shard: ceil(n/2) rows first


# %% The example script

def test_example_trains_under_fsdp(tmp_path):
    out = run_ranks(REPO / 'examples' / 'train_distributed.py', '--opt', 'adam_w', '--mode', 'fsdp', '--steps', '40',
                    nproc=2, timeout=120)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary['opt'] == 'AdamW' and summary['mode'] == 'fsdp' and summary['world_size'] == 2
    assert summary['final_loss'] < 0.25 * summary['first_loss'] and summary['valid_accuracy'] > 0.8, summary


if is_rank(__name__): serve_rank(worker)
