"""The chat: an OpenAI-compatible streaming client over the session's tunnel (client.py), and the
terminal around it (repl.py)."""
