"""The trainer: config schema, the accelerate loop, checkpoints, metrics, samples and final outputs."""
