"""The host's side: Ansible runs (ansible), what the stack's Configure resource runs (converge), the
session's SSH keys and pinned host keys (ssh), the engines' locks and wheelhouse (engines).
Imports paths, errors and clouds only."""
