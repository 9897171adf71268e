"""Where reports go: the JSONL records, the spectra archive, histograms and atomic file writes; each output of
NerveCallback is one small class with ``write(report, split, step)`` and ``drop_after(step)``
(:class:`nerve_hf.sinks.base.Sink`)."""
