"Toy-problem knobs for chapter 29 (Ranger, Ranger21), merged by conftest.py"
# Ranger21 without `num_iterations` warms up over the untuned 2/(1 - beta2) = 2000 steps, far beyond the toy
# problem's 150: give it the toy's length, so that its own schedule (warm-up 33 steps, warm-down from step 108) fits.
# Ranger's default (degenerated_to_sgd=False) leaves the weights unchanged until rho_t > 5 (its sixth step); the
# contract's "a group added after some steps moves within 3 steps" needs the momentum-SGD phase instead. The
# no-step phase itself is tested in tests/test_ranger_peer.py and the chapter.
TOY_LR: dict[str, float] = {}
TOY_HYPERS: dict[str, dict] = {'Ranger21': dict(num_iterations=150), 'Ranger': dict(degenerated_to_sgd=True)}
# Ranger21's stable weight decay divides by the root of the mean second moment over all parameters.
CROSS_PARAM: set[str] = {'Ranger21'}
