"""`solo`: a strategy of one's own, laid out as a built-in one is (see test_strategy_house.py).

`section.py` is its job-file section (torch-free: importing it adds `solo` to the job schema),
`strategy.py` its `Strategy` and cost model. Registering it is one line,
`registry.STRATEGIES["solo"] = SoloStrategy`.
"""
