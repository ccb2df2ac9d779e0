"""`osprey serve`: an OpenAI-compatible region server (FastAPI) and the `osprey describe` one-off command."""
