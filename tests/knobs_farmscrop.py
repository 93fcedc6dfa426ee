"Toy-problem knobs for Personalized-Optimizers' FishMonger, FARMSCrop and FARMSCropV2 (chapters 47-48), merged by conftest.py"

# None needed: all three pass the contract at the default toy lr (1e-2, also their chapters' lr) with upstream's
# defaults otherwise, and compile within the default tolerance.
