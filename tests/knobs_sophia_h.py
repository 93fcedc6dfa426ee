"Toy-problem knobs for chapter 78 (SophiaH); merged by conftest.py"

# SophiaH's largest step of a coordinate is lr·p = 1e-4 at lr=1e-2 (p=1e-2): far too small to halve the toy loss in
# 150 steps. At lr=1 (a step of at most 1e-2) the loss falls from 0.765 to 0.0018.
TOY_LR = {'SophiaH': 1.0}

# Its Hessian-vector product z -> Hz runs over all due parameters at once, so a parameter's estimate depends on the
# other parameters' probe vectors (the off-diagonal blocks of H, and the shared random stream).
CROSS_PARAM = {'SophiaH'}
