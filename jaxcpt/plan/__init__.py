"""Planning a continual-pretraining run before it runs: the token budget, proxy sweeps, mixture laws."""
