"""Weight formats: the weight change ΔW (compute, save, load, apply), the original AnimateDiff
motion-module key layout, and the original (LDM) single-file SD layout."""
