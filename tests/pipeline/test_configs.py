"""Flags → config tree: reference names, presets, precedence, validation, JSON round trip."""

import pathlib
import subprocess
import sys

import pytest

from pipeline import cli, configs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
REFERENCE_CIFAR_COMMAND = [
    "--train_mode=pretrain",
    "--train_batch_size=512",
    "--train_epochs=1000",
    "--learning_rate=1.0",
    "--weight_decay=1e-4",
    "--temperature=0.5",
    "--dataset=cifar10",
    "--image_size=32",
    "--resnet_depth=18",
    "--use_blur=False",
    "--color_jitter_strength=0.5",
]


def parse(argv):
    return cli.parse_config(argv, prog="test", description="test")[0]


def test_reference_command_lands_in_pretrain_stage(tmp_path):
    config = parse(REFERENCE_CIFAR_COMMAND + [f"--data_dir={tmp_path}"])
    assert config.train_mode == "pretrain"
    assert config.pretrain.train_batch_size == 512
    assert config.pretrain.train_epochs == 1000
    assert config.pretrain.learning_rate == 1.0
    assert config.pretrain.weight_decay == 1e-4
    assert config.pretrain.temperature == 0.5
    assert config.data.image_size == 32
    assert config.model.resnet_depth == 18
    assert config.augment.use_blur is False
    assert config.augment.color_jitter_strength == 0.5
    # The fine-tuning stage keeps the reference's fine-tuning recipe.
    assert config.finetune.optimizer == "momentum"
    assert config.finetune.learning_rate_scaling == "linear"


def test_defaults_are_the_reference_defaults():
    config = configs.SimCLRConfig()
    assert config.pretrain.learning_rate == 0.3
    assert config.pretrain.temperature == 0.1
    assert config.pretrain.optimizer == "lars"
    assert config.model.resnet_depth == 50
    assert config.model.proj_out_dim == 128
    assert config.data.image_size == 224
    assert config.augment.use_blur is True


def test_user_flags_beat_presets_and_presets_beat_defaults():
    config = parse([])
    assert config.data.dataset == "digits"
    assert config.model.resnet_depth == configs.DATASET_PRESETS["digits"]["model.resnet_depth"]
    config = parse(["--resnet_depth=50", "--nouse_blur", "--finetune_learning_rate=0.5"])
    assert config.model.resnet_depth == 50
    assert config.augment.use_blur is False
    assert config.finetune.learning_rate == 0.5


def test_finetune_mode_routes_reference_flags_to_finetune_stage():
    config = parse(["--train_mode=finetune", "--learning_rate=0.05", "--optimizer=adam"])
    assert config.finetune.learning_rate == 0.05
    assert config.finetune.optimizer == "adam"
    with pytest.raises(SystemExit):
        parse(["--train_mode=finetune", "--finetune_learning_rate=0.05"])


def test_json_round_trip():
    config = parse(["--label_fraction=0.1", "--width_multiplier=2"])
    again = configs.SimCLRConfig.from_json(config.to_json())
    assert again == config
    assert again.finetune.label_fraction == 0.1


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--resnet_depth=17"], "--resnet_depth"),
        (["--train_batch_size=0"], "--train_batch_size"),
        (["--dataset=cifar10"], "--data_dir"),
        (["--dataset=cifar10", "--data_dir=/no/such/dir"], "--data_dir"),
        (["--label_fraction=0"], "--label_fraction"),
        (["--fine_tune_after_block=5"], "--fine_tune_after_block"),
        (["--width_multiplier=1.5"], "--width_multiplier"),
        (["--use_blur=maybe"], "--use_blur"),
    ],
)
def test_invalid_values_give_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert flag in err


def test_batch_not_divisible_by_replicas():
    config = parse(["--train_batch_size=130"])
    with pytest.raises(configs.ConfigError, match="--train_batch_size.*4 replicas"):
        configs.validate(config, num_replicas=4)


def test_help_lists_every_flag_with_default():
    out = subprocess.run(
        [sys.executable, "local_runner.py", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    ).stdout
    for flag, _path, _field, _ in configs.flag_fields():
        assert f"--{flag}" in out, flag
    flat = " ".join(out.split())
    assert "Initial learning rate per batch size of 256. (default: 0.3)" in flat
    assert "Dataset presets" in out


def test_flag_table_covers_every_flag():
    table = configs.flag_table()
    assert table.count("\n| `--") == len(configs.flag_fields())


def test_flags_doc_is_up_to_date():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_flags_doc", REPO_ROOT / "docs/make_flags_doc.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO_ROOT / "docs/flags.md").read_text() == module.render(), (
        "docs/flags.md is stale: run python docs/make_flags_doc.py"
    )
