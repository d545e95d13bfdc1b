"""server: the OpenAI-compatible HTTP layer over plm_core (built in a later issue)."""
