"""datumdb.pipeline.config: params.yaml read once, alike for YAML 1.1 and 1.2, validated, typed, frozen."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from ruamel.yaml import YAML

from datumdb.cli import main
from datumdb.errors import InputError
from datumdb.pipeline.config import (
    MAX_PARAMS_BYTES,
    SCHEMA_PATH,
    PipelineConfig,
    load_config,
    read_params,
    validate_params,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _yaml_12(text: str) -> Any:
    return YAML(typ="safe", pure=True).load(text)


def _schema_defaults(schema: dict[str, Any]) -> Any:
    """The document the schema's defaults give: objects recursively, leaves their default."""
    if schema.get("type") == "object":
        return {name: _schema_defaults(sub) for name, sub in schema.get("properties", {}).items()}
    return schema["default"]


# ----------------------------------------------------------------------------- YAML 1.1 vs 1.2


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("seed: 010\n", "seed"),  # octal 8 for YAML 1.1, decimal 10 for 1.2
        ("seed: 0o10\n", "seed"),  # a string for YAML 1.1, 8 for 1.2
        ("seed: 08\n", "seed"),  # a string for YAML 1.1 (bad octal), 8 for 1.2
        ("dataset:\n  input_dir: yes\n", "dataset.input_dir"),
        ("dataset:\n  input_dir: no\n", "dataset.input_dir"),
        ("dataset:\n  input_dir: on\n", "dataset.input_dir"),
        ("dataset:\n  input_dir: off\n", "dataset.input_dir"),
        ("dataset:\n  input_dir: Yes\n", "dataset.input_dir"),
        ("dataset:\n  imageset:\n    gray: ON\n", "dataset.imageset.gray"),
        ("dataset:\n  input_dir: 1:20\n", "dataset.input_dir"),  # sexagesimal 80 for YAML 1.1
        ("build:\n  map_size: 1e3\n", "build.map_size"),  # a string for YAML 1.1, 1000.0 for 1.2
        ("dataset:\n  cifar10:\n    batches: [a.bin, 010]\n", "dataset.cifar10.batches[1]"),
    ],
)
def test_values_yaml_11_and_12_read_differently_are_refused_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert yaml.safe_load(text) != _yaml_12(text)  # the premise: the two readings really differ
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=rf"{re.escape(key)} is .* for YAML 1\.1 but .* for YAML 1\.2"):
        read_params(path)
    with pytest.raises(InputError, match=re.escape(key)):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "key"),
    [("seed: 1\nseed: 2\n", "seed"), ("dataset:\n  count: 5\n  count: 6\n", "count")],
)
def test_duplicate_keys_are_refused_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert isinstance(yaml.safe_load(text), dict)  # PyYAML silently keeps the last value
    with pytest.raises(InputError, match=rf'YAML 1\.2.*duplicate key "{key}"'):
        read_params(_write(tmp_path, text))


def test_values_both_versions_read_alike_pass(tmp_path: Path) -> None:
    # y/n are strings for PyYAML too, and both read 1_000 as 1000 and 0x10 as 16.
    text = "dataset:\n  count: 1_000\n  input_dir: y\n  mnist: {images: n, labels: N}\nseed: 0x10\n"
    assert yaml.safe_load(text) == _yaml_12(text)
    config = load_config(_write(tmp_path, text))
    assert (config.dataset.count, config.dataset.input_dir, config.seed) == (1000, "y", 16)
    assert (config.dataset.mnist.images, config.dataset.mnist.labels) == ("n", "N")


def test_several_disagreements_are_counted(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"seed is 8 .*\(and 1 more key\(s\)\)"):
        read_params(_write(tmp_path, "seed: 010\nencoding: on\n"))


_TOKENS = ["010", "0o10", "08", "0x1f", "yes", "no", "on", "off", "y", "n", "true", "1_000", "1:20", "1e3", "1.5e+3"]
_TOKENS += ["0.25", "-7", "~", ".inf", "12", "abc", "'010'", '"yes"', "0b11", "+3", "1_0.5"]


@given(token=st.sampled_from(_TOKENS), path=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3))
def test_a_value_is_accepted_exactly_when_both_readings_agree(token: str, path: list[str]) -> None:
    text = "".join(f"{'  ' * depth}{name}:\n" for depth, name in enumerate(path[:-1]))
    text += f"{'  ' * (len(path) - 1)}{path[-1]}: {token}\n"
    leaf_11, leaf_12 = yaml.safe_load(text), _yaml_12(text)
    for name in path:
        leaf_11, leaf_12 = leaf_11[name], leaf_12[name]
    agree = type(leaf_11) is type(leaf_12) and leaf_11 == leaf_12
    with tempfile.TemporaryDirectory() as folder:
        file = _write(Path(folder), text)
        if agree:
            assert read_params(file) == _yaml_12(text)
        else:
            with pytest.raises(InputError, match=re.escape(".".join(path))):
                read_params(file)


# ----------------------------------------------------------------------------- schema and defaults


def test_the_schema_defaults_fill_every_missing_key(tmp_path: Path) -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))
    defaults = _schema_defaults(schema)
    assert defaults["dataset"]["source"] == "synthetic"  # the walk found the leaves
    filled = validate_params(read_params(_write(tmp_path, "dataset: {source: synthetic}\n")))
    assert filled == defaults
    assert load_config(_write(tmp_path, "dataset: {source: synthetic}\n")).as_dict() == defaults
    assert load_config(_write(tmp_path, "", "empty.yaml")).as_dict() == defaults
    # A given value wins over its default, its siblings still default.
    config = load_config(_write(tmp_path, "dataset: {count: 50}\nbuild: {batch_size: 3}\n"))
    assert (config.dataset.count, config.dataset.shape) == (50, tuple(defaults["dataset"]["shape"]))
    assert (config.build.batch_size, config.build.map_size) == (3, defaults["build"]["map_size"])


def test_validate_params_does_not_modify_its_argument() -> None:
    params: dict[str, Any] = {"dataset": {"source": "synthetic"}}
    validate_params(params)
    assert params == {"dataset": {"source": "synthetic"}}


def test_the_repository_params_file_is_valid() -> None:
    config = load_config(REPO / "params.yaml")
    assert isinstance(config, PipelineConfig)
    assert config.partition.shards == tuple(range(config.partition.count))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour: red\n", r"\(top level\): Additional properties .*'colour'"),
        ("dataset:\n  colour: 1\n", r"dataset: Additional properties .*'colour'"),
        ("dataset: {arrays: {stride: 2}}\n", r"dataset\.arrays: Additional properties .*'stride'"),
        ("seed: abc\n", r"seed: 'abc' is not of type 'integer'"),
        ("seed: true\n", r"seed: True is not of type 'integer'"),
        ("dataset:\n  count: 2.5\n", r"dataset\.count: 2\.5 is not of type 'integer'"),
        ("dataset: {shape: [3, 32]}\n", r"dataset\.shape"),
        ("dataset: {source: imagenet}\n", r"dataset\.source"),
        ("dataset: {arrays: {layout: whc}}\n", r"dataset\.arrays\.layout"),
        ("encoding: gif\n", r"encoding: 'gif' is not one of"),
        ("verify: {sample: -1}\n", r"verify\.sample"),
        ("build: {map_size: 1000}\n", r"build\.map_size"),
        ("split: {train: 0.5, val: 0.3, test: 0.3}\n", r"split\.train \+ split\.val \+ split\.test must be 1"),
        ("split: {train: 0.85, val: 0.1}\n", r"split\.train \+ split\.val \+ split\.test must be 1"),
        ("split: {train: 1.0, val: 0.0, test: 0.0}\n", r"split\.test"),
        ("split: {train: 0.98, val: 0.01, test: 0.01}\ndataset: {count: 10}\n", r"split\.val=0\.01 .* is empty"),
        ("partition: {shards: [0, 2]}\n", r"partition\.shards must be the ids 0, 1, \.\.\., n-1"),
        ("partition: {shards: [1, 0]}\n", r"partition\.shards must be the ids 0, 1, \.\.\., n-1"),
        ("partition: {shards: [0, 0]}\n", r"partition\.shards"),
        ("partition: {shards: []}\n", r"partition\.shards"),
        ("seed: -1\n", r"seed: -1 is less than the minimum"),
        ("seed: 4294967296\n", r"seed must be in 0\.\.2\*\*32-1"),
        ("- 1\n", r"must be a mapping"),
        ("seed: [1\n", r"not valid YAML"),
    ],
)
def test_bad_params_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_the_largest_seed_is_accepted(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, f"seed: {2**32 - 1}\n")).seed == 2**32 - 1


def test_load_config_returns_frozen_dataclasses(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "dataset: {source: synthetic}\n"))
    for owner, field in [
        (config, "seed"),
        (config.dataset, "count"),
        (config.dataset.arrays, "layout"),
        (config.split, "train"),
        (config.partition, "shards"),
        (config.build, "batch_size"),
        (config.verify, "sample"),
    ]:
        assert dataclasses.is_dataclass(owner)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(owner, field, getattr(owner, field))
    assert isinstance(config.dataset.shape, tuple) and isinstance(config.partition.shards, tuple)
    assert isinstance(config.dataset.cifar10.batches, tuple)


def test_source_options_hold_only_the_chosen_source(tmp_path: Path) -> None:
    synthetic = load_config(_write(tmp_path, "dataset: {count: 20, shape: [1, 4, 4], classes: 2}\n"))
    assert synthetic.dataset.source_options() == {"source": "synthetic", "count": 20, "shape": [1, 4, 4], "classes": 2}
    arrays = load_config(_write(tmp_path, "dataset: {source: arrays, input_dir: in, arrays: {layout: hwc}}\n"))
    assert arrays.dataset.source_options() == {
        "source": "arrays",
        "input_dir": "in",
        "images": "X.npy",
        "labels": "y.npy",
        "layout": "hwc",
        "bgr_from_rgb": False,
    }


# ----------------------------------------------------------------------------- special files


def test_special_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a regular file"):
        read_params(tmp_path)
    with pytest.raises(InputError, match="params file not found"):
        read_params(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"dataset: {input_dir: caf\xe9}\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_params(tmp_path / "latin1.yaml")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "params.yaml"
    os.mkfifo(fifo)
    # In a child process with a time limit: opening a FIFO with no writer would block forever.
    code = "from datumdb.cli import main; raise SystemExit(main(['pipeline', 'check', '--params', 'params.yaml']))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "params.yaml: params file is a FIFO (named pipe), not a regular file" in result.stderr
    with pytest.raises(InputError, match="not a regular file"):
        read_params(fifo)  # stat only: returns at once in this process too


def test_a_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    head = b"seed: 1\n"
    at_limit = tmp_path / "at_limit.yaml"
    at_limit.write_bytes(head + b"#" * (MAX_PARAMS_BYTES - len(head) - 1) + b"\n")
    assert at_limit.stat().st_size == MAX_PARAMS_BYTES
    assert read_params(at_limit) == {"seed": 1}
    too_large = tmp_path / "too_large.yaml"
    too_large.write_bytes(at_limit.read_bytes() + b"\n")
    with pytest.raises(
        InputError, match=rf"params file is {MAX_PARAMS_BYTES + 1} bytes, over the bound of {MAX_PARAMS_BYTES}"
    ):
        read_params(too_large)


# ----------------------------------------------------------------------------- the CLI


def test_pipeline_check_prints_the_resolved_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "dataset: {count: 30}\nencoding: png\n")
    assert main(["pipeline", "check", "--params", str(path)]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed == load_config(path).as_dict()
    assert printed["dataset"]["count"] == 30 and printed["encoding"] == "png" and printed["seed"] == 0
    assert err == ""


@pytest.mark.parametrize(
    ("text", "key"),
    [("seed: 010\n", "seed"), ("split: {train: 0.7, val: 0.2, test: 0.2}\n", "split.train"), ("colour: 1\n", "colour")],
)
def test_pipeline_check_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    path = _write(tmp_path, text)
    assert main(["pipeline", "check", "--params", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("datumdb pipeline: error: ") and key in lines[0]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("dataset: {count: 40.0}\n", "dataset.count"),
        ("dataset: {classes: 3.0}\n", "dataset.classes"),
        ("dataset: {shape: [3, 8.0, 8]}\n", "dataset.shape"),
        ("dataset: {imageset: {resize_height: 8.0, resize_width: 8}}\n", "dataset.imageset.resize_height"),
        ("seed: 3.0\n", "seed"),
        ("partition: {shards: [0, 1.0]}\n", "partition.shards"),
        ("build: {batch_size: 7.0}\n", "build.batch_size"),
        ("build: {map_size: 1048576.0}\n", "build.map_size"),
        ("verify: {sample: 5.0}\n", "verify.sample"),
    ],
)
def test_an_integer_written_as_a_float_is_refused_or_read_as_the_integer(tmp_path: Path, text: str, key: str) -> None:
    """JSON Schema's "integer" accepts 7.0; the steps must then see 7 (same fingerprint, no crash) or refuse it."""
    as_int = _write(tmp_path, re.sub(r"(\d+)\.0\b", r"\1", text), "int.yaml")
    try:
        config = load_config(_write(tmp_path, text))
    except InputError as exc:
        assert key in str(exc)
        return
    assert config.as_dict() == load_config(as_int).as_dict()
    assert json.dumps(config.as_dict()) == json.dumps(load_config(as_int).as_dict())  # 7 and 7.0 differ as JSON


def test_the_decode_time_bound_has_one_default_for_the_cli_and_the_pipeline() -> None:
    from datumdb.limits import DEFAULT_DECODE_TIMEOUT
    from datumdb.pipeline.config import SCHEMA_PATH

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    imageset = schema["properties"]["dataset"]["properties"]["imageset"]["properties"]
    assert imageset["decode_timeout"]["default"] == DEFAULT_DECODE_TIMEOUT


# ------------------------------------------------------------------ the README's examples

README = Path(__file__).parents[1] / "README.md"


def readme_blocks(section: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README section whose heading is ``section``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{section}\n")
    end = text.find("\n### ", start + 1)
    body = text[start : end if end != -1 else None]
    return re.findall(rf"```{language}\n(.*?)```", body, re.DOTALL)


def test_readme_params_block_for_an_image_folder_is_valid_params(tmp_path: Path) -> None:
    (block,) = readme_blocks("### Image folders: photos of any size", "yaml")
    path = tmp_path / "params.yaml"
    path.write_text(block)
    config = load_config(path)  # YAML 1.1 = 1.2, the schema, the types: what every step does first
    assert config.dataset.source == "imageset" and config.encoding == "original"
    assert config.dataset.imageset.layout == "folders" and config.dataset.imageset.resize_height == 0
    assert validate_params(read_params(path)) == validate_params(yaml.safe_load(block))


def _textproto(text: str) -> dict[str, Any]:
    """A protobuf text-format message as nested dicts of lists (enough for a Caffe layer):
    fails on unbalanced braces or anything that is not ``name: value`` or ``name { ... }``."""
    tokens = re.findall(r'"[^"]*"|[{}]|[\w.]+:|[\w.+-]+', re.sub(r"#.*", "", text))
    stack: list[dict[str, Any]] = [{}]
    position = 0
    while position < len(tokens):
        token = tokens[position]
        if token == "}":
            stack.pop()
            assert stack, "unbalanced }"
            position += 1
        elif token.endswith(":"):
            value = tokens[position + 1]
            assert value not in "{}", token
            stack[-1].setdefault(token[:-1], []).append(value.strip('"'))
            position += 2
        else:
            assert tokens[position + 1] == "{", token
            child: dict[str, Any] = {}
            stack[-1].setdefault(token, []).append(child)
            stack.append(child)
            position += 2
    assert len(stack) == 1, "unbalanced {"
    return stack[0]


def test_readme_caffe_data_layers_name_the_pipelines_outputs() -> None:
    from datumdb.pipeline.outputs import MEAN_BINARYPROTO, database

    one_size, photos = (_textproto(block)["layer"][0] for block in readme_blocks("### Training with Caffe", "protobuf"))
    for layer in (one_size, photos):
        assert layer["type"] == ["Data"] and layer["top"] == ["data", "label"]
        data = layer["data_param"][0]
        assert data["source"] == [database("train")] and data["backend"] == ["LMDB"] and int(data["batch_size"][0]) > 0
        assert layer["transform_param"][0]["mirror"] == ["true"]
    assert one_size["transform_param"][0]["mean_file"] == [MEAN_BINARYPROTO]
    assert int(one_size["transform_param"][0]["crop_size"][0]) <= 32  # the default images are 32x32
    transform = photos["transform_param"][0]
    assert len(transform["mean_value"]) == 3 and "mean_file" not in transform and transform["force_color"] == ["true"]


# ----------------------------------------------------------------------------- hostile params files


def _billion_laughs(mappings: bool) -> str:
    """Nine levels of aliases, nine each: 9**9 (387 million) leaves from under 3 kB."""
    lines = ['a0: &a0 {x: "lol"}' if mappings else 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        refs = [f"*a{level - 1}"] * 9
        body = "{" + ", ".join(f"k{i}: {r}" for i, r in enumerate(refs)) + "}" if mappings else f"[{', '.join(refs)}]"
        lines.append(f"a{level}: &a{level} {body}")
    return "\n".join(lines) + "\nseed: 0\n"


@pytest.mark.parametrize("mappings", [False, True])
def test_a_billion_laughs_file_is_refused_before_anything_expands_it(tmp_path: Path, mappings: bool) -> None:
    text = _billion_laughs(mappings)
    assert len(text) < 3000
    path = _write(tmp_path, text)
    # In a child with a time limit: an expanding walk (Snakemake's config merge, DVC's context,
    # jsonschema, the YAML 1.1/1.2 comparison) would not return in any test's lifetime.
    code = f"from datumdb.cli import main; raise SystemExit(main(['pipeline', 'check', '--params', {str(path)!r}]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"datumdb pipeline: error: {path}: a0 (line 1): YAML anchors and aliases")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("base: &b {count: 10}\ndataset: *b\n", "base (line 1)"),  # an anchor alone is refused too
        ("dataset:\n  input_dir: &d inputs\n", "dataset.input_dir (line 2)"),
        ("seed: 1\nbuild:\n  <<: *missing\n", "build.<< (line 3)"),  # merge keys need an alias
        ("dataset:\n  shape: [3, &x 8, 8]\n", "dataset.shape[1] (line 2)"),
    ],
)
def test_anchors_and_aliases_are_refused_naming_the_key(tmp_path: Path, text: str, where: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=re.escape(f"{path}: {where}: YAML anchors and aliases")):
        read_params(path)


def test_the_repository_params_files_use_no_anchors() -> None:
    for path in [REPO / "params.yaml", REPO / ".test" / "params.yaml"]:
        assert read_params(path) == yaml.safe_load(path.read_text())


@pytest.mark.parametrize(
    ("text", "key", "digits"),
    [
        ("seed: " + "9" * 5000 + "\n", "seed (line 1)", 5000),  # Python refuses int() of over 4300 digits
        ("build:\n  map_size: " + "1" * 21 + "\n", "build.map_size (line 2)", 21),
        ("dataset: {shape: [3, " + "8" * 30 + ", 8]}\n", "dataset.shape[1] (line 1)", 30),
        ("verify: {sample: !!int '" + "7" * 25 + "'}\n", "verify.sample (line 1)", 25),
        ("seed: 0x" + "f" * 30 + "\n", "seed (line 1)", 30),
        ("seed: -1_" + "0" * 4999 + "\n", "seed (line 1)", 5000),
        ("seed: 0o" + "7" * 25 + "\n", "seed (line 1)", 25),  # an integer for YAML 1.2
        ("9" * 5000 + ": 1\n", "the document (line 1)", 5000),  # a key
    ],
)
def test_huge_integers_are_refused_naming_the_key(tmp_path: Path, text: str, key: str, digits: int) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=re.escape(f"{path}: {key}: an integer of {digits} digits")):
        read_params(path)


def test_a_huge_integer_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "seed: " + "9" * 5000 + "\n")
    assert main(["pipeline", "check", "--params", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"datumdb pipeline: error: {path}: seed (line 1): an integer of 5000 digits; " + (
        "no parameter takes one of more than 20\n"
    )


def test_long_strings_of_digits_that_are_no_integers_pass(tmp_path: Path) -> None:
    name = "1" * 40
    path = _write(tmp_path, f"dataset:\n  input_dir: '{name}'\n  mnist: {{images: {name}.idx}}\n")
    assert load_config(path).dataset.input_dir == name


@pytest.mark.parametrize("depth", [9, 20, 100_000])
def test_nesting_deeper_than_any_params_file_is_refused(tmp_path: Path, depth: int) -> None:
    path = _write(tmp_path, "seed: " + "[" * depth + "]" * depth + "\n")  # the loaders recurse
    message = re.escape(f"{path}: seed[0][0][0][0][0][0][0] (line 1): nested deeper than 8 levels")
    if depth > 1000:  # libyaml's parser stops first
        message = re.escape(f"{path}: not valid YAML: ") + ".*exceeded maximum nesting depth"
    with pytest.raises(InputError, match=message):
        read_params(path)
    assert read_params(_write(tmp_path, "seed: [[[[[[[1]]]]]]]\n", "deep.yaml"))  # 8 levels: a schema error later


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("build: {map_size: 17592186044417}\n", "build.map_size"),  # MAX_MAP_SIZE + 1
        ("build: {map_size: 1000000000000000000}\n", "build.map_size"),
        ("build: {batch_size: 2147483648}\n", "build.batch_size"),
        ("dataset: {count: 2147483648}\n", "dataset.count"),
        ("dataset: {classes: 10000000000000000000}\n", "dataset.classes"),
        ("dataset: {shape: [3, 1000000000000000000, 2]}\n", "dataset.shape.1"),
        ("dataset: {imageset: {resize_height: 65536, resize_width: 8}}\n", "dataset.imageset.resize_height"),
        ("verify: {sample: 2147483648}\n", "verify.sample"),
        ("dataset: {imageset: {decode_timeout: 1000001}}\n", "dataset.imageset.decode_timeout"),
    ],
)
def test_values_over_the_command_lines_maxima_are_refused(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=re.escape(f"{path}: {key}: ") + ".* is greater than the maximum of"):
        load_config(path)


def test_the_maxima_are_the_command_lines() -> None:
    from datumdb.limits import INT31_MAX, MAX_MAP_SIZE, MAX_TIMEOUT

    at_most = _write(
        Path(tempfile.mkdtemp()),
        f"build: {{map_size: {MAX_MAP_SIZE}, batch_size: {INT31_MAX}}}\n"
        f"dataset: {{imageset: {{decode_timeout: {MAX_TIMEOUT:.1f}}}}}\nverify: {{sample: {INT31_MAX}}}\n",
    )
    config = load_config(at_most)
    assert (config.build.map_size, config.build.batch_size) == (MAX_MAP_SIZE, INT31_MAX)
    assert config.dataset.imageset.decode_timeout == MAX_TIMEOUT
    for option, value in [("--map-size", MAX_MAP_SIZE + 1), ("--batch-size", INT31_MAX + 1)]:
        with pytest.raises(SystemExit):  # the command line refuses the same values
            from datumdb.cli import build_parser

            build_parser().parse_args(["convert-arrays", "x.npy", "y.npy", "out", option, str(value)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dataset: {shape: [3, 100000, 20000]}\n", r"dataset\.shape: 3 x 100000 x 20000 is 6000000000 values"),
        (
            "dataset: {imageset: {resize_height: 60000, resize_width: 60000}}\n",
            r"dataset\.imageset\.resize_height x resize_width: 60000 x 60000 is over the bound",
        ),
    ],
)
def test_images_over_the_size_bounds_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("dataset: {imageset: {decode_timeout: .nan}}\n", "dataset.imageset.decode_timeout"),
        ("dataset: {imageset: {decode_timeout: .inf}}\n", "dataset.imageset.decode_timeout"),
        ("dataset: {imageset: {decode_timeout: .Inf}}\n", "dataset.imageset.decode_timeout"),
        ("dataset: {imageset: {decode_timeout: 1.0e+999}}\n", "dataset.imageset.decode_timeout"),  # overflows to inf
        ("split: {train: .nan, val: 0.5, test: 0.5}\n", "split.train"),
        ("split: {train: 0.5, val: -.inf, test: 0.5}\n", "split.val"),
        ("dataset: {shape: [3, .nan, 8]}\n", "dataset.shape[1]"),
        ("seed: .NaN\n", "seed"),
    ],
)
def test_nan_and_inf_are_refused_wherever_they_are(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=re.escape(f"{path}: {key}: ") + r"-?(nan|inf) is not a finite number"):
        load_config(path)


def test_nan_is_refused_in_a_mapping_given_directly() -> None:
    """Snakemake's config reaches validate_params without read_params (JSON config files may hold NaN)."""
    with pytest.raises(InputError, match=r"x\.yaml: dataset\.imageset\.decode_timeout: nan is not a finite"):
        validate_params({"dataset": {"imageset": {"decode_timeout": float("nan")}}}, "x.yaml")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("dataset: {input_dir: 'in{put}s'}\n", "dataset.input_dir"),
        ("dataset: {input_dir: 'a}b'}\n", "dataset.input_dir"),
        ("dataset: {arrays: {images: '{X}.npy'}}\n", "dataset.arrays.images"),
        ("dataset: {arrays: {labels: 'y{.npy'}}\n", "dataset.arrays.labels"),
        ("dataset: {imageset: {root: 'img{0}'}}\n", "dataset.imageset.root"),
        ("dataset: {imageset: {list_file: 'list{}.txt'}}\n", "dataset.imageset.list_file"),
        ("dataset: {cifar10: {batches: [a.bin, 'b{1}.bin']}}\n", "dataset.cifar10.batches[1]"),
        ("dataset: {mnist: {images: '{i}'}}\n", "dataset.mnist.images"),
        ("dataset: {mnist: {labels: '{l}'}}\n", "dataset.mnist.labels"),
    ],
)
def test_braces_in_file_names_are_refused_for_both_orchestrators(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=re.escape(f"{path}: {key}: ") + ".* has a brace .* Snakemake reads braces"):
        load_config(path)


@pytest.mark.parametrize(
    "text",
    [
        "dataset: {imageset: {decode_timeout: .nan}}\n",
        "build: {map_size: 100000000000000000}\n",
        "dataset: {input_dir: 'in{put}s'}\n",
        "seed: " + "1" * 5000 + "\n",
        _billion_laughs(True),
    ],
)
def test_every_step_refuses_hostile_params_before_any_work(tmp_path: Path, text: str) -> None:
    params = _write(tmp_path, text)
    shards, db = tmp_path / "shards", tmp_path / "db"
    for args in (
        ["pipeline", "shards", "--params", str(params), "--part", str(tmp_path / "part-0.json"), str(shards)],
        ["pipeline", "shards", "--params", str(params), str(shards)],
        ["pipeline", "assemble", "--params", str(params), "--split", "train", str(shards / "train"), str(db)],
        ["pipeline", "stale", "--params", str(params)],
    ):
        code = f"from datumdb.cli import main; raise SystemExit(main({args!r}))"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"datumdb pipeline: error: {params}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing made


_WITHOUT_MODULE = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):  # as if `pip install datumdb` without the workflow extra
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == sys.argv[1]:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
from datumdb.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("module", ["ruamel", "jsonschema"])
@pytest.mark.parametrize("step", ["check", "stale"])
def test_pipeline_steps_without_the_workflow_extra_say_how_to_install_it(module: str, step: str) -> None:
    argv = ["pipeline", step, "--params", str(REPO / "params.yaml")]
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_MODULE, module, *argv], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and 'pip install "datumdb[workflow]"' in result.stderr
    assert "internal error" not in result.stderr


# ----------------------------------------------------------------------------- checked before


def _refuse_any_check(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the params file was checked again")


def test_a_params_file_checked_before_is_read_from_the_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step of a run reads the same params file: its check (both YAML readings and the
    schema) runs once, and the same bytes give the same values after; other bytes are checked."""
    from datumdb.pipeline import config as config_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".datumdb").mkdir()
    params = _write(tmp_path, "seed: 7\nsplit: {train: 0.5, val: 0.25, test: 0.25}\n")
    first = load_config(params)
    assert (tmp_path / config_module.CHECKED_PARAMS).is_file()
    monkeypatch.setattr(config_module, "validate_params", _refuse_any_check)
    monkeypatch.setattr(config_module, "_parse_params", _refuse_any_check)
    again = load_config(params)
    assert again == first and again.seed == 7 and again.split.val == 0.25
    params.write_text("seed: 8\nsplit: {train: 0.5, val: 0.25, test: 0.25}\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="checked again"):
        load_config(params)
    monkeypatch.undo()
    params.write_text("seed: -1\n", encoding="utf-8")  # a bad edit is refused as ever
    with pytest.raises(InputError, match="seed"):
        load_config(params)


def test_another_checker_checks_the_file_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry is keyed by the checker's code too: a datumdb with another schema or rule does
    not take values an older one filled in."""
    from datumdb.pipeline import config as config_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".datumdb").mkdir()
    params = _write(tmp_path, "seed: 7\n")
    load_config(params)
    monkeypatch.setattr(config_module, "_checker_digest", lambda: b"another datumdb")
    monkeypatch.setattr(config_module, "validate_params", _refuse_any_check)
    with pytest.raises(AssertionError, match="checked again"):
        load_config(params)


@pytest.mark.parametrize("damage", ["garbage", "values edited", "a list", "a folder"])
def test_a_damaged_or_edited_entry_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    from datumdb.pipeline import config as config_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".datumdb").mkdir()
    params = _write(tmp_path, "seed: 7\n")
    load_config(params)
    entry_path = tmp_path / config_module.CHECKED_PARAMS
    entry = json.loads(entry_path.read_text())
    if damage == "garbage":
        entry_path.write_bytes(b"\x00{not json")
    elif damage == "values edited":  # the digest no longer matches what it holds
        entry["params"]["seed"] = 99
        entry_path.write_text(json.dumps(entry))
    elif damage == "a list":
        entry_path.write_text(json.dumps([entry]))
    else:
        entry_path.unlink()
        entry_path.mkdir()
    assert load_config(params).seed == 7


def test_no_state_folder_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step run outside a pipeline's folder leaves nothing behind."""
    monkeypatch.chdir(tmp_path)
    params = _write(tmp_path, "seed: 7\n")
    assert load_config(params).seed == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
