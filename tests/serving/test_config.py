"""ServeConfig: one source for every server setting. `nora serve` has one option per field,
a printed config reads back through --config, and bad values are refused by name before
anything is loaded."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import typer
import yaml
from typer.testing import CliRunner

from nora.cli import app
from nora.config import ConfigError, from_mapping
from nora.serving import ServeConfig, build, create_app, load_server, serve
from nora.serving.launch import run as run_server

runner = CliRunner()

# a non-default value for every field, as typed on the command line, and as it is read
SERVE = {
    "base": ("some/model", "some/model"),
    "adapters_dir": ("ads", "ads"),
    "preload": ("a,b", ["a", "b"]),
    "dtype": ("bfloat16", "bfloat16"),
    "device": ("cpu", "cpu"),
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("0", 0),
    "log_level": ("debug", "debug"),
    "api_keys": ("keys.json", "keys.json"),
    "grace": ("5", 5.0),
    "keep_alive": ("9.5", 9.5),
    "max_resident": ("3", 3),
    "max_batch": ("4", 4),
    "max_prefill_tokens": ("512", 512),
    "max_model_len": ("300", 300),
    "max_waiting": ("0", 0),
    "max_tokens_limit": ("64", 64),
    "default_max_tokens": ("32", 32),
    "max_prompt_tokens": ("100", 100),
    "max_body_bytes": ("4096", 4096),
    "request_timeout": ("2.5", 2.5),
    "max_n": ("2", 2),
    "retry_after": ("3", 3.0),
}


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def typed(table=SERVE) -> list[str]:
    return [a for name, (text, _) in table.items() for a in ("--" + name.replace("_", "-"), text)]


def test_every_field_is_an_option_with_its_help():
    opts = {p.name: p for p in typer.main.get_command(app).commands["serve"].params}
    fields = dataclasses.fields(ServeConfig)
    assert set(SERVE) == {f.name for f in fields}  # the table above is complete
    for f in fields:
        assert f.name in opts and f.metadata["help"] in opts[f.name].help, f.name
    assert "--adapters" in opts["adapters_dir"].opts  # `nora serve --adapters dir/` as before


def test_every_serving_parameter_is_a_field():
    # what the Python entry points and the engine take is what the command line can set
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    assert {"max_model_len", "max_prefill_tokens", "dtype", "device", "preload"} <= names
    for fn in (serve, load_server, build, create_app, run_server):
        params = inspect.signature(fn).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), fn.__name__


def test_every_option_reaches_the_config_and_a_printed_config_reads_back(tmp_path):
    code, out = cli("serve", *typed(), "--print-config")
    assert code == 0, out
    d = yaml.safe_load(out)
    assert d == {k: v for k, (_, v) in SERVE.items()}
    f = tmp_path / "serve.yaml"
    f.write_text(out)
    code, again = cli("serve", "--config", f, "--print-config")
    assert code == 0 and yaml.safe_load(again) == d
    code, js = cli("serve", "--config", f, "--port", "9", "--print-config", "--json")
    assert code == 0 and json.loads(js) == {**d, "port": 9}  # options override the file
    code, out = cli("serve", "--config", f, "--max-model-len", "none", "--print-config")
    assert code == 0 and yaml.safe_load(out)["max_model_len"] is None


def test_the_defaults_print_and_read_back(tmp_path):
    code, out = cli("serve", "--print-config")
    assert code == 0 and yaml.safe_load(out) == ServeConfig().to_dict()
    assert from_mapping(ServeConfig, yaml.safe_load(out)) == ServeConfig()


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"max_n": 0}, "max_n must be an integer >= 1"),
        ({"max_batch": 2.5}, "max_batch must be an int"),
        ({"max_model_len": 0}, "max_model_len must be an integer >= 1"),
        ({"max_prefill_tokens": -5}, "max_prefill_tokens must be an integer >= 1"),
        ({"request_timeout": 0}, "request_timeout must be a number of seconds > 0"),
        ({"retry_after": float("nan")}, "retry_after must be"),
        ({"retry_after": float("inf")}, "retry_after must be"),
        ({"max_waiting": -1}, "max_waiting must be >= 0"),
        ({"grace": -1}, "grace must be >= 0"),
        ({"max_tokens_limit": 8, "default_max_tokens": 9}, r"default_max_tokens \(9\) is above"),
        ({"max_tokens_limit": 100}, r"default_max_tokens \(256\) is above"),  # the default
        ({"port": 70000}, "port must be an integer in"),
        ({"log_level": "loud"}, "log_level must be one of"),
    ],
)
def test_validate_names_the_bad_option(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        ServeConfig(**bad).validate()
    with pytest.raises(ConfigError, match=msg):  # files and dicts: from_mapping validates
        from_mapping(ServeConfig, bad)


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--max-batch", "many"], "max-batch must be an int"),
        (["--max-model-len", "0"], "max_model_len must be an integer >= 1"),
        (["--log-level", "loud"], "log_level must be one of"),
    ],
)
def test_bad_options_are_one_line_errors_before_loading_anything(args, msg):
    code, out = cli("serve", "--base", "/nonexistent/m", *args)
    assert code == 2 and msg in out and "Traceback" not in out


def test_unknown_config_keys_name_the_nearest(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("max_batchs: 4\n")
    code, out = cli("serve", "--config", f, "--print-config")
    assert code == 2 and "did you mean 'max_batch'?" in out
