"""Fuzzing the ring engine: one case runner shared by hypothesis, a timed loop and atheris."""
