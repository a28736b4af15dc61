"""One source for every setting: `nora train` / `nora params` options are generated from the
AdapterConfig / TrainConfig fields, YAML/JSON files are read through the same dataclasses,
unknown keys name the nearest valid one, and --print-config shows the resolved config."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer
import yaml
from conftest import make_tokenizer, tiny_llama
from typer.testing import CliRunner

import nora.cli
from nora.cli import app
from nora.config import AdapterConfig, ConfigError, TrainConfig, from_mapping

runner = CliRunner()

# a non-default value for every field, as typed on the command line, and as it is read
ADAPTER = {
    "method": ("nora", "nora"),
    "r": ("4", 4),
    "alpha": ("3", 3.0),
    "scale": ("0.5", 0.5),
    "rslora": (None, True),  # a flag: --rslora
    "dropout": ("0.05", 0.05),
    "activation": ("tanh", "tanh"),
    "target_modules": ("q_proj,k_proj", ["q_proj", "k_proj"]),
    "exclude_modules": (r"layers\.0\..*", r"layers\.0\..*"),
    "layers_to_transform": ("1-2,4", [1, 2, 4]),
    "layers_pattern": ("layers", "layers"),
    "placement": ("weight", "weight"),
    "init_weights": (None, False),  # --no-init-weights
    "sinter_a": ("1e-4", 1e-4),
    "sinter_omega": ("100", 100.0),
    "spline_grid_size": ("7", 7),
    "spline_order": ("2", 2),
    "spline_range": ("-2,2", [-2.0, 2.0]),
    "base_model_name_or_path": ("some/model", "some/model"),
}
TRAIN = {
    "model": ("m", "m"),
    "data": ("logistic-map", "logistic-map"),
    "data_path": ("d.jsonl", "d.jsonl"),
    "teacher": ("t.safetensors", "t.safetensors"),
    "n_train": ("10", 10),
    "n_skip": ("4", 4),
    "data_seed": ("5", 5),
    "n_eval": ("3", 3),
    "max_len": ("64", 64),
    "max_steps": ("5", 5),
    "batch_size": ("2", 2),
    "grad_accum": ("3", 3),
    "lr": ("0.002", 0.002),
    "weight_decay": ("0.01", 0.01),
    "warmup_ratio": ("0.1", 0.1),
    "max_grad_norm": ("0.5", 0.5),
    "seed": ("7", 7),
    "dtype": ("float32", "float32"),
    "load_in_4bit": (None, True),
    "load_in_8bit": (None, False),  # excludes 4 bit: set in its own test below
    "eval_every": ("2", 2),
    "save_every": ("2", 2),
    "keep_checkpoints": ("3", 3),
    "report_to": ("tensorboard", "tensorboard"),
    "output_dir": ("o", "o"),
}
FLAGS = {
    "rslora": "--rslora",
    "init_weights": "--no-init-weights",
    "load_in_4bit": "--load-in-4bit",
}


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def cli_args(table: dict) -> list[str]:
    out = []
    for name, (text, _) in table.items():
        if name in FLAGS:
            out.append(FLAGS[name])
        elif text is not None:
            out += ["--" + name.replace("_", "-"), text]
    return out


def command(name: str):
    return typer.main.get_command(app).commands[name]


def test_every_field_is_an_option_with_its_help():
    opts = {p.name: p for p in command("train").params}
    fields = [*dataclasses.fields(AdapterConfig), *dataclasses.fields(TrainConfig)[1:]]
    assert set(ADAPTER) | set(TRAIN) == {f.name for f in fields}  # the tables above are complete
    for f in fields:
        assert f.name in opts, f.name
        assert f.metadata["help"] in opts[f.name].help
    assert {f.name for f in dataclasses.fields(AdapterConfig)} <= {
        p.name for p in command("params").params
    }


def test_every_field_set_on_the_command_line_reaches_the_config():
    code, out = run("train", *cli_args(ADAPTER), *cli_args(TRAIN), "--print-config")
    assert code == 0, out
    d = yaml.safe_load(out)
    assert {k: d["adapter"][k] for k in ADAPTER} == {k: v for k, (_, v) in ADAPTER.items()}
    assert {k: d[k] for k in TRAIN} == {k: v for k, (_, v) in TRAIN.items()}
    code, out = run("train", "--load-in-8bit", "--print-config", "--json")
    assert code == 0 and json.loads(out)["load_in_8bit"] is True
    code, out = run("train", "--config", "/dev/null", "--dtype", "none", "--print-config")
    assert code == 0 and yaml.safe_load(out)["dtype"] is None  # 'none' unsets an optional field


def test_a_printed_config_reads_back_and_options_override_the_file(tmp_path):
    code, out = run("train", *cli_args(ADAPTER), *cli_args(TRAIN), "--print-config", "--json")
    f = tmp_path / "run.json"
    f.write_text(out)
    code, again = run("train", "--config", f, "--print-config", "--json")
    assert code == 0 and json.loads(again) == json.loads(out)
    y = tmp_path / "run.yaml"
    y.write_text("max_steps: 9\nlr: 1e-3\nadapter:\n  r: 2\n")  # YAML 1.1 reads 1e-3 as text
    code, out = run("train", "--config", y, "--r", "6", "--print-config")
    d = yaml.safe_load(out)
    assert (d["max_steps"], d["lr"], d["adapter"]["r"]) == (9, 0.001, 6)
    assert d["adapter"]["method"] == "nora"  # a partial adapter mapping keeps train's default


@pytest.mark.parametrize(
    "text,msg",
    [
        ("max_stpes: 3\n", "'max_stpes': did you mean 'max_steps'?"),
        ("adapter:\n  activaton: relu\n", "unknown config fields ['activaton'] in adapter ('activaton': did you mean 'activation'?"),
        ("lr: fast\n", "lr must be a number, got 'fast'"),
        ("batch_size: 0\n", "batch_size must be >= 1"),
        ("- 1\n", "must hold a mapping"),
    ],
)  # fmt: skip
def test_bad_config_files_are_one_line_errors(text, msg, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    code, out = run("train", "--config", f)
    assert code == 2 and msg in out and "Traceback" not in out


def test_bad_option_values_name_the_option():
    code, out = run("train", "--max-steps", "many", "--print-config")
    assert code == 2 and "--steps must be an int, got 'many'" in out
    code, out = run("train", "--report-to", "excel", "--print-config")
    assert code == 2 and "report_to must be one of" in out


def test_from_mapping_is_typed_and_strict():
    cfg = from_mapping(TrainConfig, {"adapter": {"r": "4", "layers_to_transform": 3}, "lr": 1})
    assert cfg.adapter.method == "nora" and cfg.adapter.r == 4
    assert cfg.adapter.layers_to_transform == [3] and cfg.lr == 1.0
    assert from_mapping(AdapterConfig, {"spline_range": [-3, 3]}).spline_range == (-3.0, 3.0)
    with pytest.raises(ConfigError, match="did you mean 'n_eval'"):
        from_mapping(TrainConfig, {"n_test": 3})
    with pytest.raises(ConfigError, match="r must be an int, got 2.5"):
        from_mapping(AdapterConfig, {"r": 2.5})
    with pytest.raises(ConfigError, match="target_modules must be"):
        from_mapping(AdapterConfig, {"target_modules": 5})
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_cli_docstring_lists_every_command():
    listed = {line.split()[1] for line in nora.cli.__doc__.splitlines() if line.startswith("nora ")}
    assert set(typer.main.get_command(app).commands) <= listed


def test_train_from_a_config_file(tmp_path):
    model = tmp_path / "model"
    tok = make_tokenizer()
    tiny_llama(vocab=len(tok), hidden=64).save_pretrained(model)
    tok.save_pretrained(model)
    f = tmp_path / "run.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "data": "logistic-map",
                "max_len": 300,
                "n_train": 8,
                "n_eval": 4,
                "max_steps": 2,
                "batch_size": 4,
                "output_dir": str(tmp_path / "run"),
                "adapter": {
                    "method": "lora",
                    "r": 2,
                    "exclude_modules": ["layers.0.self_attn.q_proj"],
                },
            }
        )
    )
    code, out = run("train", "--config", f)
    assert code == 0, out
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["adapter"]["exclude_modules"] == ["layers.0.self_attn.q_proj"]
    weights = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert b"layers.0.self_attn.q_proj" not in weights and b"layers.1.self_attn.q_proj" in weights
