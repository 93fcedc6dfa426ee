"Toy-problem knobs for chapter 70 (ScheduleFreeSGD, ScheduleFreeAdamW, ScheduleFreeRAdam), merged by conftest.py"
# ScheduleFreeRAdam's default (silent_sgd_phase=True) takes no step while RAdam's rectifier is off, which is each
# parameter's first four steps with beta2 = 0.999; the contract's group added after three steps would not have moved
# yet. Its contract runs take the rectifier-off phase as SGD steps of size lr instead; the default is checked against
# the float64 transcription, eagerly and compiled, in tests/test_schedule_free.py.
TOY_LR: dict[str, float] = {}
TOY_HYPERS: dict[str, dict] = {'ScheduleFreeRAdam': {'silent_sgd_phase': False}}
CROSS_PARAM: set[str] = set()
