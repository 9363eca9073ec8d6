"""Flags → config tree: reference names, presets, precedence, validation, JSON round trip."""

import pathlib
import subprocess
import sys

import pytest

from pipeline import configs
from pipeline.runner import cli

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


# ----------------------------------------------------------------------------- protocols


def test_default_protocol_after_pretraining_is_linear_evaluation():
    config = parse([])
    f = config.finetune
    assert f.finetune_protocol == "linear_eval"
    assert (f.fine_tune_after_block, f.zero_init_logits_layer) == (4, True)
    assert (f.optimizer, f.learning_rate, f.weight_decay, f.warmup_epochs) == (
        "momentum",
        0.1,
        0.0,
        0.0,
    )
    assert config.model.ft_proj_selector == 0
    # The digits preset keeps its laptop-sized epoch budget.
    assert f.train_epochs == configs.DATASET_PRESETS["digits"]["finetune.train_epochs"]


def test_label_fraction_defaults_to_semi_supervised_fine_tuning(tmp_path):
    for fraction, epochs in ((0.01, 60), (0.1, 30)):
        config = parse([f"--label_fraction={fraction}"])
        f = config.finetune
        assert f.finetune_protocol == "fine_tune"
        assert (f.fine_tune_after_block, f.optimizer, f.learning_rate) == (-1, "lars", 0.005)
        assert f.learning_rate_scaling == "sqrt" and f.zero_init_logits_layer
        assert config.model.ft_proj_selector == 1
        assert f.train_epochs == epochs  # counted over the labeled subset
    subset = tmp_path / "my_labels.txt"
    subset.write_text("a.jpg\n")
    # A list's fraction is counted by the Trainer (tests/models/test_tasks.py), not guessed.
    config = parse([f"--label_subset={subset}"])
    assert config.recipe_epochs
    assert configs.trainer_config(config, "finetune").labels.recipe_epochs
    assert not configs.trainer_config(config, "distill").labels.recipe_epochs
    assert not parse([f"--label_subset={subset}", "--finetune_train_epochs=7"]).recipe_epochs


def test_explicit_flags_override_the_protocol_recipe():
    config = parse(
        [
            "--finetune_protocol=fine_tune",
            "--finetune_learning_rate=0.02",
            "--fine_tune_after_block=2",
            "--ft_proj_selector=0",
        ]
    )
    f = config.finetune
    assert f.finetune_protocol == "fine_tune" and f.optimizer == "lars"
    assert (f.learning_rate, f.fine_tune_after_block) == (0.02, 2)
    assert config.model.ft_proj_selector == 0


def test_imagenet_linear_evaluation_uses_its_own_recipe(tmp_path):
    config = parse(["--dataset=imagenet2012", f"--data_dir={tmp_path}"])
    assert config.finetune.finetune_protocol == "linear_eval"
    assert (config.finetune.weight_decay, config.finetune.train_epochs) == (1e-6, 90)


def test_supervised_training_from_scratch_is_named_so():
    config = parse(["--train_mode=finetune", "--learning_rate=0.05"])
    assert config.finetune.finetune_protocol == "supervised"
    assert config.finetune.fine_tune_after_block == -1  # the reference default, not a recipe
    assert config.finetune.learning_rate == 0.05


@pytest.mark.parametrize(
    "argv",
    [
        ["--finetune_protocol=supervised"],
        ["--train_mode=finetune", "--checkpoint=CKPT", "--finetune_protocol=supervised"],
        ["--train_mode=finetune", "--finetune_protocol=linear_eval"],
        ["--train_mode=finetune", "--finetune_protocol=fine_tune"],
    ],
)
def test_a_protocol_that_misnames_the_training_is_refused(argv, tmp_path, capsys):
    """'supervised' means from scratch: after pretraining (or on an imported backbone) it would
    run the reference's defaults on a pretrained backbone under that name; the other protocols
    need a pretrained backbone."""
    argv = [a.replace("CKPT", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit):
        parse(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --finetune_protocol: "), err
    # What each of those users can run instead is accepted and named for what it trains.
    assert parse(["--train_mode=finetune"]).finetune.finetune_protocol == "supervised"
    imported = parse(["--train_mode=finetune", f"--checkpoint={tmp_path}"])
    assert imported.finetune.finetune_protocol == "linear_eval"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--proj_head_mode=none", "--ft_proj_selector=1"], "--ft_proj_selector"),
        (["--proj_head_mode=none", "--ft_proj_selector=-1"], "--ft_proj_selector"),
        (["--num_proj_layers=2", "--ft_proj_selector=3"], "--ft_proj_selector"),
        (["--ft_proj_selector=-2"], "--ft_proj_selector"),
        (["--warm_start", "--warm_start_epochs=-1"], "--warm_start_epochs"),
        (["--train_mode=finetune", "--warm_start"], "--warm_start"),
        (["--finetune_protocol=fine_tune", "--proj_head_mode=linear"], None),
        (["--distill", "--distill_train_batch_size=0"], "--distill_train_batch_size"),
        (["--distill", "--distill_learning_rate=-1"], "--distill_learning_rate"),
        (["--min_top1=-0.5"], "--min_top1"),
    ],
)
def test_protocol_and_distill_validation(argv, flag, capsys):
    if flag is None:  # valid: the recipe's selector fits the one linear projection layer
        assert parse(argv).model.ft_proj_selector == 1
        return
    with pytest.raises(SystemExit):
        parse(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err


def test_imported_checkpoint_cannot_freeze_a_partial_backbone(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(
            [
                "--train_mode=finetune",
                f"--checkpoint={tmp_path}",
                "--finetune_protocol=fine_tune",
                "--fine_tune_after_block=2",
            ]
        )
    assert "--fine_tune_after_block" in capsys.readouterr().err


# ----------------------------------------------------------------------------- per-stage config


def test_caching_is_on_by_default_and_can_be_turned_off():
    """The user's plain command reruns resume; both boolean spellings turn that off."""
    assert parse([]).runner.enable_cache is True
    assert parse(["--noenable_cache"]).runner.enable_cache is False
    assert parse(["--enable_cache=false"]).runner.enable_cache is False


def test_each_trainer_gets_only_what_it_reads():
    base = parse([])
    gated = parse(["--min_top1=0.9", "--max_top1_regression=0.5", "--enable_cache"])
    relabeled = parse(["--label_fraction=0.1"])
    hotter = parse(["--temperature=0.2"])

    def key(config, stage):
        return configs.trainer_config(config, stage).to_json()

    # Gates and runner options reach no Trainer, so caching keeps both trainings.
    assert key(gated, "pretrain") == key(base, "pretrain")
    assert key(gated, "finetune") == key(base, "finetune")
    # The labels the finetune stage uses do not concern pretraining; the temperature does.
    assert key(relabeled, "pretrain") == key(base, "pretrain")
    assert key(relabeled, "finetune") != key(base, "finetune")
    assert key(hotter, "pretrain") != key(base, "pretrain")
    pretrain = configs.trainer_config(base, "pretrain")
    assert pretrain.labels is None and pretrain.train.temperature == base.pretrain.temperature
    finetune = configs.trainer_config(relabeled, "finetune")
    assert finetune.labels.label_fraction == 0.1 and finetune.model.ft_proj_selector == 1
    assert "min_top1" not in key(base, "finetune") and "model_dir" not in key(base, "finetune")


def test_distill_trainer_gets_the_student_network():
    config = parse(["--distill", "--distill_resnet_depth=34", "--distill_width_multiplier=0.5"])
    student = configs.trainer_config(config, "distill").model
    assert (student.resnet_depth, student.width_multiplier) == (34, 0.5)


@pytest.mark.parametrize("classes, floor", [(2, 0.75), (3, 0.25 + 1 / 3), (10, 0.2), (1000, 0.002)])
def test_default_gate_is_clearly_above_chance(classes, floor):
    assert configs.chance_floor(classes) == pytest.approx(floor)


def test_width_that_crashes_onednn_at_imagenet_size_is_rejected(tmp_path, capsys, monkeypatch):
    argv = ["--dataset=imagenet2012", f"--data_dir={tmp_path}", "--width_multiplier=0.125"]
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    with pytest.raises(SystemExit):
        parse(argv)
    assert "--width_multiplier: 0.125 at --image_size=224" in capsys.readouterr().err
    assert parse(argv[:2] + ["--width_multiplier=0.25"]).model.width_multiplier == 0.25
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert parse(argv).model.width_multiplier == 0.125
