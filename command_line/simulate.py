"""Placeholder replaced by the simulator work."""
def run(args=None):
    raise SystemExit("not yet")
