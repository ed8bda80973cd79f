"""The typed config: every preset loads, and wrong values are refused in one line before any work."""

from __future__ import annotations

import pytest

from mstkd.cli import main
from mstkd.config import load_config, preset_names
from mstkd.errors import InputError
from mstkd.runconfig import RunConfig, project_config


@pytest.mark.parametrize("preset", preset_names("model"))
def test_every_preset_passes_the_schema(preset):
    cfg = load_config([f"model={preset}"])
    assert cfg.model.preset == preset and cfg.train.epochs > 0
    assert cfg.loss.attention == cfg.model.attention_distillation  # interpolation resolved


def test_right_values_of_every_kind_are_accepted():
    cfg = load_config(
        [
            "train.lr=2e-4",
            "train.epochs=15",
            "train.grad_clip=null",
            "train.eval_subsets=[flair,flair+t1ce]",
            "data.patch_size=[64,64,64]",
            "metrics.empty_hd95=373.13",
            "loss.activation=sigmoid",
            "train.amp=false",
        ]
    )
    assert cfg.train.lr == 2e-4 and cfg.train.epochs == 15 and cfg.train.grad_clip is None
    assert list(cfg.data.patch_size) == [64, 64, 64] and cfg.loss.activation == "sigmoid"


WRONG = {
    "train.lr=abc": "train.lr",
    "train.lr=0": "train.lr",
    "train.lr=-1e-3": "train.lr",
    "train.epochs=-1": "train.epochs",
    "train.epochs=0": "train.epochs",
    "train.seed=1.5": "train.seed",
    "train.batch_size=0": "train.batch_size",
    "train.amp=maybe": "train.amp",
    "train.mode=teacher": "train.mode",
    "train.student_moments=sometimes": "train.student_moments",
    "train.state_precision=quarter": "train.state_precision",
    "train.eval_subsets=[flair,t9]": "train.eval_subsets",
    "train.subset_weights=[1,2]": "train.subset_weights",
    "train.disc_betas=[0.9]": "train.disc_betas",
    "train.nope=1": "train.nope",
    "eval.overlap=1.5": "eval.overlap",
    "eval.decode=vote": "eval.decode",
    "loss.kl=-1": "loss.kl",
    "loss.activation=relu": "loss.activation",
    "loss.consistency_ramp=2": "loss.consistency_ramp",
    "data.modalities=[flair,t5]": "data.modalities",
    "data.split.val_fraction=0.95": "data.split",
    "data.foreground_ratio=1.5": "data.foreground_ratio",
    "model.input_size=[64,64]": "model.input_size",
    "model.input_size=[60,64,64]": "model.input_size",
    "data.patch_size=[64,64,32]": "data.patch_size",  # lite's discriminator needs 64 (tiny's 32)
    "model=huge": "model preset",
    # what sizes an allocation is bounded (a checkpoint's eval.roi of 4096^3 asked for 1 TB)
    "eval.roi=[4096,4096,4096]": "eval.roi=[4096, 4096, 4096]: each size must be at most 512",
    "model.input_size=[544,64,64]": "model.input_size",
    "data.patch_size=[64,64,1024]": "data.patch_size",
    "eval.sw_batch_size=100000": "eval.sw_batch_size=100000: at most 572 windows",
    "train.batch_size=100000": "train.batch_size=100000: at most 572 crops",
    "model.base_channels=1024": "model.base_channels=1024: at most 64",
    "model.vit.hidden=8192": "model.vit.hidden",
    "model.vit.heads=128": "model.vit.heads=128: at most 64",
    "model.vit.mlp=100000": "model.vit.mlp",
    "model.decoder_channels=[100000,32,16,16]": "model.decoder_channels",
    "model.discriminator_channels=[32,64,100000]": "model.discriminator_channels",
    "data.num_workers=100000": "data.num_workers=100000: at most 64",
    "eval.overlap=0.999": "eval.overlap=0.999: must lie between 0 and 0.9",  # a window at every voxel
    # and what the network cannot be built or run with is refused, not a traceback
    "model.decoder_channels=[64,32,16]": "model.decoder_channels",
    "model.vit.taps=2": "model.vit.taps",
}


@pytest.mark.parametrize("override", WRONG)
def test_a_wrong_value_is_refused_in_one_line_naming_the_key(override):
    with pytest.raises(InputError) as info:
        load_config([override])
    message = str(info.value)
    assert "\n" not in message and WRONG[override] in message, message


@pytest.mark.parametrize("override", ["train.lr=abc", "train.epochs=-1", "eval.overlap=1.5"])
def test_the_cli_refuses_a_wrong_value_before_any_work(tmp_path, capsys, override):
    """Exit status 2, one line, and nothing written: not the data's cache, not the run folder."""
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--quiet", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bad config value") and "Traceback" not in err[0]
    assert not out.exists() and list(data.iterdir()) == []


def _shipped_run_config() -> dict:
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_and_runconfig_defaults_are_identical():
    from mstkd.runconfig import RunConfig, project_config

    shipped = _shipped_run_config()
    defaults = RunConfig().to_flower()
    assert list(shipped) == list(defaults)  # the same keys, in the same order
    assert shipped == defaults and all(type(shipped[k]) is type(defaults[k]) for k in shipped), {
        k: (shipped[k], defaults[k])
        for k in shipped
        if shipped[k] != defaults[k] or type(shipped[k]) is not type(defaults[k])
    }
    assert RunConfig.parse(shipped) == RunConfig()  # Flower's mapping parses to the defaults
    assert type(RunConfig.parse({"local-epochs": 2}).local_epochs) is float  # typed, not only equal
    assert type(RunConfig.parse({"num-server-rounds": 3.0}).num_server_rounds) is int
    cfg = project_config(RunConfig())
    assert cfg.train.epochs == shipped["num-server-rounds"] * shipped["local-epochs"]
    assert cfg.train.lr == shipped["lr"] and cfg.train.seed == shipped["seed"]


WRONG_RUN = [
    ("num-server-rounds", "x", "num-server-rounds"),
    ("num-server-rounds", 0, "num-server-rounds"),
    ("local-epochs", -1.0, "local-epochs"),
    ("lokal-epochs", 2.0, "did you mean local-epochs"),
    ("dp", "of", "dp"),
    ("strategy", "fedsgd", "strategy"),
    ("fraction-train", 1.5, "fraction-train"),
    ("secagg", "yes", "secagg"),
    ("transport", "int8", "transport"),
    ("lr", 0.0, "lr"),
    ("dp-noise", float("nan"), "dp-noise"),
    ("update-bound", float("nan"), "update-bound"),
    ("overrides", "train.lr=abc", "train.lr"),
]


@pytest.mark.parametrize(("key", "value", "named"), WRONG_RUN)
def test_a_wrong_run_config_value_is_refused_in_one_line(key, value, named):
    from mstkd.runconfig import RunConfig, project_config

    with pytest.raises(InputError) as info:
        project_config(RunConfig.parse({**_shipped_run_config(), key: value}))
    assert "\n" not in str(info.value) and named in str(info.value), str(info.value)


def test_overrides_that_would_read_the_environment_are_refused():
    for overrides in (
        "train.lr=${oc.env:HOME}",
        "data.cache_dir=${oc.env:SECRET,x}",
        r"train.lr=$\{oc.env:SECRET}",  # spelt so that only removing the shell escapes makes it an interpolation
        "train.lr=$'{'oc.env:SECRET}",
        'train.lr=$"{"oc.env:SECRET}',
    ):
        with pytest.raises(InputError, match="interpolation is not allowed"):
            project_config(RunConfig.parse({"model": "tiny", "overrides": overrides}))
    with pytest.raises(InputError, match="unknown model preset"):
        load_config(["model=../../configs/train"])


def test_a_node_config_reads_numbers_given_as_text_and_leaves_other_apps_keys_out(caplog):
    from mstkd.runconfig import NodeConfig

    # flower-supernode --node-config 'site-name=3 worker-idle="60"': TOML gives a number and a string
    node = NodeConfig.parse({"data-path": "/data/h3", "site-name": 3, "worker-idle": "60", "partition-id": "1"})
    assert node.site_name == "3" and node.worker_idle == 60.0 and node.partition_id == 1
    with caplog.at_level("WARNING", logger="mstkd.client"):
        node = NodeConfig.parse({"data-path": "/data/h3", "dataset-path": "/other/app", "worker-idel": 60})
    assert node == NodeConfig(data_path="/data/h3")  # one SuperNode's config also serves other apps
    assert "'dataset-path'" in caplog.text and "'worker-idel'" in caplog.text
    assert "did you mean worker-idle" in caplog.text
    with pytest.raises(InputError, match="worker-idle"):
        NodeConfig.parse({"worker-idle": "soon"})
    # a site's terms are never ignored: misspelt, the site would train without them
    assert NodeConfig.parse({"require-secagg": "3"}).require_secagg == 3
    with pytest.raises(InputError, match=r"unknown node config key 'require-secgg' \(did you mean require-secagg"):
        NodeConfig.parse({"require-secgg": "3"})
    with pytest.raises(InputError, match="require-secagg"):
        NodeConfig.parse({"require-secagg": "yes"})
