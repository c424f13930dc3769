"""The engines: the models (speech-to-text, language model, voice, VAD, Smart Turn), their files and their
worker threads."""
