"""Collection settings for the doctest run over the package (pyproject testpaths)."""

import importlib.util

# Optional integrations import their framework at module level: skip their doctests without it.
collect_ignore = [] if importlib.util.find_spec("lightning") else ["wavg_fused/integrations/lightning.py"]
