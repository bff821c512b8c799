"""The run folder: its layout (`rundir.py`), `metrics.jsonl` (`metrics_file.py`), the console
(`console.py`) and W&B + JSONL tracking (`tracking.py`).

Usable from every layer: launch/, cluster/ and trainer/ all read and write runs through here.
"""
