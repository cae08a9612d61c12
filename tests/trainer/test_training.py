"""Real training: accuracy climbs well above chance, the language model's loss falls."""

import numpy as np
import pytest


def test_mlp_on_generated_blobs_beats_chance_by_far(make_trainer):
    trainer = make_trainer(model="mlp", dataset="blobs", epochs=3)
    trainer.evaluate()
    before = trainer.eval_accuracy
    assert trainer.run() == "completed"
    assert before < 0.45                      # 5 classes: chance is 0.2
    assert trainer.eval_accuracy > 0.85
    assert trainer.metrics.steps == 3 * -(-3200 // 64)


def test_cnn_on_digits_images_beats_chance_by_far(make_trainer):
    trainer = make_trainer(model="cnn", dataset="digits", epochs=4, batch_size=32)
    trainer.evaluate()
    before = trainer.eval_accuracy
    trainer.run()
    assert before < 0.25                      # 10 classes: chance is 0.1
    assert trainer.eval_accuracy > 0.85


def test_mlp_also_trains_on_flattened_digits(make_trainer):
    trainer = make_trainer(model="mlp", dataset="digits", epochs=3, batch_size=32)
    trainer.run()
    assert trainer.eval_accuracy > 0.85


def test_character_transformer_loss_falls(make_trainer):
    trainer = make_trainer(model="transformer", dataset="corpus", epochs=1, batch_size=16, lr=3e-3)
    trainer.evaluate()
    before = trainer.eval_loss
    trainer.run()
    assert before > 4.0                       # about ln(92) for a uniform guess over the vocabulary
    assert trainer.eval_loss < before - 1.0


def test_user_csv_regression_learns(make_trainer, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 3))
    y = x @ np.array([1.5, -2.0, 0.5]) + 0.1 * rng.normal(size=600)
    rows = ["a,b,c,label"] + [f"{a:.5f},{b:.5f},{c:.5f},{t:.5f}" for (a, b, c), t in zip(x, y)]
    path = tmp_path / "reg.csv"
    path.write_text("\n".join(rows) + "\n")
    trainer = make_trainer(model="mlp", dataset=str(path), epochs=5, batch_size=32, lr=3e-3)
    assert trainer.dataset.task == "regression"
    trainer.evaluate()
    before = trainer.eval_loss
    trainer.run()
    assert trainer.eval_accuracy is None
    assert trainer.eval_loss < before / 10


def test_user_npz_classification_with_custom_target_column(make_trainer, tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    trainer = make_trainer(model="mlp", dataset=str(tmp_path / "d.npz"), epochs=5, batch_size=32)
    trainer.run()
    assert trainer.eval_accuracy > 0.9


@pytest.mark.parametrize("model,dataset", [("cnn", "blobs"), ("transformer", "digits"), ("mlp", "corpus")])
def test_model_and_dataset_must_fit(model, dataset):
    from trainmetrics.trainer.config import TrainConfig
    from trainmetrics.trainer.runner import BadInput, prepare

    with pytest.raises(BadInput, match=model if model != "mlp" else "transformer"):
        prepare(TrainConfig(job_id="x", model=model, dataset=dataset))


@pytest.mark.parametrize("suffix", [".csv", ".npz", ".txt"])
def test_a_file_dataset_is_named_as_the_job_server_names_the_upload(tmp_path, suffix):
    from trainmetrics.trainer.data import load_dataset

    path = tmp_path / f"ds-03ec8b82c3d2{suffix}"
    if suffix == ".npz":
        np.savez(path, x=np.ones((20, 2), dtype=np.float32), y=np.arange(20) % 2)
    else:
        path.write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20)) if suffix == ".csv" else "ab" * 500)
    assert load_dataset(str(path)).name == "ds-03ec8b82c3d2"       # the job spec's `dataset`, no file suffix


def test_an_epochs_steps_are_counted_from_each_ranks_share_as_the_loader_takes_it():
    """The progress bar's total counted each rank's share rounded up (10 rows on 3 ranks: 4 each, 2 batches of 3)
    where the ranks take 10 // 3 = 3 rows each (1 batch): one step too many per epoch."""
    from torch.utils.data import DataLoader

    from trainmetrics.trainer.runner import steps_per_epoch

    for rows, world, batch in ((10, 3, 3), (10, 1, 3), (12, 3, 2), (7, 2, 8), (100, 4, 7)):
        share = list(range(rows))[: rows - rows % world][0::world]       # as Trainer.batches takes rank 0's
        assert steps_per_epoch(rows, world, batch) == len(DataLoader(share, batch_size=batch)), (rows, world, batch)


def test_a_csv_whose_labels_skip_some_says_how_many_it_holds(tmp_path):
    """Labels 0 and 7 made a model of 8 outputs, and the log said "8 classes" of a data set of 2."""
    from trainmetrics.trainer.data import load_dataset

    path = tmp_path / "gaps.csv"
    path.write_text("a,label\n" + "".join(f"{i},{7 * (i % 2)}\n" for i in range(20)))
    dataset = load_dataset(str(path))
    assert dataset.num_outputs == 8
    assert dataset.task_said == "classification (2 classes, labels 0 to 7)"
    assert load_dataset("blobs").task_said == "classification (5 classes)"       # every label there: as before


def test_a_small_files_regression_targets_are_bounded_by_the_batches_it_forms(tmp_path):
    """A file of a few rows forms batches of those rows: its targets' bound is that of such a batch, not of the
    evaluation's 512 (3 rows with a target of 1e18 were refused, their loss finite)."""
    from trainmetrics.datafiles import DatasetError
    from trainmetrics.trainer.config import TrainConfig
    from trainmetrics.trainer.data import load_dataset
    from trainmetrics.trainer.runner import check_regression_targets

    few = tmp_path / "few.csv"
    few.write_text("a,y\n1,1e18\n2,2.5\n3,1.5\n")
    check_regression_targets(TrainConfig(job_id="few-1", dataset=str(few), target="y"), load_dataset(str(few), target="y", seed=0))
    many = tmp_path / "many.csv"
    many.write_text("a,y\n" + "".join(f"{i},{'1e18' if i == 7 else '2.5'}\n" for i in range(3000)))
    with pytest.raises(DatasetError, match="in a batch of 512"):
        check_regression_targets(TrainConfig(job_id="many-1", dataset=str(many), target="y"),
                                 load_dataset(str(many), target="y", seed=0))


def test_a_diverged_model_whose_outputs_are_nan_is_not_accurate(make_trainer, tmp_path):
    """Before, argmax took a NaN score for the highest, so a model whose weights had gone NaN (a learning rate
    too high) "predicted" class 0 for every sample: on data nine tenths of class 0 its accuracy was 0.9, as high as
    a model that had learnt, published as trainer_eval_accuracy_ratio and the summary's eval_accuracy."""
    import torch

    rng = np.random.default_rng(3)
    y = (np.arange(200) % 10 == 0).astype(np.int64)          # nine tenths of class 0
    np.savez(tmp_path / "skewed.npz", x=rng.normal(size=(200, 2)).astype(np.float32), y=y)
    trainer = make_trainer(model="mlp", dataset=str(tmp_path / "skewed.npz"))
    with torch.no_grad():
        for parameter in trainer.net.parameters():
            parameter.fill_(float("nan"))
    trainer.evaluate()
    assert trainer.eval_accuracy == 0.0
    assert trainer.metrics.last_evaluation.accuracy == 0.0


def _write_csv(path, features, targets, target_format="{}"):
    rows = ["a,b,c,label"] + [",".join(f"{v:.5f}" for v in row) + "," + target_format.format(t)
                              for row, t in zip(features, targets)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_a_csv_feature_in_the_millions_does_not_keep_the_mlp_at_chance(make_trainer, tmp_path):
    """Before, features went into the mlp raw: a column in the millions (an income, a byte count) saturated every
    unit, and a label that the first column alone decides stayed at chance accuracy (0.5) after training."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] > 0).astype(np.int64)
    x[:, 1] *= 1e6
    trainer = make_trainer(model="mlp", dataset=_write_csv(tmp_path / "wide.csv", x, y), epochs=10, batch_size=32)
    trainer.run()
    assert trainer.eval_accuracy > 0.9


@pytest.mark.parametrize("negative, positive", [(-3.4e38, 3.4e38), (0.0, 2.8e-45)], ids=["past-float32", "subnormal"])
def test_a_feature_at_float32s_edges_trains_to_a_finite_loss(negative, positive, make_trainer, tmp_path):
    """Before, the mlp standardised a feature as (x - mean) / std in float32: a column holding -3.4e38 and 3.4e38
    (each finite, accepted by the upload) overflowed x - mean to infinity, and the loss was NaN from the first
    step while the job "completed"; the label, decided by the column's sign, was not learnt. Taken at half scale
    instead, a column of 0 and 2.8e-45 (its std 1.4e-45, half of which rounds to 0) divided by 0: half scale is
    taken only where x - mean overflowed."""
    import math

    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 2))
    y = (x[:, 0] > 0).astype(np.int64)
    rows = ["a,b,label"] + [f"{positive if a > 0 else negative:.6g},{b:.5f},{t}" for (a, b), t in zip(x, y)]
    (tmp_path / "edges.csv").write_text("\n".join(rows) + "\n")
    trainer = make_trainer(model="mlp", dataset=str(tmp_path / "edges.csv"), epochs=5, batch_size=32,
                           log_every=5)
    trainer.run()
    assert trainer.metrics.nonfinite_losses == 0
    assert math.isfinite(trainer.eval_loss)
    assert trainer.eval_accuracy > 0.9


def test_a_regression_target_of_large_magnitude_is_learnt_and_its_loss_is_in_its_own_units(make_trainer, tmp_path):
    """Before, an output that starts near 0 and moves about --lr a step never reached targets around 1e5: the eval
    loss stayed at ~1e10, the targets' squared size, after every epoch. The loss published is still the squared
    error in the target's units, over the raw held-out split, as model.pt answers raw inputs."""
    import torch

    rng = np.random.default_rng(5)
    x = rng.normal(size=(600, 3))
    y = 1e5 + 1e4 * (x @ np.array([1.5, -2.0, 0.5]))
    trainer = make_trainer(model="mlp", dataset=_write_csv(tmp_path / "big.csv", x, y, "{:.3f}"), epochs=5,
                           batch_size=32, lr=3e-3)
    trainer.run()
    inputs, targets = trainer.dataset.eval.tensors
    with torch.no_grad():
        squared_error = float(((trainer.net.eval()(inputs) - targets) ** 2).mean())
    assert trainer.eval_loss == pytest.approx(squared_error, rel=1e-4)
    assert trainer.eval_loss < 0.1 * float(targets.var())
