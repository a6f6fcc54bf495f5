"""Executor: owns the device. Runs the step it is given and returns sampled tokens.

This package's ``__init__`` and ``plan``/``registry`` modules import no torch, so the
scheduler can import the step-plan types without pulling the device stack in.
"""
