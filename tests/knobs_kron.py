"Toy-problem knobs for chapter 77 (Kron); merged by conftest.py"

# Kron's probes come from torch's global generator, one draw per tensor per fit step in the order of the parameters,
# and the fit counter is shared by the whole optimizer: a tensor's trajectory depends on which other tensors draw
# before it.
CROSS_PARAM = {'Kron'}

# The random probes set the fitted Q: the one-process reference of tests/test_distributed.py draws other probes than
# the 2 ranks (a different generator state), so its noise floor is the size of the step. Both ranks agree, under FSDP2
# and DDP (the probes are broadcast from rank 0); the sharded and the replicated step are checked against one process
# with the same seed instead, and a dcp round trip with the generator's state restored.
ROUNDING_CHAOTIC = {'Kron': 'its random probes differ between the one-process reference and the ranks; '
                            'see tests/test_kron.py::test_fsdp2_sharded_step_equals_one_process'}
