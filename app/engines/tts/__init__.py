"""Text-to-speech engines: each turns one phrase into a stream of PCM chunks."""
