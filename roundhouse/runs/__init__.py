"""Run folders read back: status, metrics and jobs of finished, failed and running runs."""
