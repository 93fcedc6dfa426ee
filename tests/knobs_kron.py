"Toy-problem knobs for chapter 77 (Kron); merged by conftest.py"

# Kron's probes come from torch's global generator, one draw per tensor per fit step in the order of the parameters,
# and the fit counter is shared by the whole optimizer: a tensor's trajectory depends on which other tensors draw
# before it.
CROSS_PARAM = {'Kron'}

# tests/test_distributed.py seeds torch's generator before every run (and carries it across the checkpoint), so
# the ranks draw the probes the one-process reference draws; the probes are broadcast from rank 0 under FSDP2 and DDP.
