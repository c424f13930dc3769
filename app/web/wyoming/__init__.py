"""Home Assistant's Wyoming protocol: speech-to-text, text-to-speech and a conversation agent, on the loaded
engines."""
