"Toy-problem knobs for chapter 71 (Prodigy, DAdaptAdam, DAdaptSGD), merged by conftest.py"
# lr multiplies the estimated step size d: these optimizers are meant to run at lr=1, where d alone sets the step.
TOY_LR = {'Prodigy': 1.0, 'DAdaptAdam': 1.0, 'DAdaptSGD': 1.0}
# D-Adapted Adam overshoots on the toy MLP without a warm-up: d reaches 0.34 within 10 steps and the loss climbs from
# 0.77 to 60 (pytorch-optimizer's DAdaptAdam does the same). A growth limit of 10% per step is the authors' remedy
# for early divergence; with it the loss is 0.001 after 150 steps.
# The distributed contract runs only 5 steps: from d0 = 1e-6 the weights move by less than 1e-4 there (Prodigy 9.8e-5,
# D-Adapted SGD 1e-6), too little to compare 2 ranks with one process, so the toy problems start at a larger d0.
TOY_HYPERS = {'Prodigy': dict(d0=1e-3), 'DAdaptAdam': dict(d0=1e-3, growth_rate=1.1), 'DAdaptSGD': dict(d0=1e-2)}
# d is estimated from sums over every parameter of a group (‖s‖₁, ⟨g, θ_0 − θ⟩, ‖g_0‖), so a parameter's step
# depends on the others in its group.
CROSS_PARAM = {'Prodigy', 'DAdaptAdam', 'DAdaptSGD'}
# At lr 1 Prodigy's steps reach d = 0.18 per coordinate on the compile contract's sin(3θ) gradients, where the
# trajectory amplifies small changes about a thousandfold. It compiles within the default tolerance since the compiled
# step's scalars are float64 0-d tensors, as eager's Python floats are (with float32 ones, 1 − β2 = 9.99987e-4 carried
# the compiled trajectory 1.7e-3 away).
COMPILE_ATOL = {}

# D-Adaptation SGD's estimate starts at d0 = 1e-6 and needs more than 20 steps to reach a useful step size (at lr=1
# the loss has not moved after 60); at lr=3 over 3 epochs it falls from 2.30 to ~1.0.
FASTAI_FIT = {'DAdaptSGD': dict(lr=3.0, n_epoch=3, min_drop=0.3)}
