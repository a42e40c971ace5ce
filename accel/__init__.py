"""accel-port: port LLMs between accelerators and prove they still compute the same thing.

Importing `accel` loads no framework; each backend imports its own lazily when its target is opened.
"""

__version__ = "0.1.0"
