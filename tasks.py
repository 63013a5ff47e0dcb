"""Invoke entry point for a checkout; the tasks live in gpu_session/tasks.py."""

from gpu_session.tasks import ns  # noqa: F401
