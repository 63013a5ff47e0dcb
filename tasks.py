"""Invoke entry point for a checkout; the tasks live in gpu_session/cli/tasks.py."""

from gpu_session.cli.tasks import ns  # noqa: F401
