"""Fault tests (a package, so their package-scoped private services end with the folder)."""
