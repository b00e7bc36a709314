"""Config loading: defaults, overrides, validation errors naming the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from unmix.training.config import ARCHS, ConfigError, check_world, diff, feature_dim, load_config, to_dict
from unmix.training.dist import expand_nodelist, first_node, map_slurm_env
from unmix.training.engine import deepspeed_config


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


INTERFACE_ONLY = """
data: {train: /x/train, val: /x/val, device: cpu, crop: 32, threads: 2}
model: {arch: resnet18}
method: {name: byol}
unmix: {enabled: true, p_mixup: 0.5, alpha: 1.0}
optim: {epochs: 3, batch_size: 64, lr: 0.2}
seed: 1
output_dir: /tmp/out
mlflow: {experiment: e, tracking_uri: "sqlite:///x.db"}
deepspeed: {precision: fp32, zero_stage: 2, config: {steps_per_print: 5}}
"""


def test_interface_keys_alone_are_a_valid_config(tmp_path):
    cfg = load_config(_write(tmp_path, INTERFACE_ONLY))
    assert cfg.method.name == "byol" and cfg.unmix.enabled and cfg.optim.batch_size == 64
    assert cfg.data.recipe == "byol"  # resolved from the method
    assert cfg.deepspeed.config == {"steps_per_print": 5}


def test_moco_v1_v2_defaults_resolved():
    v2 = load_config(None, ["method.name=moco_v2"])
    v1 = load_config(None, ["method.name=moco_v1"])
    assert (v2.method.moco.T, v2.method.moco.mlp) == (0.2, True)
    assert (v1.method.moco.T, v1.method.moco.mlp) == (0.07, False)


def test_moco_hidden_dim_defaults_to_the_backbones_feature_width():
    """The authors' ``dim_mlp = fc.in_features``: 2048 for ResNet-50, 512 for ResNet-18; explicit wins."""
    assert load_config(None, ["model.arch=resnet50"]).method.moco.hidden_dim == 2048
    assert load_config(None, ["model.arch=resnet18"]).method.moco.hidden_dim == 512
    assert load_config(None, ["model.arch=resnet10", "model.width=32"]).method.moco.hidden_dim == 256
    assert (
        load_config(None, ["model.arch=resnet18", "method.moco.hidden_dim=2048"]).method.moco.hidden_dim
        == 2048
    )
    for path in sorted(Path(__file__).parents[2].glob("configs/*.yaml")):  # what the shipped configs mean
        cfg = load_config(path)
        assert cfg.method.moco.hidden_dim == feature_dim(cfg.model.arch, cfg.model.width), path


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_dim_table_matches_the_backbones(arch):
    from unmix.training.backbones import build_backbone

    for width in (64,) if arch == "wide_resnet50_2" else (16,):
        assert build_backbone(arch, width=width).feature_dim == feature_dim(arch, width), (arch, width)


def test_dotted_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(
        _write(tmp_path, INTERFACE_ONLY),
        ["optim.lr=0.5", "unmix.enabled=false", "deepspeed.config.fp16.enabled=false"],
    )
    assert cfg.optim.lr == 0.5 and cfg.unmix.enabled is False
    assert cfg.deepspeed.config == {"steps_per_print": 5, "fp16": {"enabled": False}}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lrr=0.1"], "unknown key optim.lrr; allowed keys under optim: epochs"),
        (["bogus=1"], "unknown key bogus"),
        (["method.moco.KK=5"], "unknown key method.moco.KK"),
        (["method.name=swav"], "method.name: invalid value 'swav'; allowed: moco_v2, moco_v1, byol, simclr"),
        (["deepspeed.precision=fp8"], "deepspeed.precision: invalid value 'fp8'; allowed: bf16, fp16, fp32"),
        (["data.device=tpu"], "data.device: invalid value 'tpu'; allowed: gpu, cpu"),
        (["deepspeed.zero_stage=3"], "deepspeed.zero_stage: 3 is not supported: ZeRO-3 partitions"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: invalid value 4; allowed: 0, 1, 2"),
        (["optim.epochs=ten"], "optim.epochs: invalid value 'ten'; expected an integer"),
        (["optim.epochs=0"], "optim.epochs: invalid value 0; must be > 0"),
        (["unmix.p_mixup=1.5"], "unmix.p_mixup: invalid value 1.5; must be in [0, 1]"),
        (["unmix.enabled=maybe"], "unmix.enabled: invalid value 'maybe'; expected true or false"),
        (["model.arch=vit_b"], "model.arch: invalid value 'vit_b'; allowed: resnet10"),
        (["optim.optimizer=lars", "deepspeed.zero_stage=2"], "optim.optimizer: lars needs each parameter"),
        (["optim"], "expected key=value"),
        (
            ["optim.milestones=[1, x]"],
            "optim.milestones: invalid value [1, 'x']; expected a list of integers",
        ),
        (["model.width=12"], "model.width: invalid value 12; must be a positive multiple of 8"),
        (["model.width=0"], "model.width: invalid value 0; must be a positive multiple of 8"),
        (["method.moco.hidden_dim=0"], "method.moco.hidden_dim: invalid value 0; must be > 0"),
        (["method.byol.mix_targets=view1"], "method.byol.mix_targets: invalid value 'view1'; allowed: both"),
    ],
)
def test_bad_configs_name_key_and_allowed_values(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert needle in str(exc.value)


def test_a_bare_off_is_the_word_where_a_choice_allows_it(tmp_path):
    """YAML 1.1 reads ``off`` as false: a choice that lists "off" takes it as the word, on the command line
    and in a file; a choice without it still refuses a boolean."""
    assert load_config(None, ["log.progress=off"]).log.progress == "off"
    assert load_config(_write(tmp_path, "log: {progress: off}\n")).log.progress == "off"
    with pytest.raises(ConfigError, match="data.device: invalid value False; allowed: gpu, cpu"):
        load_config(None, ["data.device=off"])


def test_error_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key data\.trian"):
        load_config(_write(tmp_path, "data: {trian: /x}\n"))


def test_batch_not_divisible_by_world_size():
    cfg = load_config(None, ["optim.batch_size=10"])
    assert check_world(cfg, 2) == 5
    with pytest.raises(ConfigError, match="optim.batch_size: 10 is not divisible by world size 4"):
        check_world(cfg, 4)
    cfg = load_config(None, ["optim.batch_size=16", "optim.grad_accum=2"])
    assert check_world(cfg, 2) == 4


def test_deepspeed_config_from_ours():
    cfg = load_config(
        None,
        [
            "optim.batch_size=64",
            "optim.grad_accum=2",
            "deepspeed.zero_stage=2",
            "deepspeed.config.zero_optimization.reduce_bucket_size=1000",
        ],
    )
    ds = deepspeed_config(cfg, micro_batch=16)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.0
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}  # pass-through merges
    assert ds["torch_autocast"]["enabled"] and ds["torch_autocast"]["dtype"] == "bfloat16"  # bf16 default
    assert "fp16" in deepspeed_config(load_config(None, ["deepspeed.precision=fp16"]), 8)


def test_config_diff_ignores_resume_safe_keys():
    a = to_dict(load_config(None, []))
    b = to_dict(load_config(None, ["optim.epochs=400", "log.every_steps=3", "optim.lr=0.1", "seed=5"]))
    assert diff(a, b) == ["optim.lr", "seed"]


def test_slurm_env_mapping(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: own hostlist parsing
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_ID": "1234",
    }
    new = map_slurm_env(env)
    assert new == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node1",
        "MASTER_PORT": str(15000 + 1234),
    }
    assert map_slurm_env({"RANK": "0", "SLURM_PROCID": "2"}) == {}  # a launcher's values win
    assert expand_nodelist("node[1-3,5],gpu07,n[08-10]x") == [
        "node1",
        "node2",
        "node3",
        "node5",
        "gpu07",
        "n08x",
        "n09x",
        "n10x",
    ]
    assert first_node("gpu[3-4]") == "gpu3"
