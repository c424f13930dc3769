"""The web edge: the Litestar app, access and pairing, and one adapter per wire protocol (/ws, /v1/realtime)."""
