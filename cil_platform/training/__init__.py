"""The per-task projection update: the Ray Train fit (fit.py), its worker body (worker.py), the DDP and DeepSpeed
backends (backends.py), the DeepSpeed JSON checks (deepspeed_config.py) and TrainConfig (config.py).

Kept empty of imports: Ray Train's controller and workers import this package, and a model import here would
cost every fit seconds of start-up.
"""
