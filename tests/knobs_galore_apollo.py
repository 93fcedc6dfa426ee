"Toy-problem knobs for chapter 80 (GaLore, APOLLO); merged by conftest.py"

# Without a `rank` both are plain AdamW: the contract tests set one for every group, so the toy MLP's matrices take
# the projected rule (rank 2, new bases every 10 steps: the 150-step toy run sees 15 refreshes).
TOY_HYPERS = {'GaLore': dict(rank=2, update_proj_gap=10), 'APOLLO': dict(rank=2, update_proj_gap=10)}

# APOLLO seeds each parameter's random projections with its position among the optimizer's parameters (as the
# authors' code does), so a parameter's path depends on where it sits, though no statistic is shared between tensors.
CROSS_PARAM = {'APOLLO'}
