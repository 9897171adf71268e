"""Streaming statistics with an exact reduction: the moments base, the covariance and cross-covariance
accumulators, batch kernels."""
