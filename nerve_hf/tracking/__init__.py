"""The tracker: hook points on the FFNs, the token source of each site, windows, measurements and reduction."""
