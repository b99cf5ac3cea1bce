"""The old name of :mod:`mrlstore.testing` (the synthetic MRL-like generator), kept so that code written
against it still imports; it warns once and will go in a later release."""

import warnings

from mrlstore.testing import exact_funnel, exact_search, mrl_like, mrl_like_blocks, mrl_like_split, recall_at_k

warnings.warn("mrlstore.synthetic is now mrlstore.testing", DeprecationWarning, stacklevel=2)

__all__ = ["exact_funnel", "exact_search", "mrl_like", "mrl_like_blocks", "mrl_like_split", "recall_at_k"]
