"""Streaming statistics with an exact reduction: covariance and cross-covariance accumulators, batch kernels."""
