"Toy-problem knobs for Adan, StableAdamW and SPAM (chapters 74-75)"

# SPAM's defaults reset its moments only at step 500 and clip only after 20 steps, so the contract tests (150 steps
# at most, 13 in the resume test) would see plain Adam: a reset every 10 steps, a 4-step warm-up, clipping from
# step 3 at a threshold the toy gradients cross right after each reset make them exercise all three.
TOY_HYPERS = {'SPAM': dict(update_proj_gap=10, warmup_epoch=4, grad_accu_steps=3, threshold=20.0)}
