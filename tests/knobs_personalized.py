"Toy-problem knobs for Personalized-Optimizers' FCompass and TALON (chapters 45-46), merged by conftest.py"

TOY_LR = {
    # TALON's default lr is 1e-4 and its steps are about lr per coordinate, scaled by sign agreement |s| <= 1
    'TALON': 3e-2,
}
