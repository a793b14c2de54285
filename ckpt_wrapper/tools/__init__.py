"""The tools around the library: the demo, the benchmark, its reports and the ``ckpt-wrapper`` CLI.

Nothing in the library core imports from here.
"""
