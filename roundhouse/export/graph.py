"""What of a model is exported, and with which inputs: the job's task says (`build_graphs`).

`export` tests no model family: it builds the run's `Task` (`task:` in the job file, or the
model's own) and writes the `ExportGraph`s of its `export_graphs`: a classifier or language model
itself, a diffusion model's denoiser, the VAE's decoder, a GAN's generator, an encoder-decoder's
encoder and decoder step (two files), or whatever a user's task declares through
`export_module` and `export_inputs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from roundhouse.errors import RoundhouseError
from roundhouse.trainer.task_api import ExportGraph

if TYPE_CHECKING:
    from roundhouse.weights.saved_model import SavedModel

__all__ = ["ExportError", "ExportGraph", "build_graphs"]


class ExportError(RoundhouseError):
    """A model, format or option that cannot be exported."""


def build_graphs(saved: SavedModel) -> list[ExportGraph]:
    """The graphs to export of `saved`'s model: what its job's task writes (one file or more).

    Raises:
        ExportError: The task declares no graph.
    """
    from roundhouse.trainer.task import build_job_task

    info = saved.splits.info
    task = build_job_task(saved.job, info)
    graphs = task.export_graphs(saved.model.eval(), info, saved.splits.input_dtype)
    if not graphs:
        raise ExportError(
            f"task {type(task).__name__} exports nothing",
            "export --format safetensors, or give the task an export_graphs",
        )
    return graphs
