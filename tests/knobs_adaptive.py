"Toy-problem knobs for the chapters 20-24 (AdaBelief, AdaBound/AMSBound, AdamD, DiffGrad, MADGRAD), merged by conftest.py"
# All six reach the contract's loss target with the default toy learning rate (1e-2) and their class defaults,
# so nothing is overridden here.
TOY_LR: dict[str, float] = {}
TOY_HYPERS: dict[str, dict] = {}
CROSS_PARAM: set[str] = set()
