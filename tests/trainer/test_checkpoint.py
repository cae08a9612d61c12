"""Checkpoints are atomic, weights-only loadable, and a resume continues exactly."""

import errno
import os
import signal

import numpy as np
import pytest
import torch

from trainmetrics.trainer import checkpoint as ckpt


def test_checkpoint_loads_with_weights_only(make_trainer, tmp_path):
    trainer = make_trainer(model="mlp", dataset="blobs", epochs=1, checkpoint_dir=tmp_path)
    trainer.run()
    checkpoints = ckpt.list_checkpoints(tmp_path)
    assert [c.step for c in checkpoints] == [trainer.metrics.steps]
    state = torch.load(checkpoints[0].path, weights_only=True)
    assert state["step"] == trainer.metrics.steps and state["epoch"] == 1
    weights = torch.load(tmp_path / ckpt.FINAL_MODEL_NAME, weights_only=True)
    assert set(weights) == set(trainer.model.state_dict())


def test_failed_write_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def disk_full(obj, handle):
        real_save(obj, handle)
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.checkpoint_name(1)]
    assert torch.equal(ckpt.load_latest(tmp_path)["w"], torch.ones(3))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_checkpoint_has_the_mode_the_umask_gives_as_torch_save_would(tmp_path, umask, mode):
    """The temp file's mkstemp made every checkpoint and the final model 0600 whatever the umask: a team's
    shared checkpoint directory (umask 002) held weights no one else could load."""
    before = os.umask(umask)
    try:
        saved = ckpt.atomic_save({"step": 1}, tmp_path / "model.pt")
    finally:
        os.umask(before)
    assert saved.stat().st_mode & 0o777 == mode


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    ckpt.save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(2)})
    (tmp_path / ckpt.checkpoint_name(2)).write_bytes(b"truncated by a crash")
    assert ckpt.load_latest(tmp_path)["step"] == 1
    assert f"{ckpt.checkpoint_name(2)} cannot be loaded" in caplog.text


def test_checkpoints_none_of_which_loads_are_an_error_and_none_at_all_a_fresh_start(tmp_path):
    assert ckpt.load_latest(tmp_path) is None
    (tmp_path / ckpt.checkpoint_name(2)).write_bytes(b"overwritten")
    with pytest.raises(ckpt.NoReadableCheckpoint, match="none of the 1 checkpoints"):
        ckpt.load_latest(tmp_path)


def test_only_newest_checkpoints_are_kept(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, {"step": step}, keep=2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [4, 5]


def test_a_newer_checkpoint_the_resume_skipped_neither_counts_nor_goes_when_pruning(tmp_path):
    """A newest file that does not load (or another job's): the resume skipped it, then every checkpoint the run
    wrote was pruned as it was written (the file's step was higher), and the next resume found none that loads."""
    for step in (10, 20):
        ckpt.save_checkpoint(tmp_path, {"step": step, "w": torch.ones(2)}, keep=1)
    (tmp_path / "step-000000500.pt").write_bytes(b"not a checkpoint")
    assert ckpt.load_latest(tmp_path)["step"] == 20
    for step in (30, 40):       # the resumed run goes on
        ckpt.save_checkpoint(tmp_path, {"step": step, "w": torch.ones(2)}, keep=1)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [40, 500]
    assert ckpt.load_latest(tmp_path)["step"] == 40


def test_steps_past_nine_digits_are_checkpoints_too(tmp_path):
    """checkpoint_name writes ten digits past step 999,999,999: such files were never pruned nor resumed from."""
    for step in (999_999_990, 1_000_000_000, 1_000_000_010):
        ckpt.save_checkpoint(tmp_path, {"step": step}, keep=2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1_000_000_000, 1_000_000_010]
    assert ckpt.load_latest(tmp_path)["step"] == 1_000_000_010
    (tmp_path / "step-0000000001.pt").write_bytes(b"")        # no name checkpoint_name writes
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1_000_000_000, 1_000_000_010]


def test_a_name_with_a_trailing_newline_is_no_checkpoint(tmp_path):
    """The name pattern ended in `$`, which matches before a final newline too: `step-000000999.pt\\n` was listed
    (by the job server as well, whose download then refused the name) and resumed from as the newest checkpoint."""
    ckpt.save_checkpoint(tmp_path, {"step": 5})
    torch.save({"step": 999}, tmp_path / "step-000000999.pt\n")
    assert [c.path.name for c in ckpt.list_checkpoints(tmp_path)] == ["step-000000005.pt"]
    assert ckpt.load_latest(tmp_path)["step"] == 5


def test_checkpoints_are_listed_alike_by_path_and_by_descriptor_regular_files_only(tmp_path):
    """The job server lists a job's checkpoints through a directory descriptor, the trainer by path: one scan.
    A symlink, a directory or a FIFO under a checkpoint's name is no checkpoint, and sizes are the files' own."""
    (tmp_path / "step-000000002.pt").write_bytes(b"22")
    (tmp_path / "step-000000001.pt").write_bytes(b"1")
    (tmp_path / "elsewhere").write_bytes(b"x" * 1000)
    (tmp_path / "step-000000003.pt").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "step-000000004.pt").mkdir()
    os.mkfifo(tmp_path / "step-000000005.pt")
    by_path = ckpt.list_checkpoints(tmp_path)
    assert [(c.path, c.step, c.size_bytes) for c in by_path] == [(tmp_path / "step-000000001.pt", 1, 1),
                                                                  (tmp_path / "step-000000002.pt", 2, 2)]
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        by_descriptor = ckpt.list_checkpoints(directory)
    finally:
        os.close(directory)
    assert [(c.path.name, c.step, c.size_bytes, c.modified) for c in by_descriptor] == \
        [(c.path.name, c.step, c.size_bytes, c.modified) for c in by_path]
    assert ckpt.list_checkpoints(tmp_path / "missing") == []


def test_resume_mid_epoch_equals_an_uninterrupted_run(make_trainer, tmp_path):
    common = dict(model="mlp", dataset="blobs", epochs=2, batch_size=64, seed=3)
    straight = make_trainer(**common)
    straight.run()

    first = make_trainer(**common, checkpoint_dir=tmp_path, checkpoint_every=30)
    # Stop after the checkpoint at step 60 (mid epoch 2), as SIGTERM would at a step boundary.
    original_step = first.metrics.step

    def step_then_maybe_stop(*args, **kwargs):
        original_step(*args, **kwargs)
        if first.metrics.steps == 60:
            first.stop.request(signal.SIGTERM)

    first.metrics.step = step_then_maybe_stop
    assert first.run() == "cancelled"
    assert ckpt.list_checkpoints(tmp_path)[-1].step == 60

    resumed = make_trainer(**common, checkpoint_dir=tmp_path)
    resumed.restore(ckpt.load_latest(tmp_path))
    assert resumed.run() == "completed"
    assert resumed.metrics.steps == straight.metrics.steps
    assert resumed.metrics.samples == straight.metrics.samples
    for name, tensor in straight.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[name], tensor, atol=1e-6), name


def test_a_crash_in_the_evaluation_due_with_a_checkpoint_does_not_lose_it(make_trainer, tmp_path):
    """With checkpoints and evaluations every 30 steps, the checkpoint of step 60 was written before step 60's
    evaluation: a kill during that evaluation resumed at step 61, and the evaluation never ran (5 for 6)."""
    common = dict(model="mlp", dataset="blobs", epochs=2, batch_size=64, seed=3, eval_every=30)
    straight = make_trainer(**common)
    straight.run()

    class Killed(Exception):
        pass

    first = make_trainer(**common, checkpoint_dir=tmp_path, checkpoint_every=30)
    evaluate = first._evaluate

    def killed_in_the_evaluation_at_step_60():
        if first.metrics.steps == 60:
            raise Killed
        evaluate()

    first._evaluate = killed_in_the_evaluation_at_step_60
    with pytest.raises(Killed):
        first.run()
    resumed = make_trainer(**common, checkpoint_dir=tmp_path)
    resumed.restore(ckpt.load_latest(tmp_path))
    assert resumed.run() == "completed"
    assert resumed.metrics.state_dict()["evaluations"] == straight.metrics.state_dict()["evaluations"]
    assert resumed.metrics.steps == straight.metrics.steps


def test_an_evaluation_due_at_an_epochs_end_runs_once(make_trainer, tmp_path):
    """--eval-every falling on an epoch's last step evaluated twice there (after the step and at the epoch's
    end): twice the cost, and the analytics listed it twice. A run resumed from that step's checkpoint does not
    run it again either."""
    one_epoch = make_trainer(model="mlp", dataset="blobs", epochs=1, batch_size=64, seed=3)
    one_epoch.run()
    per_epoch = one_epoch.metrics.steps
    common = dict(model="mlp", dataset="blobs", batch_size=64, seed=3, eval_every=per_epoch)
    straight = make_trainer(**common, epochs=2)
    straight.run()
    assert straight.metrics.state_dict()["evaluations"] == 2
    first = make_trainer(**common, epochs=1, checkpoint_dir=tmp_path, checkpoint_every=per_epoch)
    first.run()
    resumed = make_trainer(**common, epochs=2, checkpoint_dir=tmp_path)
    resumed.restore(ckpt.load_latest(tmp_path))
    assert resumed.run() == "completed"
    assert resumed.metrics.state_dict()["evaluations"] == 2


def test_a_checkpoint_counts_in_the_metrics_of_the_rank_that_writes_it_only(make_trainer):
    """Rank 0 alone writes checkpoints (trainer_checkpoints_total: checkpoints written), and a resume hands each
    rank its own metrics state: a checkpoint counted in every rank's took rank 1's counter from 0 to rank 0's."""
    trainer = make_trainer(model="mlp", dataset="blobs", epochs=1)
    metrics_by_rank = [{"checkpoints": 2}, {"checkpoints": 0}]
    trainer.state(metrics_by_rank)
    assert [state["checkpoints"] for state in metrics_by_rank] == [3, 0]


@pytest.mark.parametrize("written_by,world_size", [(2, 3), (2, 1), (1, 2)])
def test_a_resume_at_another_world_size_is_refused(make_trainer, written_by, world_size):
    """Each rank's position counts batches of its own shard, its counters its own samples: 1 -> 2 ranks left
    1,248 samples of the epoch untrained and counted 10,304 samples for 8,352; 2 -> 1 trained 640 twice and
    said 70 steps for 250; both lost the first run's evaluations. Refused, as another batch size is."""
    from trainmetrics.trainer.distributed import Distributed

    state = make_trainer(model="mlp", dataset="blobs").state([{"checkpoints": 0, "steps": 0}] * written_by)
    resumed = make_trainer(model="mlp", dataset="blobs")
    resumed.dist = Distributed(rank=0, world_size=world_size)
    with pytest.raises(ValueError, match=f"written by {written_by} process\\(es\\) and this run has {world_size}: "
                                         f".* resume with {written_by}"):
        resumed.restore(state)


def stopped_at(trainer, step: int, signum=signal.SIGTERM, then=None):
    """Run `trainer` until `step`, where `signum` asks it to stop (and `then` runs, if given)."""
    original_step = trainer.metrics.step

    def step_then_maybe_stop(*args, **kwargs):
        original_step(*args, **kwargs)
        if trainer.metrics.steps == step:
            trainer.stop.request(signum)
            if then is not None:
                then()

    trainer.metrics.step = step_then_maybe_stop
    return trainer.run()


def test_another_jobs_or_models_checkpoint_is_skipped_when_resuming(make_trainer, tmp_path, caplog):
    """A newer checkpoint of another job was resumed as this job's (its counters, its weights), one of another
    model failed the job: the newest checkpoint is this job's to continue from only."""
    common = dict(model="mlp", dataset="digits", epochs=1, batch_size=64, seed=3, checkpoint_dir=tmp_path)
    first = make_trainer(**common, job_id="mine")
    assert stopped_at(first, 5) == "cancelled"
    ckpt.save_checkpoint(tmp_path, {**torch.load(ckpt.list_checkpoints(tmp_path)[-1].path, weights_only=True),
                                    "step": 7, "job_id": "theirs"})
    cnn = make_trainer(**{**common, "model": "cnn"}, job_id="mine")
    ckpt.save_checkpoint(tmp_path, {**cnn.state([cnn.metrics.state_dict()]), "step": 9})
    resumed = make_trainer(**common, job_id="mine")
    state = ckpt.load_latest(tmp_path, foreign=resumed.foreign)
    assert state["step"] == 5
    assert "step-000000009.pt is not this job's (its model_name is 'cnn', not 'mlp')" in caplog.text
    assert "step-000000007.pt is not this job's (its job_id is 'theirs', not 'mine')" in caplog.text
    resumed.restore(state)
    assert resumed.run() == "completed"


def test_a_checkpoint_whose_name_says_a_later_step_than_it_holds_is_skipped_when_resuming(make_trainer, tmp_path,
                                                                                             caplog):
    """A file copied or renamed to a later step's name (step-999999999999999999.pt holding step 3) was resumed from
    as the newest, on every resume, the run's own newer checkpoint passed over and the steps since trained again:
    it is skipped, as a damaged one is, and the resume continues from the newest checkpoint that is what it says."""
    common = dict(model="mlp", dataset="digits", epochs=1, batch_size=64, checkpoint_dir=tmp_path)
    assert stopped_at(make_trainer(**common, checkpoint_every=3, keep_checkpoints=0), 5) == "cancelled"
    misnamed = tmp_path / "step-999999999999999999.pt"
    misnamed.write_bytes((tmp_path / ckpt.checkpoint_name(3)).read_bytes())
    resumed = make_trainer(**common)
    state = ckpt.load_latest(tmp_path, foreign=resumed.foreign)
    assert state["step"] == 5
    assert f"checkpoint {misnamed} is not this job's (it holds step 3, not the 999999999999999999 its name says)" \
        in caplog.text


def _without(state: dict, *keys: str) -> dict:
    return {key: value for key, value in state.items() if key not in keys}


@pytest.mark.parametrize("newest,why", [
    (lambda good, cnn: good["model"], "it has no 'step'"),        # final weights saved under a checkpoint's name
    (lambda good, cnn: _without({**good, "step": 9}, "optimizer"), "it has no 'optimizer'"),
    # a cnn's, from before checkpoints named their model
    (lambda good, cnn: _without({**cnn, "step": 9}, "model_name"), "its model weights are another model's"),
    (lambda good, cnn: {**good, "step": 9, "model": {**good["model"], "net.1.weight": torch.zeros(3, 3)}},
     "its model weight net.1.weight has shape [3, 3], not [")])
def test_a_checkpoint_that_loads_without_what_a_resume_needs_falls_back_to_the_one_before(
        newest, why, make_trainer, tmp_path, caplog):
    """A newest checkpoint that loads but lacks a key the resume reads, or holds weights of another shape, failed
    the job (`KeyError: 'step'`; torch's many-line size mismatch, with the job's counters and weights already
    taken from it), where a damaged one falls back to the one before it."""
    common = dict(model="mlp", dataset="digits", epochs=1, batch_size=64, checkpoint_dir=tmp_path)
    assert stopped_at(make_trainer(**common), 5) == "cancelled"
    good = torch.load(ckpt.list_checkpoints(tmp_path)[-1].path, weights_only=True)
    cnn = make_trainer(**{**common, "model": "cnn", "checkpoint_dir": None})
    ckpt.atomic_save(newest(good, cnn.state([cnn.metrics.state_dict()])), tmp_path / ckpt.checkpoint_name(9))
    resumed = make_trainer(**common)
    state = ckpt.load_latest(tmp_path, foreign=resumed.foreign)
    assert state["step"] == 5
    assert f"checkpoint {tmp_path / ckpt.checkpoint_name(9)} is not this job's ({why}" in caplog.text
    resumed.restore(state)
    assert resumed.metrics.steps == 5


@pytest.mark.parametrize("spoil,why", [
    (lambda state: state["metrics_by_rank"][0].update(loss_first=float("nan")), "its metrics state is none ("),
    (lambda state: state["metrics_by_rank"][0].update(phases={"compute": -1.0}), "its metrics state is none ("),
    (lambda state: state.update(samples=-64), "its metrics state is none (ValueError: samples"),
    (lambda state: state.update(metrics_by_rank=["not a state"]), "its metrics state is none ("),
    (lambda state: state.update(metrics_by_rank=7), "its metrics_by_rank is 7, not a list of states"),
    (lambda state: state.update(metrics_by_rank={"rank 0": {}}), "its metrics_by_rank is {'rank 0': {}}, not a list"),
    (lambda state: state.update(epoch="x"), "its epoch is 'x', not a whole number >= 0")])
def test_a_checkpoint_whose_metrics_state_is_refused_falls_back_to_the_one_before(spoil, why, make_trainer, tmp_path,
                                                                                     caplog):
    """A newest checkpoint whose metrics state the metrics refuse whole (a NaN loss, a negative phase or sample
    count) was resumed from with none of its counters: the run went on at its position in the data from step 0,
    ended at 18 steps for 23, and wrote its checkpoints under steps the older ones held. Skipped as a damaged one
    is, the resume continues from the checkpoint before it, its counters those of that checkpoint. One whose epoch
    was no number failed the job (`ValueError: invalid literal for int()`), its weights already taken, and so did
    one whose metrics_by_rank was no list (`TypeError: object of type 'int' has no len()`, `KeyError: 0`)."""
    common = dict(model="mlp", dataset="digits", epochs=1, batch_size=64, seed=3)
    straight = make_trainer(**common)
    straight.run()
    first = make_trainer(**common, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert stopped_at(first, 5) == "cancelled"
    newest = ckpt.list_checkpoints(tmp_path)[-1].path
    state = torch.load(newest, weights_only=True)
    spoil(state)
    ckpt.atomic_save(state, newest)
    resumed = make_trainer(**common, checkpoint_dir=tmp_path)
    restored = ckpt.load_latest(tmp_path, foreign=resumed.foreign)
    assert restored["step"] == 3
    assert f"checkpoint {newest} is not this job's ({why}" in caplog.text
    resumed.restore(restored)
    assert (resumed.metrics.steps, resumed.metrics.samples) == (3, 3 * 64)
    assert resumed.run() == "completed"
    assert (resumed.metrics.steps, resumed.metrics.samples) == (straight.metrics.steps, straight.metrics.samples)


def test_a_checkpoint_whose_other_ranks_metrics_state_is_refused_is_skipped_by_every_rank(make_trainer, tmp_path):
    """Each rank asked of its own state only: where rank 1's was refused and rank 0's not, rank 0 resumed from the
    newest checkpoint and rank 1 from the one before, the two training on from different places."""
    from types import SimpleNamespace

    trainer = make_trainer(model="mlp", dataset="digits", epochs=1, batch_size=64, checkpoint_dir=tmp_path,
                           checkpoint_every=3)
    assert stopped_at(trainer, 3) == "cancelled"
    state = torch.load(ckpt.list_checkpoints(tmp_path)[-1].path, weights_only=True)
    good = state["metrics_by_rank"][0]
    state["metrics_by_rank"] = [good, {**good, "checkpoints": 0, "loss_first": float("nan")}]
    for rank in (0, 1):
        trainer.dist = SimpleNamespace(world_size=2, rank=rank, is_main=rank == 0, enabled=True)
        assert trainer.foreign(state).startswith("rank 1's metrics state is none (ValueError: loss_first")
    state["metrics_by_rank"][1]["loss_first"] = good["loss_first"]
    assert trainer.foreign(state) is None


def test_a_resume_with_another_batch_size_fails_instead_of_training_samples_twice(make_trainer, tmp_path):
    """The position is a count of batches: 12 batches of 64 resumed with --batch-size 16 skipped 192 samples
    only, and trained 576 of the epoch again."""
    first = make_trainer(model="mlp", dataset="digits", epochs=1, batch_size=64, checkpoint_dir=tmp_path)
    assert stopped_at(first, 12) == "cancelled"
    resumed = make_trainer(model="mlp", dataset="digits", epochs=1, batch_size=16, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="written with --batch-size 64: .* resume with --batch-size 64"):
        resumed.restore(ckpt.load_latest(tmp_path, foreign=resumed.foreign))
    assert resumed.metrics.steps == 12          # the job's counters were taken first: no reset in Prometheus


@pytest.mark.parametrize("changed,flag", [({"dataset": "blobs"}, "--dataset digits"), ({"seed": 7}, "--seed 0")])
def test_a_resume_with_another_dataset_or_seed_fails_as_another_batch_size_does(changed, flag, make_trainer, tmp_path):
    """Resumed on another dataset (its epoch 7 batches long), the position skipped the first epoch whole; on
    another seed, the epoch's rest came from another shuffle (samples trained twice, others never)."""
    first = make_trainer(model="mlp", dataset="digits", epochs=1, batch_size=64, seed=0, checkpoint_dir=tmp_path)
    assert stopped_at(first, 12) == "cancelled"
    resumed = make_trainer(**{"model": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 64, "seed": 0,
                              "checkpoint_dir": tmp_path, **changed})
    with pytest.raises(ValueError, match=f"written with {flag}: .* resume with {flag}"):
        resumed.restore(ckpt.load_latest(tmp_path, foreign=resumed.foreign))


def test_a_resumed_run_publishes_the_learning_rate_it_trains_with_and_the_last_evaluation(make_trainer, tmp_path):
    """--lr on a resume was published while the checkpoint's optimizer state went on with its own; a run
    resumed after its last evaluation published no evaluation loss or accuracy."""
    first = make_trainer(model="mlp", dataset="digits", epochs=1, batch_size=64, lr=0.001, checkpoint_dir=tmp_path)
    assert first.run() == "completed"
    evaluated = first.metrics.last_evaluation
    resumed = make_trainer(model="mlp", dataset="digits", epochs=1, batch_size=64, lr=0.05, checkpoint_dir=tmp_path)
    resumed.restore(ckpt.load_latest(tmp_path, foreign=resumed.foreign))
    assert resumed.run() == "completed"            # nothing left to train
    assert resumed.metrics.learning_rate == 0.001
    last = resumed.metrics.last_evaluation
    assert (last.index, last.step, last.loss, last.accuracy) == (evaluated.index, evaluated.step, evaluated.loss,
                                                                 evaluated.accuracy)


def test_a_resume_from_a_checkpoint_past_the_runs_epochs_says_nothing_is_left_to_train(make_trainer, tmp_path,
                                                                                        caplog):
    """A checkpoint of a run of more epochs, resumed with fewer: the job completed at once, its steps past the run's
    total and its final model trained longer than --epochs asked, and the log said nothing of it."""
    first = make_trainer(model="mlp", dataset="digits", epochs=2, batch_size=64, checkpoint_dir=tmp_path)
    assert first.run() == "completed"
    resumed = make_trainer(model="mlp", dataset="digits", epochs=1, batch_size=64, checkpoint_dir=tmp_path)
    resumed.restore(ckpt.load_latest(tmp_path, foreign=resumed.foreign))
    assert resumed.run() == "completed" and resumed.metrics.steps == first.metrics.steps
    assert ("the checkpoint is past --epochs 1 (epoch 2, batch 0): nothing is left to train and its weights are "
            "the final model") in caplog.text
    caplog.clear()
    again = make_trainer(model="mlp", dataset="digits", epochs=2, batch_size=64, checkpoint_dir=tmp_path)
    again.restore(ckpt.load_latest(tmp_path, foreign=again.foreign))      # its own end: nothing past it
    assert "past --epochs" not in caplog.text


def test_a_cancel_during_a_pauses_checkpoint_cancels(make_trainer, tmp_path):
    """SIGUSR1, then SIGTERM while the pause's checkpoint was written: the run returned `paused` (exit 4)."""
    trainer = make_trainer(model="mlp", dataset="digits", epochs=1, batch_size=64, checkpoint_dir=tmp_path)
    checkpoint = trainer.checkpoint

    def cancelled_while_writing():
        trainer.stop.request(signal.SIGTERM)
        return checkpoint()

    assert stopped_at(trainer, 5, signal.SIGUSR1, then=lambda: setattr(trainer, "checkpoint",
                                                                       cancelled_while_writing)) == "cancelled"


def test_a_killed_final_model_write_leaves_no_temp_file_for_good(tmp_path):
    """A kill while model.pt was written left its temp file (a full copy of the weights) for every later run."""
    (tmp_path / f".{ckpt.FINAL_MODEL_NAME}.x1y2z3.tmp").write_bytes(b"weights")
    (tmp_path / ".step-000000040.pt.abc.tmp").write_bytes(b"weights")
    ckpt.ensure_writable_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("other", ["another file of the name", "another target"])
def test_a_resume_on_other_data_under_the_same_name_fails(other, make_trainer, tmp_path):
    """The dataset was checked by its name only, a file's stem: another data.csv (another directory, the file
    grown or edited, another --target of it) resumed at the old position in a shuffle of other data, its held-out
    split drawn anew (samples the first run trained on held out now), and exited 0."""
    rng = np.random.default_rng(0)

    def write(directory, rows):
        x = rng.normal(size=(rows, 3))
        labels = np.c_[(x[:, 0] > 0), (x[:, 1] > 0)].astype(int)
        (tmp_path / directory).mkdir()
        path = tmp_path / directory / "data.csv"
        path.write_text("a,b,c,label,other\n" + "".join(f"{a:.5f},{b:.5f},{c:.5f},{k},{m}\n"
                                                         for (a, b, c), (k, m) in zip(x, labels)))
        return str(path)

    first_data = write("first", 300)
    (tmp_path / "ck").mkdir()
    common = dict(model="mlp", epochs=1, batch_size=32, checkpoint_dir=tmp_path / "ck")
    first = make_trainer(**common, dataset=first_data)
    assert stopped_at(first, 3) == "cancelled"
    if other == "another target":
        resumed = make_trainer(**common, dataset=first_data, target="other")
    else:
        resumed = make_trainer(**common, dataset=write("second", 900))
    assert resumed.dataset.name == first.dataset.name == "data"
    with pytest.raises(ValueError, match="written with other data under the dataset name 'data'"):
        resumed.restore(ckpt.load_latest(tmp_path / "ck", foreign=resumed.foreign))
    # The same data resumes as before.
    again = make_trainer(**common, dataset=first_data)
    again.restore(ckpt.load_latest(tmp_path / "ck", foreign=again.foreign))
    assert again.run() == "completed"


class _WritingSlowly:
    """Pickled by torch.save only once the test lets it: a checkpoint write in progress, its temp file open."""

    def __init__(self, started, release):
        self.started, self.release = started, release

    def __reduce__(self):
        self.started.set()
        assert self.release.wait(timeout=60)
        return (int, (5,))


def test_a_checkpoint_being_written_is_no_leftover_for_another_start_of_the_job(tmp_path):
    """ensure_writable_dir removed every temp file, a live writer's too: a second start of the job on the directory
    (refused afterwards, its job id claimed by the running process) removed the running job's checkpoint as it was
    written, and the running job failed on the rename (FileNotFoundError)."""
    import threading

    started, release, failures = threading.Event(), threading.Event(), []

    def write():
        try:
            ckpt.atomic_save({"step": 3, "slow": _WritingSlowly(started, release)}, tmp_path / ckpt.checkpoint_name(3))
        except Exception as error:
            failures.append(error)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert started.wait(timeout=60)
        ckpt.ensure_writable_dir(tmp_path)          # the second start, while the first writes
    finally:
        release.set()
        writer.join(timeout=60)
    assert failures == []
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [3]
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.checkpoint_name(3)]


def test_a_checkpoint_with_a_compressed_entry_is_skipped_when_resuming(tmp_path, caplog):
    """torch.save stores every entry as it is; torch.load inflates a deflated one: a planted file of 290 KB (one
    tensor of zeros, deflated) took 300 MB of the resuming process's memory, a larger one the OOM killer's at every
    resume (found in review). A compressed entry is no trainer's checkpoint: the one before it is taken."""
    import zipfile

    ckpt.save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(2)})
    ckpt.save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(1 << 16)})
    stored = tmp_path / ckpt.checkpoint_name(2)
    with zipfile.ZipFile(stored) as archive:
        entries = {entry.filename: archive.read(entry) for entry in archive.infolist()}
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    assert stored.stat().st_size < 4096 and torch.load(stored, weights_only=True)["step"] == 2     # it would load
    assert ckpt.load_latest(tmp_path)["step"] == 1
    assert f"{ckpt.checkpoint_name(2)} holds a compressed entry" in caplog.text


def test_a_checkpoint_whose_zip_header_zipfile_refuses_still_resumes(tmp_path):
    """The compressed-entry check reads each checkpoint with zipfile first: a damaged byte of a checkpoint's central
    directory (its entry's "version needed to extract" past what zipfile knows) raised NotImplementedError out of
    the check, and out of load_latest: the resume failed whole, where torch.load (miniz, which does not look at
    that field) loads the checkpoint, and any error of it was only a cue to try the one before."""
    ckpt.save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(2)})
    ckpt.save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(4)})
    damaged = tmp_path / ckpt.checkpoint_name(2)
    data = bytearray(damaged.read_bytes())
    data[data.index(b"PK\x01\x02") + 6] = 0xff        # its first entry's version needed to extract: 25.5
    damaged.write_bytes(bytes(data))
    assert torch.load(damaged, weights_only=True)["step"] == 2                                   # it loads
    assert ckpt.load_latest(tmp_path)["step"] == 2
