"Toy-problem knobs for the Fisher-family building blocks (chapters 40-43: cautious stepping, FAdam, ADOPT, MARS)"

# MARS steps tensors with fewer than two dimensions (the toy MLP's biases and `scale`) with AdamW at its own,
# absolute `lr_1d`, which the two-group test's lr=0 does not reach: that group gets lr_1d=0 too.
LR0_GROUP_HYPERS = {'MARS': {'lr_1d': 0.0}}
