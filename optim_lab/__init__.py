__version__ = "0.1.0"
# This file is kept by hand (nbdev only updates the version line); everything else is exported from nbs/.
from .core import LabOptimizer
from .registry import register, load_optimizer, create_optimizer, list_optimizers, optimizer_table


def __getattr__(name: str):
    "`from optim_lab import Adam`: every registered optimizer, by its class name"
    if not name[:1].isupper(): raise AttributeError(f"module 'optim_lab' has no attribute {name!r}")
    try: cls = load_optimizer(name)
    except ValueError: cls = None
    if cls is None or cls.__name__ != name: raise AttributeError(f"module 'optim_lab' has no attribute {name!r}")
    return cls
