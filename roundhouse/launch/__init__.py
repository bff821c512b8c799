"""The command line, job files -> `JobSpec`, and the local entry point."""
