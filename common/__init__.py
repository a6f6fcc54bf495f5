"""Torch-free pieces that every stage shares: the step plan and its wire form, process
helpers, CURVE keys, config parsing, the model registry. Importable as ``tessera.common``;
it imports nothing from the stages above it."""
