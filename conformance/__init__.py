"""The conformance suite, installed as `accel.conformance`: cases, metrics, tolerances, runner, reports."""
