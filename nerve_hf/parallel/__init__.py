"""Several processes and sharded tensors: the one communication module, sharded spectra, tensor-parallel layouts."""
