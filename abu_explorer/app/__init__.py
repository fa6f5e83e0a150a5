"""The web app: service functions tested without Gradio (``service``, ``inputs``), background jobs, curated examples, and one Gradio view per tab (``views/``) assembled by ``demo``."""
