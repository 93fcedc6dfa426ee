"""The modular chain (issue 14): `Modular(params, *modules)` with the modules in `optim_lab.modular.m`."""
# This file is kept by hand (helper H4); nbdev does not generate it. The chain is exported from nbs/60_modular.ipynb,
# the modules from nbs/61_modules.ipynb (first order) and nbs/62_second_order.ipynb.
from .chain import Module, Var, Modular, modular_opt_func
from . import m
