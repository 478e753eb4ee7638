"""Composed models: networks built from backbones and nn layers (above both, below data and stages)."""
