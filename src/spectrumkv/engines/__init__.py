"""Engine adapters: the only modules that know an engine's cache layout."""
