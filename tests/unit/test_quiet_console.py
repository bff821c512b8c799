"""The quiet console's line filter: Ray's notices hidden, actionable worker lines shown."""

from __future__ import annotations

import pytest

from roundhouse.cluster.quiet import is_shown

HIDDEN = [
    "[2026-12-04 14:59:18,794 E 8635 8673] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: 'c422' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments are spilled to disk or lost, the actor may fail.",
    "Requesting resources: {'CPU': 1.0} * 2",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "INFO roundhouse.weights.checkpoint: checkpoint /runs/q/1/checkpoints/step_23 written",
    "INFO roundhouse.data.sources: data builtin:digits: {'train': 1438}",
]
SHOWN = [
    "WARNING roundhouse.trainer.loop: skipping step 5: loss is nan",
    "ERROR roundhouse.cluster.workers: worker group failed",
    "Traceback (most recent call last):",
    "RuntimeError: CUDA out of memory",
    "[2026-12-04 14:59:18,794 E 8635 8673] raylet_client.cc:12: node died unexpectedly",
]


@pytest.mark.parametrize("line", HIDDEN)
def test_ray_notices_and_routine_lines_are_hidden(line: str) -> None:
    assert not is_shown(line)


@pytest.mark.parametrize("line", SHOWN)
def test_warnings_errors_and_tracebacks_are_shown(line: str) -> None:
    assert is_shown(line)


def test_a_noise_lines_traceback_is_hidden_but_a_later_error_is_shown() -> None:
    from roundhouse.cluster.quiet import shown_lines

    batch = [
        "Requesting resources: {'CPU': 1.0} * 2",
        "Failed to send resource request for train-28e4. It's safe to ignore this error.",
        "Traceback (most recent call last):",
        '  File "ray/train/v2/autoscaling_coordinator_client.py", line 58, in send',
        "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
        "WARNING roundhouse.trainer.loop: skipping step 5: loss is nan",
        "Traceback (most recent call last):",
        "ValueError: bad shape",
    ]
    assert shown_lines(batch) == batch[5:]


def test_a_line_hidden_after_its_session_folder_is_gone_is_held_for_the_next(tmp_path) -> None:
    """A later Ray session in the same process must not crash on the last one's deleted log."""
    from roundhouse.cluster import quiet

    saved = dict(quiet._state)
    try:
        quiet._state.update(path=str(tmp_path / "gone" / quiet.LOG_NAME), held=[])
        quiet.write_hidden(["a notice"])  # no FileNotFoundError
        assert quiet._state["path"] is None and quiet._state["held"] == ["a notice"]
        quiet._state["path"] = str(tmp_path / quiet.LOG_NAME)
        quiet.write_hidden(quiet._state["held"] + ["next"])
        assert (tmp_path / quiet.LOG_NAME).read_text() == "a notice\nnext\n"
    finally:
        quiet._state.clear()
        quiet._state.update(saved)


def test_an_expected_actors_errors_go_to_the_log_file_not_the_console(tmp_path) -> None:
    """A preempted sweep ends trials still starting their workers: their controllers'
    tracebacks are expected, so they go to the log file; other actors' errors still show."""
    from roundhouse.cluster import quiet

    saved = {**quiet._state, "expected": set(quiet._state["expected"])}
    shown: list[dict] = []
    emit = quiet._filtered(shown.append)
    error = ["Error in control loop iteration", "Traceback (most recent call last):"]
    try:
        quiet._state.update(path=str(tmp_path / quiet.LOG_NAME), held=[])
        emit({"pid": 7, "actor_name": "TrainController", "lines": error})
        quiet.expect_errors_from("TrainController")
        emit({"pid": 7, "actor_name": "TrainController", "lines": error})
        emit({"pid": 8, "actor_name": "RayTrainWorker", "lines": error[1:]})
        assert [d["lines"] for d in shown] == [error, error[1:]]
        assert [d["actor_name"] for d in shown] == ["TrainController", "RayTrainWorker"]
        logged = (tmp_path / quiet.LOG_NAME).read_text().splitlines()
        assert logged[-2:] == [f"(TrainController pid=7) {line}" for line in error]
    finally:
        quiet._state.clear()
        quiet._state.update(saved)
