"""Training the embedded model: the recipe and loop (``train``), stacked leave-K-out retrains (``stacked``), building the shipped folders (``build``), resumable checkpoints."""
