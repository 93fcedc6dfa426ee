"Knobs for the chapters of the original optimizer.ipynb (10-17); merged by conftest.py"

# BAdam divides by softplus_50(|v_hat|), whose slope near 0 turns float32 rounding differences between the eager
# step (scalars in Python float64) and the compiled one (scalars in float32, fused kernels) into ~2e-4 after 20 steps.
COMPILE_ATOL = {'BAdam': 1e-3}
