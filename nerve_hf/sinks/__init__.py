"""Where reports go: the JSONL records, the spectra archive, histograms and atomic file writes."""
