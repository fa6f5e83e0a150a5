"""One Gradio view per tab; each builds its components and wires them to ``ExplorerApp`` methods."""
