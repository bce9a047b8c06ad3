"""Measuring students against their teacher: sampling loops over any diffusers scheduler, distances to
the teacher's many-step output, and the training-recipe study of docs/recipe_study.md."""
