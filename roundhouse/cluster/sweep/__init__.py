"""The sweep room: `roundhouse tune` below its command line.

- `space`: `--search KEY=EXPR` parsed into `SearchParam`s, checked against the job schema and
  applied to a job (pure; no ray).
- `tuner`: the Ray Tune driver (`run_sweep`), the trial trainable and the trial's run folder.
- `results`: the sweep folder, the results table and the best trial's job file.

`launch/cli_tune.py` is the command: it parses arguments, runs the pre-flight and calls these.
"""
