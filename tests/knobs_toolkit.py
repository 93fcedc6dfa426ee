"Toy-problem knobs for the toolkit's optimizers (nbs/52_pnm_stable_decay.ipynb)"
# AdamS decays every parameter by a factor that depends on the mean of v_hat over all parameters.
CROSS_PARAM = {'AdamS'}
