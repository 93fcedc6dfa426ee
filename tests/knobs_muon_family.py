"Toy-problem knobs for chapter 79 (AdaMuon, NorMuon, SCION); merged by conftest.py"

# AdaMuon and NorMuon step the tensors with fewer than two dimensions with AdamW at its own, absolute `adamw_lr`, as
# Muon does (tests/knobs_muon_soap.py): the two-group test's lr=0 group gets adamw_lr=0 too.
LR0_GROUP_HYPERS = {'AdaMuon': {'adamw_lr': 0.0}, 'NorMuon': {'adamw_lr': 0.0}}

# SCION's `momentum` is the weight of the new gradient, d <- (1 - a) d + a g: one minus a decay. fastai's one-cycle
# would schedule it backwards (0.95 -> 0.85 makes the average shorter, then longer), so it maps no `mom`.
NO_FASTAI_MOM = {'SCION': "its momentum is the new gradient's weight (one minus a decay), not a decay rate"}
