"""One module per `accel` command."""
