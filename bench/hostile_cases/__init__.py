"""Hostile-peer cases for bench/hostile.py.

``engine.py`` attacks the storage engine's endpoints (ENGINE_CASES); ``vm.py``,
if present, the VM endpoints (VM_CASES). ``base.py`` holds what cases share.
"""
