"""Training: datasets, training loops and their helpers (imported lazily by ``wsi-screen train``)."""
