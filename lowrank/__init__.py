"""lowrank-lab: the CLI (`lowrank ...`) and the Python SDK."""
