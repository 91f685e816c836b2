"""params.yaml -> one typed, frozen :class:`PipelineConfig`, read the same way by every tool.

Why this module reads ``params.yaml`` itself instead of taking values on the command line:

* **One reading.** Snakemake reads its config file with PyYAML (YAML 1.1), DVC with ruamel
  (YAML 1.2). They disagree on ``010`` (8 or 10), ``yes``/``on`` (true or a string), ``1_000``,
  ``1:20`` (sexagesimal 80 or a string), ``0o10``... :func:`read_params` parses the file with
  both and refuses it, naming the key, unless every value is the same for both; the orchestrators
  then track the same values the steps use.
* **One argument.** The steps get the path of the params file, never its values joined into a
  shell string, so a value with spaces, quotes, ``$(...)``, ``;`` or a leading dash is data in
  both orchestrators and runs nothing.
* **One home for each default:** ``params.schema.yaml`` beside this module (Snakemake's
  ``validate`` uses the same file). Missing keys take the schema's default; unknown keys and
  wrong types are errors naming the key. The maxima come from the constants the command line
  uses (:mod:`datumdb.limits`, :data:`datumdb.limits.MAX_MAP_SIZE`), added to the schema here.
* **Nothing that makes a loader hang or crash.** Before any YAML is built into values, one pass
  over the parser's events refuses anchors and aliases (a 3 kB "billion laughs" file expands to
  a billion values in Snakemake's, DVC's and jsonschema's walks), nesting deeper than
  :data:`MAX_PARAMS_DEPTH` and integers longer than :data:`MAX_INTEGER_DIGITS` digits (Python
  refuses to convert one of over 4300). Then ``nan`` and ``inf`` are refused wherever they are
  (a time bound of ``.inf`` is no bound), and ``{``/``}`` in paths (Snakemake reads them as
  wildcards). The Snakefile runs all this before Snakemake reads the file (``configfile:``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from datumdb import limits
from datumdb.errors import DatumDBError, InputError
from datumdb.files import atomic_write
from datumdb.limits import (
    INT31_MAX,
    MAX_IMAGE_PIXELS,
    MAX_MAP_SIZE,
    MAX_RESIZE,
    MAX_RESIZE_PIXELS,
    MAX_TIMEOUT,
    read_regular_file,
)
from datumdb.pipeline import splits
from datumdb.pipeline.splits import SPLITS

__all__ = [
    "CHECKED_PARAMS",
    "MAX_INTEGER_DIGITS",
    "MAX_PARAMS_BYTES",
    "MAX_PARAMS_DEPTH",
    "PATH_KEYS",
    "SCHEMA_PATH",
    "SOURCES",
    "STATE_DIR",
    "ArraysConfig",
    "BuildConfig",
    "Cifar10Config",
    "DatasetConfig",
    "ImagesetConfig",
    "MnistConfig",
    "PipelineConfig",
    "load_config",
    "read_params",
    "resolved_json",
    "to_config",
    "validate_params",
    "yaml_disagreements",
]

SCHEMA_PATH = Path(__file__).with_name("params.schema.yaml")
SOURCES = ("synthetic", "arrays", "imageset", "cifar10", "mnist")
MAX_PARAMS_BYTES = 1 << 20  # a params file is a few kB; refuse to slurp a device or a huge file
MAX_PARAMS_DEPTH = 8  # nested mappings and lists; params.yaml needs 4 (dataset.cifar10.batches)
MAX_INTEGER_DIGITS = 20  # 2**64 has 20 digits; every integer parameter is below 2**44
# The pipeline's local state, never versioned: the input files' hash cache (made by the plan),
# verify's class means, the params file last checked. Relative: it lies where the steps run.
STATE_DIR = Path(".datumdb")
# The params file last checked, by digest (of its bytes and of this checker's code), with its
# values: every step of a run reads the same file, and checking it (the YAML read twice, the JSON
# schema) is about 0.2 s of each step's start, fifteen steps a run. Kept only where STATE_DIR
# exists (the plan makes it), never made for it; an entry that does not match is checked again.
CHECKED_PARAMS = STATE_DIR / "checked-params.json"
SCHEMA_MAXIMA: dict[tuple[str, ...], int | float] = {
    # schema keys ("[]": the items of a list) -> maximum, from the command line's ranges
    ("dataset", "count"): INT31_MAX,
    ("dataset", "shape", "[]"): INT31_MAX,
    ("dataset", "classes"): INT31_MAX,
    ("dataset", "imageset", "resize_height"): MAX_RESIZE,
    ("dataset", "imageset", "resize_width"): MAX_RESIZE,
    ("dataset", "imageset", "decode_timeout"): MAX_TIMEOUT,
    ("build", "batch_size"): INT31_MAX,
    ("build", "map_size"): MAX_MAP_SIZE,
    ("build", "shard_size"): INT31_MAX,
    ("verify", "sample"): INT31_MAX,
}
PATH_KEYS = (
    # file and folder names ("[]": every item): Snakemake reads { and } in them as wildcards
    ("dataset", "input_dir"),
    ("dataset", "arrays", "images"),
    ("dataset", "arrays", "labels"),
    ("dataset", "imageset", "root"),
    ("dataset", "imageset", "list_file"),
    ("dataset", "cifar10", "batches", "[]"),
    ("dataset", "mnist", "images"),
    ("dataset", "mnist", "labels"),
)


@dataclasses.dataclass(frozen=True)
class ArraysConfig:
    images: str
    labels: str
    layout: str
    bgr_from_rgb: bool


@dataclasses.dataclass(frozen=True)
class ImagesetConfig:
    layout: str
    root: str
    list_file: str
    gray: bool
    shuffle: bool
    resize_height: int
    resize_width: int
    on_error: str
    decode_timeout: float

    @property
    def resizes(self) -> bool:
        """Caffe resizes only when both sizes are given."""
        return self.resize_height > 0 and self.resize_width > 0


@dataclasses.dataclass(frozen=True)
class Cifar10Config:
    batches: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MnistConfig:
    images: str
    labels: str


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    source: str
    input_dir: str
    count: int
    shape: tuple[int, int, int]
    classes: int
    arrays: ArraysConfig
    imageset: ImagesetConfig
    cifar10: Cifar10Config
    mnist: MnistConfig

    def source_options(self) -> dict[str, Any]:
        """The settings of the chosen source only: what its samples depend on."""
        options: dict[str, Any] = {"source": self.source}
        if self.source == "synthetic":
            options.update(count=self.count, shape=list(self.shape), classes=self.classes)
        else:
            options["input_dir"] = self.input_dir
            options.update(_plain(getattr(self, self.source)))
        return options


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    train: float
    val: float
    test: float

    @property
    def fractions(self) -> tuple[float, float, float]:
        return (self.train, self.val, self.test)


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    shards: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.shards)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    batch_size: int
    map_size: int
    shard_size: int
    assemble: bool


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    sample: int


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every parameter of the pipeline, validated, with the schema's defaults filled in."""

    dataset: DatasetConfig
    seed: int
    partition: PartitionConfig
    split: SplitConfig
    encoding: str
    build: BuildConfig
    verify: VerifyConfig

    def as_dict(self) -> dict[str, Any]:
        return _plain(self)


def resolved_json(config: PipelineConfig, **beside: Any) -> bytes:
    """Every parameter, defaults filled in, as JSON, and the top-level keys ``beside`` after them
    (what ``datumdb pipeline check`` prints; DVC's stages read it with the inputs' and the code's
    digests beside: :func:`datumdb.pipeline.fingerprint.stage_params_json`)."""
    return (json.dumps({**config.as_dict(), **beside}, indent=2) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------- reading


def read_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The params file as a dict, after checking YAML 1.1 and YAML 1.2 read every value alike."""
    path = Path(path)
    return _parse_params(_decoded(_read_bytes(path), path), path)


def _parse_params(text: str, path: Path) -> dict[str, Any]:
    _refuse_unsafe_yaml(text, path)
    try:
        loaded_11 = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {_one_line(exc)}") from None
    loaded_12 = _load_yaml_12(text, path)
    problems = yaml_disagreements(loaded_11, loaded_12)
    if problems:
        raise InputError(
            f"{path}: {problems[0]}; Snakemake reads YAML 1.1, DVC YAML 1.2, so the two would build "
            "different data: quote the value or write it so both read it alike"
            + (f" (and {len(problems) - 1} more key(s))" if len(problems) > 1 else "")
        )
    if loaded_11 is None:
        loaded_11 = {}
    if not isinstance(loaded_11, dict):
        raise InputError(f"{path}: must be a mapping of parameters, got {type(loaded_11).__name__}")
    return loaded_11


def _read_bytes(path: Path) -> bytes:
    try:
        return read_regular_file(path, "params file", MAX_PARAMS_BYTES)  # no FIFO, device or huge file
    except FileNotFoundError:
        raise InputError(f"{path}: params file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the params file: {exc.strerror or exc}") from None


def _decoded(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None


_INTEGER_TAG = "tag:yaml.org,2002:int"
# What YAML 1.1 (Snakemake) or YAML 1.2 (DVC) may read as an integer: decimal, 0x/0o/0b, 1_000,
# sexagesimal 1:20. Generous on purpose: only its length matters here.
_INTEGER_LIKE = re.compile(r"[-+]?(?:0[xX][0-9a-fA-F_]+|(?:0[oObB])?[0-9_:]+)")


def _refuse_unsafe_yaml(text: str, path: Path) -> None:
    """Refuse, from the parser's events alone (no value built yet), what hangs or crashes a loader.

    * Anchors and aliases (``&a``, ``*a``, ``<<: *a``): a params file needs none, and nine
      levels of aliases in 3 kB are a billion values for every tool that walks them (Snakemake's
      config merge, DVC's interpolation context, jsonschema, the YAML 1.1/1.2 comparison).
    * Nesting deeper than :data:`MAX_PARAMS_DEPTH` (the loaders recurse).
    * Integers of more than :data:`MAX_INTEGER_DIGITS` digits: Python refuses to convert one of
      over 4300 digits (a ``ValueError`` inside the YAML loaders), and no parameter needs one.

    The parser is a state machine (no recursion), so this pass is linear in the file's size.
    """
    frames: list[list[Any]] = []  # per open mapping or list: [name, is_mapping, key pending, key or index]

    def name_of_next() -> str:  # the key the next node is the value of (its parent's, for a key)
        if not frames:
            return ""
        name, is_mapping, key_pending, key = frames[-1]
        if is_mapping:
            return name if key_pending else _join(name, str(key))
        return f"{name}[{key}]"

    def refuse(event: Any, name: str, problem: str) -> InputError:
        return InputError(f"{path}: {name or 'the document'} (line {event.start_mark.line + 1}): {problem}")

    def node_done(event: Any) -> None:
        if not frames:
            return
        frame = frames[-1]
        if frame[1]:  # a mapping: a key, then its value
            if frame[2]:
                frame[3] = event.value if isinstance(event, yaml.ScalarEvent) else "?"
            frame[2] = not frame[2]
        else:
            frame[3] += 1

    try:
        for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise refuse(
                    event,
                    name_of_next(),
                    "YAML anchors and aliases (&name, *name, <<: *name) are not allowed in a params file: "
                    "it needs none, and aliases can expand exponentially (a 'billion laughs'); write the values out",
                )
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                name = name_of_next()
                if len(frames) >= MAX_PARAMS_DEPTH:
                    raise refuse(event, name, f"nested deeper than {MAX_PARAMS_DEPTH} levels; params.yaml needs 4")
                frames.append([name, isinstance(event, yaml.MappingStartEvent), True, 0])
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                frames.pop()
                node_done(event)
            elif isinstance(event, yaml.ScalarEvent):
                _refuse_long_integer(event, name_of_next(), refuse)
                node_done(event)
            elif isinstance(event, yaml.AliasEvent):  # pragma: no cover - refused above
                node_done(event)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {_one_line(exc)}") from None


def _refuse_long_integer(event: Any, name: str, refuse: Any) -> None:
    """An integer (implicit or tagged ``!!int``) of more than MAX_INTEGER_DIGITS digits."""
    value = event.value
    plain = event.implicit[0]  # untagged and unquoted: the loaders resolve it by its look
    if not (plain or event.tag == _INTEGER_TAG) or len(value) <= MAX_INTEGER_DIGITS:
        return
    if _INTEGER_LIKE.fullmatch(value.strip()):
        digits = sum(c.isalnum() for c in value) - (2 if re.match(r"[-+]?0[xXoObB]", value.strip()) else 0)
        if digits > MAX_INTEGER_DIGITS:
            raise refuse(
                event,
                name,
                f"an integer of {digits} digits; no parameter takes one of more than {MAX_INTEGER_DIGITS}",
            )


def _join(name: str, key: str) -> str:
    return f"{name}.{key}" if name else key


def _require_workflow_extra() -> None:
    """The pipeline steps read params with ruamel.yaml and jsonschema, which only the ``workflow``
    extra installs (``pip install datumdb`` gives the library and the other commands): say so."""
    import importlib.util

    for module in ("ruamel.yaml", "jsonschema"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package (ruamel) is missing
            found = False
        if not found:
            raise InputError(
                f"the pipeline steps need the workflow extra (module {module} is missing): "
                'pip install "datumdb[workflow]"'
            )


def _load_yaml_12(text: str, path: Path) -> Any:
    """What DVC sees: ruamel.yaml's safe loader (YAML 1.2), as dvc.utils.serialize does."""
    import warnings

    _require_workflow_extra()
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError, YAMLFutureWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", YAMLFutureWarning)
            return YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:  # e.g. a duplicate key, which PyYAML silently accepts
        raise InputError(f"{path}: DVC (YAML 1.2) cannot read it: {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def yaml_disagreements(a: Any, b: Any, where: str = "") -> list[str]:
    """Keys whose YAML 1.1 reading ``a`` and YAML 1.2 reading ``b`` differ (type or value)."""
    name = where or "the document"
    if isinstance(a, dict) and isinstance(b, dict):
        problems = []
        if set(map(str, a)) != set(map(str, b)):
            extra = sorted(set(map(str, a)) ^ set(map(str, b)))
            return [f"{name}: keys {extra} are read differently"]
        b_by_name = {str(k): v for k, v in b.items()}
        for key, value in a.items():
            problems += yaml_disagreements(value, b_by_name[str(key)], f"{where}.{key}" if where else str(key))
        return problems
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{name}: a list of {len(a)} items for YAML 1.1, {len(b)} for YAML 1.2"]
        problems = []
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            problems += yaml_disagreements(x, y, f"{name}[{index}]")
        return problems
    same_type = type(a) is type(b)
    same_value = same_type and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))
    if not same_value:
        return [f"{name} is {a!r} for YAML 1.1 but {b!r} for YAML 1.2"]
    return []


# ----------------------------------------------------------------------------- validation


def validate_params(params: Mapping[str, Any], where: str = "params.yaml") -> dict[str, Any]:
    """A copy of ``params`` with the schema's defaults filled in; errors name the key.

    Uses the same JSON schema (and default filling) as Snakemake's ``validate``.
    """
    import copy

    _require_workflow_extra()
    from jsonschema import Draft202012Validator, validators

    schema = _schema()
    # JSON Schema calls 7.0 an integer; a count or a size written 7.0 is a typo we refuse, not round.
    strict_types = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    validator_class = validators.extend(
        Draft202012Validator,
        {"properties": _properties_with_defaults(Draft202012Validator)},
        type_checker=strict_types,
    )
    _refuse_non_finite(params, "", where)
    filled = copy.deepcopy(dict(params))
    errors = sorted(validator_class(schema).iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        key = ".".join(map(str, error.absolute_path)) or "(top level)"
        raise InputError(f"{where}: {key}: {error.message}")
    _check_beyond_schema(filled, where)
    return filled


def _refuse_non_finite(value: Any, name: str, where: str) -> None:
    """``nan``, ``inf`` and ``-inf`` (``.nan``, ``.inf``, ``1e999``) nowhere: each passes a
    schema's minimum (``nan > 0`` is false, and so is ``nan <= 0``) and means no bound at all."""
    if isinstance(value, float) and not math.isfinite(value):
        name = name or "the document"
        raise InputError(f"{where}: {name}: {value!r} is not a finite number (nan and inf set no bound)")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_non_finite(item, _join(name, str(key)), where)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _refuse_non_finite(item, f"{name or 'the document'}[{index}]", where)


@functools.cache
def _schema() -> dict[str, Any]:
    """The schema file, with the maxima of :data:`SCHEMA_MAXIMA` added (read once a process:
    Snakemake's start checks the params file three times; nothing changes the dict)."""
    schema = yaml.load(SCHEMA_PATH.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for keys, maximum in SCHEMA_MAXIMA.items():
        node = schema
        for key in keys:
            node = node["items"] if key == "[]" else node["properties"][key]
        node["maximum"] = maximum
    return schema


def _properties_with_defaults(validator_class: Any) -> Any:
    """jsonschema's documented recipe: fill a missing property with its schema default first."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = _copy(subschema["default"])
                if name in instance and isinstance(instance[name], dict) and subschema.get("type") == "object":
                    for sub, subsub in subschema.get("properties", {}).items():
                        if "default" in subsub and sub not in instance[name]:
                            instance[name][sub] = _copy(subsub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return set_defaults


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


def _check_beyond_schema(params: dict[str, Any], where: str) -> None:
    """What a JSON schema cannot say, each problem naming the key."""
    for keys in PATH_KEYS:
        for name, value in _values_at(params, keys):
            if "{" in value or "}" in value:
                raise InputError(
                    f"{where}: {name}: {value!r} has a brace ({{ or }}); Snakemake reads braces in file names "
                    "as wildcards, so the two orchestrators cannot both use it: rename the file or folder"
                )
    shards = params["partition"]["shards"]
    if shards != list(range(len(shards))):
        raise InputError(f"{where}: partition.shards must be the ids 0, 1, ..., n-1 in order, got {shards}")
    split = params["split"]
    total = split["train"] + split["val"] + split["test"]
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise InputError(
            f"{where}: split.train + split.val + split.test must be 1, got "
            f"{split['train']} + {split['val']} + {split['test']} = {total:g}"
        )
    dataset = params["dataset"]
    if dataset["source"] == "synthetic":
        count = dataset["count"]
        for name in SPLITS:
            if round(count * split[name]) < 1:
                raise InputError(f"{where}: split.{name}={split[name]} of dataset.count={count} is empty")
    if params["encoding"] == "original":
        if dataset["source"] != "imageset":
            raise InputError(
                f"{where}: encoding: original stores image files unchanged; dataset.source "
                f"{dataset['source']!r} has no image files (use none, png or jpg)"
            )
        imageset = dataset["imageset"]
        if imageset["resize_height"] > 0 and imageset["resize_width"] > 0:
            raise InputError(
                f"{where}: encoding: original stores each file's bytes unchanged, so it cannot resize; "
                "set dataset.imageset.resize_height and resize_width to 0, or use encoding png or jpg"
            )
    shape = dataset["shape"]
    if dataset["source"] == "synthetic" and math.prod(shape) > 3 * MAX_IMAGE_PIXELS:
        raise InputError(
            f"{where}: dataset.shape: {' x '.join(map(str, shape))} is {math.prod(shape)} values per image; "
            f"the bound is {3 * MAX_IMAGE_PIXELS} ({MAX_IMAGE_PIXELS} pixels of 3 channels)"
        )
    imageset = dataset["imageset"]
    if imageset["resize_height"] * imageset["resize_width"] > MAX_RESIZE_PIXELS:
        raise InputError(
            f"{where}: dataset.imageset.resize_height x resize_width: {imageset['resize_height']} x "
            f"{imageset['resize_width']} is over the bound of {MAX_RESIZE_PIXELS} pixels per image"
        )
    if not 0 <= params["seed"] < 2**32:
        raise InputError(f"{where}: seed must be in 0..2**32-1, got {params['seed']}")


# ----------------------------------------------------------------------------- typed config


def to_config(params: Mapping[str, Any]) -> PipelineConfig:
    """The typed config of validated params (see :func:`validate_params`)."""
    d = params["dataset"]
    dataset = DatasetConfig(
        source=d["source"],
        input_dir=d["input_dir"],
        count=int(d["count"]),
        shape=tuple(int(x) for x in d["shape"]),  # type: ignore[arg-type]
        classes=int(d["classes"]),
        arrays=ArraysConfig(**d["arrays"]),
        imageset=ImagesetConfig(**d["imageset"]),
        cifar10=Cifar10Config(batches=tuple(d["cifar10"]["batches"])),
        mnist=MnistConfig(**d["mnist"]),
    )
    return PipelineConfig(
        dataset=dataset,
        seed=int(params["seed"]),
        partition=PartitionConfig(shards=tuple(params["partition"]["shards"])),
        split=SplitConfig(**{k: float(v) for k, v in params["split"].items()}),
        encoding=params["encoding"],
        build=BuildConfig(**params["build"]),
        verify=VerifyConfig(**params["verify"]),
    )


def load_config(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read, cross-check (YAML 1.1 = 1.2), validate and type a params file; the same bytes
    checked by the same code before are taken from :data:`CHECKED_PARAMS`."""
    path = Path(path)
    raw = _read_bytes(path)
    _require_workflow_extra()  # the steps need it whether or not this file was checked here before
    key = hashlib.sha256(_checker_digest() + raw).hexdigest()
    params = _checked_before(key)
    if params is None:
        params = validate_params(_parse_params(_decoded(raw, path), path), str(path))
        _remember_checked(key, params)
    return to_config(params)


@functools.cache
def _checker_digest() -> bytes:
    """The digest of the code that checks a params file and fills its defaults: another
    datumdb (a new default, a new rule) checks every file again."""
    checker = hashlib.sha256()
    for source in (Path(__file__), SCHEMA_PATH, Path(limits.__file__), Path(splits.__file__)):
        checker.update(source.read_bytes())
    return checker.digest()


def _checked_before(key: str) -> dict[str, Any] | None:
    """The values of the params file whose check digest is ``key``, if it was checked last."""
    try:
        entry = json.loads(read_regular_file(CHECKED_PARAMS, "checked params", 4 * MAX_PARAMS_BYTES))
        params = entry["params"]
        body = json.dumps(params, sort_keys=True).encode("utf-8")
        if entry["key"] == key and entry["digest"] == hashlib.sha256(body).hexdigest():
            return params
    except (OSError, ValueError, TypeError, KeyError, DatumDBError):  # none yet, or not ours: check the file
        pass
    return None


def _remember_checked(key: str, params: dict[str, Any]) -> None:
    """Keep ``params`` as the values of the params file checked with ``key``, in the pipeline's
    state folder if there is one (a step run elsewhere leaves nothing behind)."""
    if not STATE_DIR.is_dir():
        return
    body = json.dumps(params, sort_keys=True)
    if json.loads(body) != params:  # only what JSON gives back exactly
        return
    entry = {"key": key, "digest": hashlib.sha256(body.encode("utf-8")).hexdigest(), "params": params}
    with contextlib.suppress(OSError):  # a cache: a read-only folder only costs the check
        atomic_write(CHECKED_PARAMS, json.dumps(entry, sort_keys=True).encode("utf-8"))


def _values_at(params: Mapping[str, Any], keys: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, value) of the strings at schema keys ``keys`` ("[]": every item of a list)."""
    found: list[tuple[str, Any]] = [("", params)]
    for key in keys:
        if key == "[]":
            found = [(f"{name}[{i}]", item) for name, value in found for i, item in enumerate(value)]
        else:
            found = [(_join(name, key), value[key]) for name, value in found]
    return [(name, value) for name, value in found if isinstance(value, str)]


def _plain(value: Any) -> Any:
    """Dataclasses and tuples as JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
