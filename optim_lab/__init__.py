__version__ = "0.1.0"
# This file is kept by hand (nbdev only updates the version line); everything else is exported from nbs/.
from .core import LabOptimizer
from .registry import register, load_optimizer, create_optimizer, list_optimizers, optimizer_table

from .toolkit.transforms import (unit_norm, agc, centralize_gradient, centralize, normalize_gradient, norm_loss_grad,
                                 rms_clip, norm_clip)
from .toolkit.wrappers import OptimizerWrapper, Lookahead, SAM, PCGrad, pcgrad_project
from .toolkit.ema import EMA
from .orthograd import OrthoGrad, orthogonalize_, orthograd_opt_func
from .toolkit.schedules import (linear_warmup, explore_exploit, get_chebyshev_steps, get_chebyshev_permutation,
                                get_chebyshev_perm_steps, get_chebyshev_lr_lambda, get_chebyshev_schedule, fastai_schedule,
                                WSD_COOLDOWN_TYPES, wsd_cooldown, get_wsd_scheduler_lambda, get_wsd_schedule)
from . import functional
from . import modular


def __getattr__(name: str):
    "`from optim_lab import Adam`: every registered optimizer, by its class name"
    if not name[:1].isupper(): raise AttributeError(f"module 'optim_lab' has no attribute {name!r}")
    try: cls = load_optimizer(name)
    except ValueError: cls = None
    if cls is None or cls.__name__ != name: raise AttributeError(f"module 'optim_lab' has no attribute {name!r}")
    return cls
