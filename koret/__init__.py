"""koret: fine-tune Korean text retrievers end to end.

The stages are importable as plain functions::

    from koret.mine import mine
    from koret.filter import refilter
"""

__version__ = "0.1.0"
