"""DeepSpeed strategies: ZeRO data parallel (`strategy.py`), pipeline parallel (`pipeline.py`),
tensor parallel (`tensor_parallel.py`) and expert parallel (`moe.py`); `config.py` writes the
DeepSpeed config and checks the job, `state.py` reads and writes the ZeRO state.

Only these files import `deepspeed`, and only when a strategy is set up.
"""
