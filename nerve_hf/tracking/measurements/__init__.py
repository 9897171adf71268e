"""Measurements: one object per feature of a tracker window (pre/post pair, flow, position buckets, cross-layer)."""
