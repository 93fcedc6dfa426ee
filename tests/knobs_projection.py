"Toy-problem knobs for the chapters 25-28 (AdamP, SGDP, AdaHessian, Nero, Shampoo); merged by conftest.py"

# Shampoo's steps shrink like AdaGrad's (~ 1/sqrt(t)) and SGDP is plain SGD by default (momentum=0): both need a
# larger learning rate than 1e-2 to halve the toy loss in 150 steps.
TOY_LR = {'Shampoo': 0.1, 'SGDP': 0.1, 'AdaHessian': 0.1}

# AdaHessian's Hessian-vector product z -> Hz runs over all parameters at once, so a parameter's estimate depends on
# the other parameters' Rademacher vectors (and on the shared random stream).
CROSS_PARAM = {'AdaHessian'}
LR0_GROUP_HYPERS = {'Nero': {'constraints': False}}  # Nero projects onto its constraint set at any lr, by design

# Shampoo's practical defaults precondition from step 20 on, with blocks of 512: the toy runs (the distributed ones take
# 5 steps on tensors of at most 16 entries a side) would only see its AdaGrad warm-up. Roots from step 2, recomputed
# every 2 steps, and blocks of 4 (the 3x16 matrix in four blocks, the 5-channel kernel's rows in two) put the roots,
# their reuse and the block partitioning under every contract, compile and FSDP2 check.
TOY_HYPERS = {'Shampoo': dict(start_preconditioning_step=2, preconditioning_compute_steps=2, block_size=4)}

# fastai's default moms drive Shampoo's mix of the gradient with the previous update to 0.95, which trains it slowly
# by design (chapter 28 trains it with moms=(0, 0, 0) past 0.95 accuracy); over 3 epochs at lr 1e-2 its valid loss
# still falls by 0.08-0.12 (4 batch orders), far beyond the +-0.005 of rounding, and that is what is asserted.
FASTAI_FIT = {'Shampoo': dict(lr=1e-2, n_epoch=3, min_drop=0.02), 'SGDP': dict(lr=0.1)}
