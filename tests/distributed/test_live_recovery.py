"""`cluster.recovery: live` at the process level: 3 ranks on a shared TCPStore, one SIGKILLed
mid-step; the two survivors re-form, redo the step and finish. The ledger shows every sample
trained once, and the weights equal an uninterrupted run's."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import queue
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from roundhouse.config.loading import validate_job
from roundhouse.errors import JobFileError
from roundhouse.parallel.net import free_port
from roundhouse.parallel.ps.manager import connect_store, shard_manager
from roundhouse.parallel.rendezvous import ElasticGroup, rescue_stranded
from roundhouse.runs.ledger import verify_ledger
from roundhouse.runs.rundir import RunDir
from roundhouse.trainer import WorkerContext, build_local_context, run_worker
from roundhouse.trainer.preflight import preflight
from roundhouse.weights.run_folder import prepare_run
from tests.helpers.dist import PRELOAD, _loopback_interface
from tests.helpers.runs import assert_same_weights, final_weights, read_metrics

TIMEOUT_S = 180
WORLD = 3
LATE_S = 5.0  # a survivor that notices the loss this late finds the group re-formed


class KillerMLP(nn.Module):
    """An MLP whose worker launched as `kill_rank` SIGKILLs itself at training forward
    `at_call` (mid-step: its peers are already waiting for its gradients)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, kill_rank: int,
                 at_call: int, delay_s: float, marker: str | None,
                 late_rank: int | None = None, alone_rank: int | None = None,
                 alone_call: int = 2, sender_rank: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), 32),
            nn.ReLU(),
            nn.Linear(32, num_classes),
        )
        # Built once, in generation 0, where the rank is the worker's launch rank.
        self.member = dist.get_rank() if dist.is_initialized() else 0
        self.kill_rank, self.at_call, self.delay_s, self.calls = kill_rank, at_call, delay_s, 0
        self.marker = Path(marker) if marker else None  # kill once per run (not a replacement)
        self.late_rank = late_rank  # this worker notices the kill seconds after the others
        # This worker SIGKILLs itself at its `alone_call`-th forward as the only one training.
        self.alone_rank, self.alone_call, self.alone_calls = alone_rank, alone_call, 0
        # This worker SIGKILLs itself as it hands its state to a replacement (3 workers again,
        # after the first kill, which wrote `marker`): the state never reaches the others.
        self.sender_rank = sender_rank

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        killed = self.marker is not None and self.marker.exists()  # the first kill happened
        joining = killed and dist.is_initialized() and dist.get_world_size() == WORLD
        if self.member == self.sender_rank and joining:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            time.sleep(self.delay_s)
            if self.calls == self.at_call and self.member == self.late_rank:
                time.sleep(LATE_S)
            alone = dist.is_initialized() and dist.get_world_size() == 1
            if self.member == self.alone_rank and alone:
                self.alone_calls += 1
                if self.alone_calls == self.alone_call:
                    os.kill(os.getpid(), signal.SIGKILL)
            if self.calls == self.at_call and self.member == self.kill_rank:
                if self.marker is not None:
                    if self.marker.exists():
                        return self.net(x)
                    self.marker.write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
        return self.net(x)


def killer_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    kill_rank: int = 2,
    at_call: int = 0,
    delay_s: float = 0.02,
    marker: str | None = None,
    late_rank: int | None = None,
    alone_rank: int | None = None,
    alone_call: int = 2,
    sender_rank: int | None = None,
) -> nn.Module:
    return KillerMLP(input_shape, num_classes, kill_rank, at_call, delay_s, marker, late_rank,
                     alone_rank, alone_call, sender_rank)  # fmt: skip


def make_job(storage: Path, at_call: int) -> dict:
    return {
        "name": "live",
        "model": {
            "name": f"{__name__}:killer_mlp",
            "flavor": "default",
            "options": {"kill_rank": 2, "at_call": at_call},
        },
        "data": {"source": "builtin:digits", "batch_size": 120},
        "trainer": {
            "max_epochs": 1,
            "log_every_steps": 4,
            "device": "cpu",
            "ledger": True,
            "optimizer": {"name": "sgd", "lr": 0.1},
            "checkpoint": {"every_epoch": False},
        },
        "strategy": {"kind": "ring", "bucket_mb": 0.002},
        "cluster": {
            "num_workers": WORLD,
            "recovery": "live",
            "collective_timeout_s": 60,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage)},
    }


def member_main(
    member: int,
    world: int,
    port: int,
    job: dict,
    results: Any,
    joining: bool = False,
    servers: Any = None,
) -> None:
    os.environ.update(OMP_NUM_THREADS="1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    torch.set_num_threads(1)
    group = None
    try:
        timeout_s = job["cluster"]["collective_timeout_s"]
        store = dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        group = ElasticGroup(store, member, list(range(world)), timeout_s=timeout_s)
        group.join() if joining else group.init()
        rank, size = group.rank, group.world_size
        ctx = WorkerContext(rank=rank, world_size=size, node_rank=rank, num_nodes=size,
                            rendezvous=group)  # fmt: skip
        if servers is not None:  # strategy.kind=ps: the shards in a manager process
            store = connect_store(servers, job["strategy"].get("num_servers", 1))
            ctx = dataclasses.replace(ctx, services={"ps": store})
        run_worker(validate_job(job), ctx)
        results.put((member, True, (group.generation, group.world_size, group.reform_s)))
    except BaseException as exc:
        results.put((member, False, f"{type(exc).__name__}: {exc}"))
    finally:
        if group is not None:
            group.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def doomed_member_main(*args: Any) -> None:
    """`member_main` as a replacement whose process dies the moment it is admitted, before it
    says it is there (`rendezvous.await_generation`): a worker killed during its admission."""
    from roundhouse.parallel import rendezvous

    def die(*_: Any, **__: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    rendezvous.await_generation = die  # type: ignore[assignment]
    member_main(*args)


def run_members(
    job: dict,
    world: int,
    expect_dead: set[int],
    replace: bool = False,
    servers: Any = None,
    replace_after: int = 1,
    doomed: bool = False,
) -> dict[int, Any]:
    """Run `world` members on a store held here; return the survivors' results.

    `replace`: once `replace_after` members died, start member `world` as a replacement (it
    joins); `doomed`: with it, member `world + 1`, a replacement that dies as it is admitted
    (`doomed_member_main`). `servers`: the address of ps shards (`shard_manager`) for every
    member. Like the live group's driver, this loop forms a group of the waiting workers when
    nobody training is left to admit them (`rescue_stranded`)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=member_main, args=(m, world, port, job, results, False, servers), daemon=True
        )
        for m in range(world)
    ]
    for proc in procs:
        proc.start()
    got: dict[int, Any] = {}
    deadline = time.monotonic() + TIMEOUT_S
    expected = world - len(expect_dead & set(range(world))) + (1 if replace else 0)
    try:
        while len(got) < expected:
            dead = sum(p.exitcode is not None for p in procs)
            if replace and len(procs) == world and dead >= replace_after:
                joiner = (world, world, port, job, results, True, servers)
                procs.append(ctx.Process(target=member_main, args=joiner, daemon=True))
                procs[-1].start()
                if doomed:
                    joiner = (world + 1, world, port, job, results, True, servers)
                    procs.append(ctx.Process(target=doomed_member_main, args=joiner, daemon=True))
                    procs[-1].start()
            alive = [m for m, p in enumerate(procs) if p.exitcode is None and m not in got]
            rescue_stranded(store, alive)
            try:
                member, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() < deadline:
                    continue
                missing = sorted(set(range(world)) - set(got) - expect_dead)
                raise AssertionError(f"members {missing} hung") from None
            assert ok, f"member {member}: {value}"
            got[member] = value
    finally:
        for proc in procs:
            proc.kill()
            proc.join(timeout=10)
        del store
    assert {m for m, p in enumerate(procs) if p.exitcode == -signal.SIGKILL} >= expect_dead
    return got


def train(
    job: dict,
    expect_dead: set[int],
    replace: bool = False,
    replace_after: int = 1,
    doomed: bool = False,
) -> tuple[Path, dict[int, Any]]:
    prepared = prepare_run(validate_job(job))
    job = prepared.job.model_dump(mode="json")
    if job["strategy"]["kind"] != "ps":
        got = run_members(
            job, WORLD, expect_dead, replace, replace_after=replace_after, doomed=doomed
        )
        return Path(prepared.run_dir.url), got
    with shard_manager() as servers:
        got = run_members(job, WORLD, expect_dead, replace, servers)
    return Path(prepared.run_dir.url), got


def assert_went_3_2_3(run: Path) -> None:
    """The run went from 3 workers to 2 and back to 3, and trained each sample once in each
    of its 2 epochs."""
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and [e.steps for e in report.epochs] == [12, 12], report.as_dict()
    worlds = [json.loads(line)["w"] for line in (run / "ledger/rank_0.jsonl").read_text().split()]
    assert worlds[0] == 3 and 2 in worlds and worlds[-1] == 3


def assert_close_weights(run: Path, reference: Path) -> None:
    """The run ends with the reference run's weights (to 1e-5: the survivors add the same
    gradients in other groupings)."""
    ours, theirs = final_weights(run), final_weights(reference)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """`uninterrupted(epochs)`: the run folder of an uninterrupted 3-worker run of `epochs`
    epochs, trained once per module. No worker dies there and nothing paces it: the tests'
    fault options (a kill, a late or lone worker, a pacing delay) change no arithmetic."""
    runs: dict[int, Path] = {}

    def reference(epochs: int) -> Path:
        if epochs not in runs:
            job = make_job(tmp_path_factory.mktemp(f"whole{epochs}"), at_call=0)
            job["trainer"]["max_epochs"] = epochs
            runs[epochs], _ = train(job, set())
        return runs[epochs]

    return reference


def test_survivors_redo_the_step_and_lose_no_sample(
    tmp_path: Path, uninterrupted: Callable[[int], Path]
) -> None:
    reference = uninterrupted(1)
    run, survivors = train(make_job(tmp_path / "killed", at_call=5), {2})
    assert sorted(survivors) == [0, 1]
    for generation, world, reform_s in survivors.values():
        assert (generation, world) == (1, 2)
        assert reform_s[0] < 5.0
    report = verify_ledger(RunDir(str(run)))
    assert report.ok, report.as_dict()
    assert report.epochs[0].steps == 12
    assert_only_the_lost_share_was_redone(run, reference)
    assert_close_weights(run, reference)


def assert_only_the_lost_share_was_redone(run: Path, reference: Path) -> None:
    """Worker 2 of 3 died: each survivor kept its own share of the step it lost (its
    gradients were copied before the exchange) and trained only its half of worker 2's
    share (40 samples each at a batch of 120)."""
    whole, redone = ledger_lines(reference), ledger_lines(run)
    step = min(gs for (gs, _), line in redone.items() if line["w"] == 2)
    lost = whole[step, 2]["i"]
    assert redone[step, 0]["i"] == whole[step, 0]["i"] + lost[:20]
    assert redone[step, 1]["i"] == whole[step, 1]["i"] + lost[20:]


def ledger_lines(run: Path) -> dict[tuple[int, int], dict]:
    """Each rank's ledger line by (global step, rank)."""
    lines = {}
    for path in (run / "ledger").glob("rank_*.jsonl"):
        rank = int(path.stem.removeprefix("rank_"))
        for text in path.read_text().split():
            line = json.loads(text)
            lines[line["gs"], rank] = line
    return lines


def test_a_replacement_joins_at_a_step_boundary(
    tmp_path: Path, uninterrupted: Callable[[int], Path]
) -> None:
    """3 -> 2 -> 3 workers: the replacement gets the members' state by broadcast and the
    run ends with the uninterrupted run's weights; the ledger shows every sample once."""
    options = {"delay_s": 0.05, "marker": str(tmp_path / "killed")}
    job = make_job(tmp_path / "j", at_call=5)
    job["trainer"]["max_epochs"] = 2
    job["model"]["options"].update(options)
    reference = uninterrupted(2)
    run, members = train(job, {2}, replace=True)
    assert sorted(members) == [0, 1, 3]
    assert_went_3_2_3(run)
    assert_close_weights(run, reference)


@pytest.mark.parametrize(
    "adapt",
    [
        {"trainer": {"freeze": ["net.1.*"]}},
        {"model": {"lora": {"rank": 4, "targets": ["net.1", "net.3"]}}},
        {"model": {"init_from": "<tmp>/init.pt"}},
    ],
    ids=["freeze", "lora", "init_from"],
)
def test_a_frozen_or_adapted_model_redoes_the_lost_share_and_takes_a_replacement(
    tmp_path: Path, adapt: dict[str, dict]
) -> None:
    """The take-over keeps and restores the gradients of the trainable parameters only (a
    frozen weight, or a LoRA base weight, is in no bucket); a replacement gets the trained
    state by broadcast, not the job's starting weights (`init_from`, which its build
    loads). Each ends with an uninterrupted run's weights."""
    if "init_from" in adapt.get("model", {}):  # other starting weights than the seed's
        torch.manual_seed(7)
        start = KillerMLP((64,), 10, kill_rank=2, at_call=0, delay_s=0.0, marker=None)
        torch.save(start.state_dict(), tmp_path / "init.pt")
        adapt = {"model": {"init_from": str(tmp_path / "init.pt")}}
    options = {"delay_s": 0.05, "marker": str(tmp_path / "killed")}
    jobs = [make_job(tmp_path / name, at_call=call) for name, call in (("whole", 0), ("a", 5))]
    for job in jobs:
        job["trainer"]["max_epochs"] = 2
        job["model"]["options"].update(options)
        for section, values in adapt.items():
            job[section].update(values)
    reference, _ = train(jobs[0], set())
    run, members = train(jobs[1], {2}, replace=True)
    assert sorted(members) == [0, 1, 3]
    assert_went_3_2_3(run)
    assert_only_the_lost_share_was_redone(run, reference)
    assert_close_weights(run, reference)


def test_a_member_lost_while_a_replacement_takes_the_state_is_recovered_from(
    tmp_path: Path, uninterrupted: Callable[[int], Path]
) -> None:
    """Found by the trace on gpt:small, whose 130 MB state takes a while to hand over: worker
    2 dies, a replacement (3) is admitted, and worker 0 dies as it sends the state. That loss
    is recovered from like any other: worker 1 goes on alone, the replacement waits to be
    admitted again and gets the state from worker 1; the run finishes, every sample once."""
    job = make_job(tmp_path / "s", at_call=5)
    job["trainer"]["max_epochs"] = 2
    options = {"delay_s": 0.05, "marker": str(tmp_path / "killed"), "sender_rank": 0}
    job["model"]["options"].update(options)
    reference = uninterrupted(2)
    run, members = train(job, {0, 2}, replace=True)
    assert sorted(members) == [1, 3]
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and [e.steps for e in report.epochs] == [12, 12], report.as_dict()
    worlds = [json.loads(line)["w"] for line in (run / "ledger/rank_0.jsonl").read_text().split()]
    assert 1 in worlds and worlds[-1] == 2  # alone after the second loss, then rejoined
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert_close_weights(run, reference)


def test_a_replacement_lost_as_it_is_admitted_costs_no_collective_timeout(
    tmp_path: Path,
) -> None:
    """Found by the gpt:small trace: a replacement killed while it was admitted left the
    others waiting the collective timeout (60 s) in `init_process_group`, and failed the run
    when a second replacement of the same generation waited too. Worker 2 dies; replacements
    3 and 4 start, and 4 dies as it is admitted. The others learn it at once
    (`await_generation`), re-form without it, replacement 3 waits to be admitted again if it
    was admitted with 4, and the run finishes with every sample once."""
    job = make_job(tmp_path / "d", at_call=5)
    job["trainer"]["max_epochs"] = 2
    # Paced so that the run outlasts two admissions (rank 0 looks for joiners once a second):
    # at 0.05 s a step, replacement 3 could still wait to be admitted again when the run ended.
    job["model"]["options"].update(delay_s=0.2, marker=str(tmp_path / "killed"))
    job["cluster"]["collective_timeout_s"] = 2 * TIMEOUT_S  # waiting it out reads as a hang
    run, members = train(job, {2, 4}, replace=True, doomed=True)
    assert sorted(members) == [0, 1, 3]
    assert max(max(m[2], default=0.0) for m in members.values()) < 10  # re-forms and joins
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and [e.steps for e in report.epochs] == [12, 12], report.as_dict()
    worlds = [json.loads(line)["w"] for line in (run / "ledger/rank_0.jsonl").read_text().split()]
    assert worlds[0] == 3 and worlds[-1] == 3


@pytest.mark.parametrize(("kill_rank", "late_rank"), [(2, 1), (1, 0)])
def test_a_survivor_left_behind_rejoins_and_nothing_is_lost(
    tmp_path: Path, uninterrupted: Callable[[int], Path], kill_rank: int, late_rank: int
) -> None:
    """A survivor notices the loss seconds after the other re-formed without it (found by
    the benchmark's trace: a ring neighbour blocked on a survivor's still-open sockets): it
    rejoins at a step boundary like a replacement instead of failing the run. (1, 0): the
    late one was rank 0, the writer; the other took over and keeps writing."""
    job = make_job(tmp_path / "late", at_call=5)
    job["trainer"]["max_epochs"] = 2
    options = {"delay_s": 0.3, "late_rank": late_rank, "kill_rank": kill_rank}
    job["model"]["options"].update(options)  # the other survivor goes on alone
    reference = uninterrupted(2)
    run, survivors = train(job, {kill_rank})
    assert sorted(survivors) == sorted({0, 1, 2} - {kill_rank})
    assert [world for _, world, _ in survivors.values()] == [2, 2]
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and [e.steps for e in report.epochs] == [12, 12], report.as_dict()
    worlds = [json.loads(line)["w"] for line in (run / "ledger/rank_0.jsonl").read_text().split()]
    assert 1 in worlds and worlds[-1] == 2  # one went on alone until the late one rejoined
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert read_metrics(run)[-1]["step"] == 24
    assert_close_weights(run, reference)


def test_losing_the_last_training_worker_while_others_wait_to_join(
    tmp_path: Path, uninterrupted: Callable[[int], Path]
) -> None:
    """Worker 2 dies; worker 1 notices late and waits to rejoin; worker 0, training alone,
    commits a step and dies too; a fresh replacement (3) waits as well. Nobody trains, so
    the driver (here the test) forms a group of the waiting ones, led by worker 1, which
    holds the newest committed state: the run finishes with every sample trained once (the
    lost worker's lone step is voided) and with the uninterrupted run's weights."""
    job = make_job(tmp_path / "x", at_call=5)
    job["trainer"]["max_epochs"] = 2
    # alone, worker 0 redoes the lost shares of its step in 2 micro-batches (2 forwards),
    # commits it, and dies in the next step's forward
    job["model"]["options"].update(delay_s=0.3, late_rank=1, alone_rank=0, alone_call=3)
    reference = uninterrupted(2)
    run, members = train(job, {0, 2}, replace=True, replace_after=2)
    assert sorted(members) == [1, 3]
    assert [world for _, world, _ in members.values()] == [2, 2]
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and [e.steps for e in report.epochs] == [12, 12], report.as_dict()
    assert report.ignored_lines >= 1  # worker 0's step alone, undone
    worlds = [json.loads(line)["w"] for line in (run / "ledger/rank_0.jsonl").read_text().split()]
    assert 1 in worlds and worlds[-1] == 2
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert read_metrics(run)[-1]["step"] == 24
    assert_close_weights(run, reference)


def test_exact_mode_through_3_2_3_workers_is_bit_identical_to_one_process(
    tmp_path: Path,
) -> None:
    """strategy.exact: losing a worker and getting a replacement changes no bit."""
    options = {"delay_s": 0.05, "marker": str(tmp_path / "killed")}
    jobs = [make_job(tmp_path / name, at_call=call) for name, call in (("one", 0), ("j", 5))]
    for job in jobs:
        job["trainer"]["max_epochs"] = 2
        job["model"]["options"].update(options)
        job["strategy"].update(exact=True, virtual_shards=6)
    prepared = prepare_run(validate_job(jobs[0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the members: other thread counts add in other orders
    try:
        run_worker(prepared.job, build_local_context("cpu"))
    finally:
        torch.set_num_threads(threads)
    run, members = train(jobs[1], {2}, replace=True)
    assert sorted(members) == [0, 1, 3]
    worlds = [json.loads(line)["w"] for line in (run / "ledger/rank_0.jsonl").read_text().split()]
    assert worlds[0] == 3 and 2 in worlds and worlds[-1] == 3
    assert_same_weights(final_weights(Path(prepared.run_dir.url)), final_weights(run))


@pytest.mark.parametrize(
    "strategy",
    [{"kind": "deepspeed"}, {"kind": "deepspeed", "pipeline_stages": 3}],
)
def test_live_recovery_with_a_strategy_that_cannot_is_refused_before_launch(
    tmp_path: Path, strategy: dict
) -> None:
    job = make_job(tmp_path, at_call=0)
    job["strategy"] = strategy
    job["model"] = {"name": "mlp", "flavor": "debug"}
    with pytest.raises(JobFileError, match=r"cluster\.recovery=live: strategy\.kind="):
        preflight(validate_job(job))


def test_losing_rank_0_makes_the_lowest_survivor_the_writer(
    tmp_path: Path, uninterrupted: Callable[[int], Path]
) -> None:
    """The worker launched as rank 0 dies mid-step: the store lives outside it (here, in the
    test; under Ray, in the driver), so the survivors re-form, member 1 becomes rank 0 and
    writes the metrics, the checkpoints and the status; nothing is lost or repeated."""
    reference = uninterrupted(1)
    job = make_job(tmp_path / "killed", at_call=5)
    job["model"]["options"]["kill_rank"] = 0
    run, survivors = train(job, {0})
    assert sorted(survivors) == [1, 2]
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and report.epochs[0].steps == 12, report.as_dict()
    rows = read_metrics(run)
    assert rows[-1]["step"] == 12 and "test/accuracy" in rows[-1], rows[-1]
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert_close_weights(run, reference)


def test_live_recovery_with_several_optimizers_is_refused_before_launch(tmp_path: Path) -> None:
    """The task steps two optimizers in turn (a strategy each): live recovery re-forms one."""
    from tests.unit.test_tasks import EXAMPLE, job_dict

    job = job_dict(tmp_path, task={"name": f"{EXAMPLE}:ClassifyAndReconstruct"})
    job["task"]["optimizers"] = {"decoder": {"optimizer": {"name": "sgd", "lr": 0.5}}}
    job["strategy"] = {"kind": "ring"}
    job["cluster"] = {"num_workers": 3, "recovery": "live"}
    with pytest.raises(JobFileError, match=r"cluster\.recovery=live re-forms one optimizer"):
        preflight(validate_job(job))
    job["cluster"]["recovery"] = "restart"
    assert "optimizers" in preflight(validate_job(job)).checks
