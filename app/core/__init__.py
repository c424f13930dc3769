"""The conversation core: turns, replies and memory, in typed events; it knows no wire protocol."""
