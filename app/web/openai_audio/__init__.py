"""OpenAI's audio REST endpoints (speech, transcriptions, voices, models) over the loaded engines."""
