"""Parallelism: one module or package per strategy, each registered once in `registry.py`.

`single` (one device), `ring` (roundhouse's ring all-reduce), `ps` (the parameter server) and
`deepspeed` (ZeRO, pipeline, tensor and expert parallel). The loop talks to a `Strategy`
(`base.py`) and never learns which one it has; launch/ and cluster/ ask the strategy class
what it checks and needs instead of testing its kind.
"""
