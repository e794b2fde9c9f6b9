"""Parallelism beyond data parallelism: sequence parallelism (sequence.py) and the device mesh (mesh.py)."""
