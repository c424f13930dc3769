"""The OpenAI Realtime protocol on /v1/realtime: its messages, the session that dispatches them, and the replies."""
