"Toy-problem knobs for the sign family (chapters 31-33), merged by conftest.py"

TOY_LR = {
    # signSGD moves every coordinate by exactly ±lr: at lr=1e-2 the toy MLP's one-element `scale` parameter flips
    # sign an even number of times in 10 steps and lands exactly where it started (test_two_param_groups)
    'SignSGD': 3e-3,
}
