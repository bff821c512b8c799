"""Measurement for `roundhouse plan`: this machine's rates, cached per host.

- `cache`: the calibration cache (`cached`, `remeasured`), a matmul's FLOP/s, memory bytes/s;
- `ranks`: the one spawned-rank helper every multi-process measurement runs through;
- `link`: a 2-rank gloo all-reduce's latency and bandwidth;
- `loop`: the job's own step through roundhouse's loop pieces, and each cost model's engines;
- `exchange`: each cost model's probe families on 2 ranks, as residuals over the link model;
- `trace`: the model's footprint from one meta-device trace (a `ModelProfile`).

The planner (`roundhouse.planner`) reads these figures; the arithmetic stays there and in the
strategies' cost models (`roundhouse.parallel.costs`).
"""
