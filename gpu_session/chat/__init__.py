"""The chat: an OpenAI-compatible streaming client over the session's tunnel (client.py), and the
terminal around it (repl.py). Imports local, host, sizing and below; nothing of the session flows."""
