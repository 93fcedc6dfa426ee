"""Train the digits CNN with any registered optimizer, on several processes, under FSDP2 or DDP.

    torchrun --nproc-per-node 2 examples/train_distributed.py --opt radam             # FSDP2 (the default)
    torchrun --nproc-per-node 2 examples/train_distributed.py --opt lamb --mode ddp
    torchrun --nproc-per-node 2 examples/train_distributed.py --opt adamw --save ckpt  # + a distributed checkpoint

On CPU the processes talk over gloo; on GPUs, use nccl and move the model and batches to `cuda:LOCAL_RANK`.
Every rank draws the same global batch and trains on its slice, so the run does not depend on the number of ranks
(up to BatchNorm, whose statistics are per rank). The last line printed is a JSON summary.
"""
from __future__ import annotations
import argparse, json, os, time

os.environ.setdefault('OMP_NUM_THREADS', '1')

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from optim_lab import create_optimizer, load_optimizer
from optim_lab.distributed import leave_process_group
from optim_lab.problems import digits_cnn, digits_data


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--opt', default='radam', help='a registered optimizer, e.g. adamw, radam, lamb')
    p.add_argument('--mode', choices=['fsdp', 'ddp'], default='fsdp')
    p.add_argument('--lr', type=float, default=1e-2)
    p.add_argument('--weight-decay', type=float, default=0.0)
    p.add_argument('--steps', type=int, default=100)
    p.add_argument('--batch-size', type=int, default=64, help='the global batch, split over the ranks')
    p.add_argument('--save', default=None, help='a directory for a torch.distributed.checkpoint at the end')
    return p.parse_args()


def wrap(model: nn.Module, mode: str) -> nn.Module:
    "FSDP2: every conv/linear layer, then the root (which keeps the BatchNorms); DDP: the whole model"
    if mode == 'ddp': return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)): fully_shard(layer)
    return fully_shard(model)


def mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x.item() / dist.get_world_size()


def train(model, opt, x, y, steps: int, batch_size: int) -> list[float]:
    "`steps` steps on random global batches (the same on every rank), each rank on its slice; the global losses"
    rank, world = dist.get_rank(), dist.get_world_size()
    g, losses = torch.Generator().manual_seed(0), []
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[:batch_size][rank::world]
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(mean_over_ranks(loss))
    return losses


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad(): return (model(x).argmax(1) == y).float().mean().item()


def save_checkpoint(model, opt, path: str):
    "Model and optimizer state, each rank writing its own shards"
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({'model': model_sd, 'optim': optim_sd}, checkpoint_id=path)


def main():
    args = parse_args()
    dist.init_process_group('gloo')  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    x, y, x_valid, y_valid = digits_data()
    model = wrap(digits_cnn(seed=0), args.mode)
    opt = create_optimizer(model, args.opt, lr=args.lr, weight_decay=args.weight_decay)
    start = time.perf_counter()
    losses = train(model, opt, x, y, args.steps, args.batch_size)
    seconds = time.perf_counter() - start
    acc = accuracy(model, x_valid, y_valid)
    if args.save: save_checkpoint(model, opt, args.save)
    if dist.get_rank() == 0:
        summary = dict(opt=load_optimizer(args.opt).__name__, mode=args.mode, world_size=dist.get_world_size(),
                       steps=args.steps, first_loss=losses[0], final_loss=sum(losses[-10:]) / len(losses[-10:]),
                       valid_accuracy=acc, seconds=round(seconds, 2))
        print(f"{summary['opt']} under {args.mode} on {summary['world_size']} ranks: loss {losses[0]:.3f} -> "
              f"{summary['final_loss']:.3f}, valid accuracy {acc:.3f}, {seconds:.1f} s")
        print(json.dumps(summary), flush=True)
    leave_process_group()  # together, and without Python's finalisation of gloo's objects


if __name__ == '__main__':
    main()
