"""Helpers shared by the tests (and the benchmarks): servers, calls, recorded cases, generators.

On the test path (``pythonpath`` in pyproject.toml): ``from support.servers import ServerProcess``.
Fixtures live in ``tests/conftest.py``.
"""
