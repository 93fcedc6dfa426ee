"Toy-problem knobs for the memory-saving Adam family (chapters 72-73: AdaFactor, CAME, AdamMini)"

# AdaFactor's default relative step ignores lr (ρ_t = min(10⁻², 1/√t)), so the contract's lr=0 group and its toy lr
# would say nothing: the contract runs it on the lr it is given (relative_step=False), without the RMS(θ) scaling, and
# with a moderate lr. Its relative step is checked in tests/test_adafactor_came.py and in chapter 72.
TOY_HYPERS = {'AdaFactor': {'relative_step': False, 'scale_parameter': False}}
# CAME's default lr (2e-4) is far below the toy problem's scale.
TOY_LR = {'AdaFactor': 1e-2, 'CAME': 1e-2}
# CAME steps by m_t / sqrt(S_t), S_t the factored average of (û_t - m_t)²: where successive updates agree S_t is small
# and the step large, so a relative rounding difference is amplified. It compiles within the default tolerance since
# the compiled step's scalars are float64 0-d tensors (with float32 ones, 1 - β3 = 1 - 0.9999 was 1.7e-4 off and one
# element of 128 differed by 6.6e-4 after 20 steps).
COMPILE_ATOL = {}
