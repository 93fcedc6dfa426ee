"""The namespace of modules, as torchzero's `tz.m`: `from optim_lab.modular import m; m.Adam(), m.LR(1e-3)`."""
# This file is kept by hand (helper H4); nbdev does not generate it. It re-exports every module class from
# first_order.py (nbs/61_modules.ipynb) and second_order.py (nbs/62_second_order.ipynb).
from .first_order import *
from .second_order import *
