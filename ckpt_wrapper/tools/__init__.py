"""The tools around the library: the demo, ``ckpt-wrapper bench`` (``bench``, ``bench_configs``,
``bench_report``), the benchmark toolkit every benchmark measures through (``benchkit``, ``bench_flags``)
and the ``ckpt-wrapper`` CLI.

Nothing in the library core imports from here.
"""
