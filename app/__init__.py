"""Local real-time voice assistant."""
