import pytest

from trainer.cli import LOSSES, build_eval_parser, build_train_parser, train_main


def test_losses_match_the_heads():
    pytest.importorskip("keras")
    from trainer.heads import HEADS

    assert LOSSES == HEADS


def test_train_help_teaches_the_options():
    text = build_train_parser().format_help()
    for option in (
        "--loss",
        "--classes",
        "--epochs",
        "--input-size",
        "--alpha",
        "--weights",
        "--seed",
        "--batch-size",
        "--lr",
        "--fine-tune-layers",
        "--bank-size",
        "--save-float",
        "--far",
        "--scoring",
        "--patch-bank-rows",
        "--patch-top-k",
        "--folds",
        "--defects",
        "--threshold-rule",
        "ImageNet features",  # what the default is, and that it measured best
    ):
        assert option in text
    assert "--scorer" in build_eval_parser().format_help()
    assert "--float-model" in build_eval_parser().format_help()


def test_train_refuses_a_missing_folder(tmp_path, capsys):
    rc = train_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "b"), "--quiet"])
    assert rc == 2
    assert "not a directory" in capsys.readouterr().err


def test_train_refuses_a_bad_holdout(tmp_path, capsys):
    assert train_main([str(tmp_path), "--out", str(tmp_path / "b"), "--holdout", "0", "--quiet"]) == 2
    assert "--holdout" in capsys.readouterr().err
