"""Helpers for the S9 notebook: data (dataset), network (model), training (backprop), pictures (utils)."""
