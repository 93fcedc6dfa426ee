"Toy-problem knobs for chapter 70 (ScheduleFreeSGD, ScheduleFreeAdamW, ScheduleFreeRAdam), merged by conftest.py"
# ScheduleFreeRAdam's default (silent_sgd_phase=True) takes no step while RAdam's rectifier is off, which is each
# parameter's first four steps with beta2 = 0.999; the contract's group added after three steps would not have moved
# yet. Its contract runs take the rectifier-off phase as SGD steps of size lr instead; the default is checked against
# the float64 transcription, eagerly and compiled, in tests/test_schedule_free.py.
TOY_LR: dict[str, float] = {}
TOY_HYPERS: dict[str, dict] = {'ScheduleFreeRAdam': {'silent_sgd_phase': False}}
CROSS_PARAM: set[str] = set()

# Schedule-free SGD's default lr is 1.0 (an SGD step size): at 1e-2 its 20 steps move the loss by ~0.03; at 0.1 by ~0.2.
FASTAI_FIT = {'ScheduleFreeSGD': dict(lr=0.1)}
