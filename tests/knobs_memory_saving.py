"Toy-problem knobs for the memory-saving Adam family (chapters 72-73: AdaFactor, CAME, AdamMini)"

# AdaFactor's default relative step ignores lr (ρ_t = min(10⁻², 1/√t)), so the contract's lr=0 group and its toy lr
# would say nothing: the contract runs it on the lr it is given (relative_step=False), without the RMS(θ) scaling, and
# with a moderate lr. Its relative step is checked in tests/test_adafactor_came.py and in chapter 72.
TOY_HYPERS = {'AdaFactor': {'relative_step': False, 'scale_parameter': False}}
# CAME's default lr (2e-4) is far below the toy problem's scale.
TOY_LR = {'AdaFactor': 1e-2, 'CAME': 1e-2}
# CAME steps by m_t / sqrt(S_t), S_t the factored average of (û_t - m_t)²: where successive updates agree S_t is small
# and the step large, so a relative rounding difference is amplified. The compiled step computes 1 - β3 = 1 - 0.9999
# from a float32 0-d tensor (1.00017e-4, 1.7e-4 off), the eager one in Python's float64: after the compile test's 20
# steps one element of 128 differed by 6.6e-4 (in float64 the two agree to 2e-15, so the graph itself is right).
COMPILE_ATOL = {'CAME': 5e-3}
