"""The 2-rank harness of the sharded tests: a test file runs itself as a script on 2 gloo CPU ranks on localhost
(`optim_lab.distributed.run_ranks`: a free port, torchrun's environment, both exit codes checked, the other rank
killed when one fails), each rank calls the file's worker with a 1-D device mesh over both ranks, saves what it
returns to `rank<r>.pt`, and leaves together (`leave_process_group`: a barrier, then destroy, then exit without
Python's finalisation of gloo's objects, so neither rank tears down while the other still talks to the store).

In a test file:

    from distributed_harness import is_rank, rank_results, serve_rank, shard_rows

    def _worker(mesh, out_dir): ...                  # runs on each rank; returns what that rank saves

    def test_...(tmp_path):
        ranks = rank_results(__file__, tmp_path)     # [rank 0's result, rank 1's result]

    if is_rank(__name__): serve_rank(_worker)        # the file's last line
"""
from __future__ import annotations
import sys
from datetime import timedelta
from pathlib import Path

import torch

NPROC = 2
RANK_ARG = 'rank-worker'        # argv[1] of a test file run as a rank; argv[2] is the results directory
TIMEOUT = 240.0                 # seconds for the whole 2-rank run
PG_TIMEOUT = timedelta(seconds=60)


def is_rank(module_name: str) -> bool:
    "Is this module running as one of the ranks? (`is_rank(__name__)`; a file may skip pytest-only imports then)"
    return module_name == '__main__' and sys.argv[1:2] == [RANK_ARG]


def rank_results(test_file, out_dir, timeout: float = TIMEOUT) -> list:
    "Run `test_file` on 2 ranks (its `serve_rank` line does the work) with results in `out_dir`: each rank's result"
    from optim_lab.distributed import run_ranks
    out_dir = Path(out_dir)
    run_ranks(test_file, RANK_ARG, out_dir, nproc=NPROC, timeout=timeout)
    return [torch.load(out_dir / f'rank{r}.pt', weights_only=False) for r in range(NPROC)]


def serve_rank(work):
    """This process is one rank: join the gloo group, `work(mesh, out_dir)` on a 1-D CPU mesh over every rank, save its
    result to out_dir/rank<r>.pt, leave together. A failing `work` exits non-zero (run_ranks reports both ranks' output)"""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from optim_lab.distributed import leave_process_group
    out_dir = Path(sys.argv[2])
    dist.init_process_group('gloo', timeout=PG_TIMEOUT)
    mesh = init_device_mesh('cpu', (dist.get_world_size(),))
    result = work(mesh, out_dir)
    torch.save(result, out_dir / f'rank{dist.get_rank()}.pt')
    leave_process_group()


def shard_rows(mesh):
    "t -> t as a DTensor sharded on dim 0 over `mesh`, as FSDP2 shards a parameter (uneven shards: ceil(n/2) rows first)"
    from torch.distributed.tensor import Shard, distribute_tensor
    return lambda t: distribute_tensor(t, mesh, [Shard(0)])


def chain_run(modules, loss_of, shapes, steps: int, shard=None, dtype=torch.float64) -> list:
    """`steps` steps of `Modular(ps, *modules)` from seeded normal starts of `shapes` (sharded by `shard`, or whole), with a
    closure whose loss, the sum of `loss_of(w)` over the parameters, sees each whole tensor (`full_tensor()` on shards,
    as FSDP2's forward gives it); the final parameters, whole, as lists"""
    from optim_lab.modular import Modular
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(shard(t) if shard else t.clone()) for t in (torch.randn(s, generator=g, dtype=dtype) for s in shapes)]
    opt = Modular(ps, *modules)
    def closure(backward=True):
        loss = sum(loss_of(p.full_tensor() if shard else p) for p in ps)
        if backward:
            opt.zero_grad(); loss.backward()
        return loss
    for _ in range(steps): opt.step(closure)
    return [(p.full_tensor() if shard else p.detach()).tolist() for p in ps]
