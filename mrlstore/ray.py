"""``mrlstore.ray``: the Ray Data integration, by its public name (it lives in
:mod:`mrlstore.integrations.ray`)."""

from mrlstore.integrations.ray import EmbedImages, QueryStore, StoreSink

__all__ = ["EmbedImages", "QueryStore", "StoreSink"]
