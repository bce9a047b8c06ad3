"""Toy worlds: the procedural toy clips and images, and the 2-D analytic problem the method is checked on."""
