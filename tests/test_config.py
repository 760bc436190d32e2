"""Configs: overrides (dotted and quoted keys), and a clear error naming the key and the fix for bad input."""

from __future__ import annotations

from typing import ClassVar

import pytest
import yaml

from saelab.config import HarvestConfig, StrictModel, apply_overrides, build, load_config, split_override
from saelab.errors import ConfigError, MissingError
from saelab.run import RunDir


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, {"hooks": ["blocks.0.hook_mlp_out"], "out": "x.zarr"})
    cfg = load_config(path, HarvestConfig, ["batch_size=64", "text.max_documents=5", "hooks=[blocks.1.hook_z]"])
    assert cfg.batch_size == 64 and cfg.text.max_documents == 5 and cfg.hooks == ["blocks.1.hook_z"]
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, HarvestConfig, ["batch_size"])


@pytest.mark.parametrize(
    "data, message",
    [
        ("hooks: [a\nout: x", "malformed YAML in .* at line"),
        ({"hooks": ["h"], "out": "x", "batchsize": 3}, "unknown key `batchsize`"),
        ({"hooks": ["h"], "out": "x", "batch_size": "many"}, "`batch_size`.*integer"),
        ({"hooks": ["h"]}, "missing key `out`"),
        ({"hooks": ["h"], "out": "x", "shard_rows": 100, "chunk_rows": 30}, "multiple of chunk_rows"),
    ],
)
def test_bad_configs_name_the_key_and_fix(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, data), HarvestConfig)


def test_validators_do_not_touch_the_filesystem(tmp_path):
    """A missing text file is refused by the harvest that reads it (tests/test_bad_input.py), not by the config."""
    data = {"hooks": ["h"], "out": "x", "text": {"source": "files", "path": "/no/such.txt"}}
    assert load_config(write(tmp_path, data), HarvestConfig).text.path == "/no/such.txt"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"hooks": ["h"], "out": "x", "batch_size": 0}, "`batch_size`: Input should be greater than 0"),
        ({"hooks": ["h"], "out": "x", "max_tokens": -5}, "`max_tokens`: Input should be greater than 0"),
        ({"hooks": ["h"], "out": "x", "text": {"max_documents": 0}}, "`text.max_documents`: Input should be greater"),
        ({"hooks": [], "out": "x"}, "at least one hook point"),
        ({"hooks": ["h"], "out": ""}, "`out`: String should have at least 1 character"),
    ],
)
def test_fields_are_range_checked_where_declared(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, data), HarvestConfig)


@pytest.mark.parametrize(
    "item, keys, value",
    [
        ("batch_size=64", ["batch_size"], "64"),
        ("text.source=files", ["text", "source"], "files"),
        ('saes["blocks.0.attn.hook_z"]=a/b', ["saes", "blocks.0.attn.hook_z"], "a/b"),
        ("saes['blocks.0.attn.hook_z']=a/b", ["saes", "blocks.0.attn.hook_z"], "a/b"),
        ("saes[blocks.0.hook_mlp_out].k=4", ["saes", "blocks.0.hook_mlp_out", "k"], "4"),
        ('"a.b".c=x=y', ["a.b", "c"], "x=y"),
    ],
)
def test_override_keys_may_quote_or_bracket_dotted_parts(item, keys, value):
    assert split_override(item) == (keys, value)


def test_dotted_key_reaches_a_hook_section():
    data = apply_overrides({"saes": {}}, ['saes["blocks.0.attn.hook_z"]=runs/x', "saes['blocks.1.attn.hook_z']=y"])
    assert data == {"saes": {"blocks.0.attn.hook_z": "runs/x", "blocks.1.attn.hook_z": "y"}}


@pytest.mark.parametrize(
    "item, message",
    [
        ('x=!!python/object/apply:os.system ["ls"]', "YAML tag that saelab refuses"),
        ("x=[a", "malformed YAML in override"),
        ('saes["blocks.0=1', "not closed"),
        ("a..b=1", "no key part at position 3"),
        ("=1", "key=value"),
    ],
)
def test_bad_overrides_are_config_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides({}, [item])


def test_config_files_must_exist_and_be_utf8(tmp_path):
    with pytest.raises(MissingError, match="config file not found"):
        load_config(tmp_path / "none.yaml", HarvestConfig)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("hooks: [h]\nout: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text .* on line 2"):
        load_config(bad, HarvestConfig)


class _Inner(StrictModel):
    renamed: ClassVar[dict[str, str]] = {"old": "new"}
    new: int = 0


class _Outer(StrictModel):
    renamed: ClassVar[dict[str, str]] = {"out": "run"}
    run: str = "r"
    inner: _Inner = _Inner()


def test_renamed_keys_say_their_new_name():
    with pytest.raises(ConfigError, match="unknown key `out`: it is now called `run`"):
        build(_Outer, {"out": "x"}, "test config")
    with pytest.raises(ConfigError, match="unknown key `inner.old`: it is now called `new`"):
        build(_Outer, {"inner": {"old": 1}}, "test config")
    with pytest.raises(ConfigError, match="unknown key `typo`; remove it"):
        build(_Outer, {"typo": 1}, "test config")


def test_harvest_run_names_the_store_inside_the_run_directory(tmp_path):
    cfg = HarvestConfig.model_validate({"hooks": ["h"], "run": str(tmp_path / "r")})  # `out` comes from `run`
    assert cfg.out == str(RunDir(tmp_path / "r").store)
    assert HarvestConfig.model_validate(cfg.model_dump()).out == cfg.out  # a dumped config validates again
    with pytest.raises(ConfigError, match="give `run`.*or `out`, not both"):
        build(HarvestConfig, {"hooks": ["h"], "run": "r", "out": "elsewhere.zarr"}, "harvest config")
