"""The OpenAI-compatible server (FastAPI), its engine loop, metrics, and the online benchmark."""
