"Toy-problem knobs for chapters 64-65 (Muon, SOAP); merged by conftest.py"

# Muon steps the tensors with fewer than two dimensions (the toy MLP's biases and `scale`) with AdamW at its own,
# absolute `adamw_lr`, which the two-group test's lr=0 does not reach: that group gets adamw_lr=0 too.
LR0_GROUP_HYPERS = {'Muon': {'adamw_lr': 0.0}}

# Rules whose one-process noise floor in tests/test_distributed.py is the size of their step, so that its 2-rank vs
# 1-process comparison cannot tell right from wrong.
# SOAP: its first-step factors are rank-deficient or nearly so (ContractNet's 3x16 and 1x3 layers, batch 8), rounding
# rotates their (near-)null eigenvectors, and Adam's 1/sqrt(V) amplifies that: floor 0.037 against a move of 0.12.
# Its sharded step is checked exactly instead (identical gradients): tests/test_muon_soap.py::test_fsdp2_sharded_step_equals_one_process.
ROUNDING_CHAOTIC = {'SOAP': 'first-step eigenbases of rank-deficient factors are set by rounding; '
                            'see tests/test_muon_soap.py::test_fsdp2_sharded_step_equals_one_process'}

# SOAP cuts dimensions above block_size (512 by default) into blocks: blocks of 4 put the toy tensors' blocks (each
# with its own factors, bases and slices of Adam's moments) under the contract and compile checks.
TOY_HYPERS = {'SOAP': dict(block_size=4)}
