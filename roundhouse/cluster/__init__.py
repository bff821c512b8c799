"""Everything that imports ray: the runtime (embedded or connected) and the worker group.

Nothing outside this package imports ray (DESIGN.md).
"""
