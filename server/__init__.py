"""server: the OpenAI-compatible HTTP layer over plm_core (FastAPI app, wire protocol, CLI)."""
