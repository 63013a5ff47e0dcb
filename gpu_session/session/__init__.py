"""The flows a person runs (up, down, status, sweep, …) and the watch that guards a session's bill:
the one layer that joins the stack, the host, this machine's records, the plan and the clouds.
Imports everything below it; nothing below imports it, and neither does chat."""
