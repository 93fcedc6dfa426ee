"Toy-problem knobs for chapter 29 (Ranger, Ranger21), merged by conftest.py"
# Ranger21 without `num_iterations` warms up over the untuned 2/(1 - beta2) = 2000 steps, far beyond the toy
# problem's 150: give it the toy's length, so that its own schedule (warm-up 33 steps, warm-down from step 108) fits.
# Ranger needs no knob: its default un-rectified phase is momentum SGD (degenerated_to_sgd=True), so a group added
# after some steps moves within 3 steps, as the contract asks.
TOY_LR: dict[str, float] = {}
TOY_HYPERS: dict[str, dict] = {'Ranger21': dict(num_iterations=150)}
# Ranger21's stable weight decay divides by the root of the mean second moment over all parameters.
CROSS_PARAM: set[str] = {'Ranger21'}
