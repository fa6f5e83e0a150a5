"""Training the embedded model: the recipe and loop (``train``), Custom Diffusion fine-tunes (``custom_diffusion``), building the shipped folders (``build``), resumable checkpoints."""
