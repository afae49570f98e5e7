"""Recipes for frameworks that load transformers models their own way.

Each integration lives in its own module and imports its framework only when called:

- :mod:`omnifix.integrations.xinference`: Xinference's transformers multimodal backends.
"""
