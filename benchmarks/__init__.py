"""Speed and memory measurements (scripts that print figures; not tests)."""
