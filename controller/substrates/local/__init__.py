"""The local substrate: nspawn machines from baked images, each in its own network namespace."""
