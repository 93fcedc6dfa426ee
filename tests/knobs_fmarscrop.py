"Toy-problem knobs for FMARSCrop, FMARSCropExMachina and FMARSCropV2 (chapter 49), merged by conftest.py"

TOY_HYPERS = {
    # switch ExMachina's adaptive ε on, so that the contract (compile, FSDP2, zeros, resume) covers it; FMARSCrop covers
    # the same update function with the fixed ε
    'FMARSCropExMachina': dict(eps_floor=1e-8),
}
