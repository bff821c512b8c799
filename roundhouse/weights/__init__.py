"""Weights and run artifacts: what a run starts from and what it leaves behind.

Layering: `trainer -> weights -> models, data` (and `config`, `runs`); nothing here imports the
training loop, a strategy, ray or the launcher.

- `checkpoint`: the atomic checkpoint format on any fsspec URL (`Checkpointer`).
- `run_folder`: `prepare_run`, which binds a job to its run folder once per job.
- `model_build`: the job's model and the seeds it is built under.
- `finetune`: `model.init_from` and `trainer.freeze`.
- `lora`: `model.lora` adapters, their checkpoints and the merge.
- `pretrained`: weights from outside roundhouse (files, Hugging Face folders, torchvision).
- `hf_teacher`: a Hugging Face folder as a distillation teacher.
- `saved_model`: a trained model rebuilt from its run folder.
"""
