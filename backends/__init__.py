"""Backends, one file each, installed as `accel.backends`. Importing this package imports none of them."""
