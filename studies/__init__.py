"""Research on top of the agent: studies, probes and their sweeps (``python -m studies.<name>``)."""
