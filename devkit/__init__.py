"""Development stand-ins for what cannot exist on CPU-only machines (see README, "Stand-ins")."""
